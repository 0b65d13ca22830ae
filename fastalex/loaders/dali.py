"""The `dali` backend: a DALI pipeline over the shards. The only module that imports nvidia.dali.

Imports DALI, torch, the shard format, augment.py and host.py; imported lazily by
loaders/__init__.py only when this backend is chosen. The source (`read_shards`: reader, rank
sharding, shuffle) is kept apart from the processing (`process_images`: decode -> crop -> resize
-> flip). On CUDA the whole pipeline runs on the GPU and hands uint8 HWC batches over by DLPack
(`KeepUntilDone` keeps their buffers alive until the work reading them has run); in CPU-only mode
DALI decodes onto uint8 canvases and augment.py does the rest, as in the `cpu` backend. The
epoch order lives inside the pipeline, which DALI's reader seeds once: a train pass builds a fresh
pipeline seeded from (seed, epoch, rank), so epoch e's order is the same however the process got
there, and a resumed run's first pass consumes the batches to skip. Reasons and measurements:
docs/loaders.md.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.backend import GetCUDADeviceCount
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders.augment import CROP_ATTEMPTS, ragged_sizes
from fastalex.loaders.base import BaseLoader, epoch_generator, epoch_seed
from fastalex.loaders.contract import Batch, Placement, canvas_px, loader_workers, rank_share
from fastalex.loaders.host import one_thread_on_cpu
from fastalex.shards import ASCII_ZERO, LABEL_DIGITS, Manifest

READER = "Reader"
SHUFFLE_BUFFER = 100_000  # samples: Tiny ImageNet's train split (docs/loaders.md: its fill cost)
GPU_THREADS_MAX = 8  # CPU threads per GPU pipeline (Huffman decoding of the non-hardware share)
HW_DECODER_LOAD = 0.65  # DALI 2.4's default share for the hardware JPEG decoder
PREALLOCATE_PX = 64  # Tiny ImageNet's image size: sizes nvJPEG's buffers up front
HELD_MAX = 16  # batches KeepUntilDone holds before it waits for the oldest one's work


class KeepUntilDone:
    """Holds objects until an event recorded after their consumers' work completes: DALI hands
    each output over zero-copy, and nothing orders the release of its buffer after the torch
    kernels that read it (docs/loaders.md). `new_event()` returns an event already recorded on
    the consumer's stream (CUDA: torch.cuda.Event + record; anything with query() and
    synchronize()); None keeps nothing (CPU)."""

    def __init__(self, new_event: Callable[[], object] | None) -> None:
        self.new_event = new_event
        self.held: deque = deque()  # (event, outputs), oldest first

    def keep(self, outputs: object) -> None:
        """Call once the work that reads `outputs` is queued."""
        if self.new_event is None:
            return
        self.held.append((self.new_event(), outputs))
        while self.held and self.held[0][0].query():  # done: nothing reads them any more
            self.held.popleft()
        while len(self.held) > HELD_MAX:  # bound the memory kept: wait for the oldest
            self.held[0][0].synchronize()
            self.held.popleft()

    def release_all(self) -> None:
        """Wait for every kept batch's work and let the buffers go."""
        while self.held:
            self.held.popleft()[0].synchronize()


def cuda_event_now() -> torch.cuda.Event:
    """An event recorded now on the current CUDA stream."""
    event = torch.cuda.Event()
    event.record()
    return event


def dali_available(device: torch.device) -> bool:
    """Whether DALI can run a pipeline for `device`: CPU-only mode, or a CUDA device it sees."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return GetCUDADeviceCount() > 0
        except RuntimeError:  # no driver
            return False
    return device.type == "cpu"


def read_shards(
    *, tars: list[str], indices: list[str], shard_id: int, num_shards: int, shuffle: bool, fill: int
):
    """The reader: (jpeg bytes, label digits) per sample, this rank's share, shuffled if train."""
    return fn.readers.webdataset(
        paths=tars,
        index_paths=indices,
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        random_shuffle=shuffle,
        initial_fill=fill,
        pad_last_batch=True,
        name=READER,
    )


def decode_images(jpegs, device: str):
    """JPEG bytes -> (h, w, 3) uint8 RGB: nvJPEG (``mixed``) for "gpu", libjpeg-turbo for "cpu"."""
    if device == "gpu":
        return fn.decoders.image(
            jpegs,
            device="mixed",
            output_type=types.RGB,
            hw_decoder_load=HW_DECODER_LOAD,
            preallocate_width_hint=PREALLOCATE_PX,
            preallocate_height_hint=PREALLOCATE_PX,
        )
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def process_images(jpegs, train: bool, cfg: TrainConfig, device: str):
    """decode -> random-resized-crop + flip (train) or resize (val), on `device` ("cpu" or
    "gpu"); (N, S, S, 3) uint8 HWC: DALI's resize rounds to the input's uint8 (on the GPU to
    nearest, ties to even, as augment.to_pixels), crop_mirror_normalize only mirrors (mean 0, std 1)
    and keeps uint8; the model normalises."""
    size = [cfg.image_size, cfg.image_size]
    images = decode_images(jpegs, device)
    if train:
        images = fn.random_resized_crop(
            images,
            size=size,
            random_area=[cfg.crop_scale_min, cfg.crop_scale_max],
            random_aspect_ratio=[cfg.crop_ratio_min, cfg.crop_ratio_max],
            num_attempts=CROP_ATTEMPTS,
        )
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.resize(images, size=size)
        mirror = 0
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", mirror=mirror)


def fit_to_canvas(images, canvas_px: tuple[int, int]):
    """Images larger than the canvas scaled down (aspect kept, antialiased) to fit in it; the
    others resized to their own size. Only built for packs that hold such images (loaders.
    canvas_px): the same bound the cpu backend applies as it decodes."""
    shape = images.shape(dtype=types.FLOAT, device="cpu")  # (h, w, 3) per sample
    height, width = shape[0], shape[1]
    scale = dmath.min(dmath.min(canvas_px[0] / height, canvas_px[1] / width), 1.0)
    return fn.resize(
        images,
        resize_y=dmath.min(height * scale, float(canvas_px[0])),
        resize_x=dmath.min(width * scale, float(canvas_px[1])),
        antialias=True,
    )


def decode_to_canvas(jpegs, canvas_px: tuple[int, int], device: str, fit: bool):
    """Decoded images padded (bottom/right, zeros) to the canvas, and each one's (h, w) before;
    with `fit`, those larger than the canvas scaled down to fit first."""
    images = decode_images(jpegs, device)
    if fit:
        images = fit_to_canvas(images, canvas_px)
    sizes = images.shape(dtype=types.INT32, device=device)[0:2]  # (h, w) of the HWC image
    return fn.pad(images, axes=(0, 1), shape=list(canvas_px), fill_value=0), sizes


@pipeline_def(enable_conditionals=False)
def shard_pipeline(
    *, tars, indices, shard_id, num_shards, train, fill, cfg, canvas_px, fit, device
):
    """GPU: (images (N, S, S, 3) uint8, label digits), all on the GPU. CPU-only mode: (canvases
    (N, H, W, 3) uint8, (h, w) (N, 2), label digits), augmented afterwards by augment.py."""
    jpegs, labels = read_shards(
        tars=tars,
        indices=indices,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle=train,
        fill=fill,
    )
    if device == "gpu":
        return process_images(jpegs, train, cfg, device), labels.gpu()
    return *decode_to_canvas(jpegs, canvas_px, device, fit), labels


@pipeline_def(enable_conditionals=False)
def decode_pipeline(*, tars, indices, shard_id, num_shards, canvas_px, fit, device):
    """This rank's share in order, decoded once onto the canvas, with each image's (h, w)."""
    jpegs, _ = read_shards(
        tars=tars, indices=indices, shard_id=shard_id, num_shards=num_shards, shuffle=False, fill=1
    )
    return decode_to_canvas(jpegs, canvas_px, device, fit)


def decode_split(
    cfg: TrainConfig,
    split: str,
    manifest: Manifest,
    placement: Placement,
    canvas_px: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of `split` (``rank_share`` of the global order) decoded once by DALI:
    (N, H, W, 3) uint8 images top-left on the H x W canvas and (N, 2) int32 (height, width), both
    on placement.device, in global order. For the `resident` loader (nvJPEG on CUDA)."""
    device, device_id, threads = pipeline_device(cfg, placement)
    info = manifest.splits[split]
    tars, indices = shard_paths(Path(cfg.shards), manifest, split)
    start, stop = rank_share(info.samples, placement.rank, placement.world_size)
    pipe = decode_pipeline(
        tars=tars,
        indices=indices,
        shard_id=placement.rank,
        num_shards=placement.world_size,
        canvas_px=tuple(canvas_px),
        fit=tuple(canvas_px) != tuple(info.image_px),
        device="gpu" if device_id is not None else "cpu",
        batch_size=placement.batch_share(cfg.batch_size),
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=cfg.prefetch,
    )
    pipe.build()
    outputs = DALIGenericIterator(
        [pipe], ["images", "sizes"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL
    )
    images = torch.empty((stop - start, *canvas_px, 3), dtype=torch.uint8, device=device)
    sizes = torch.empty((stop - start, 2), dtype=torch.int32, device=device)
    kept = KeepUntilDone(cuda_event_now if device.type == "cuda" else None)
    done = 0
    for batch in outputs:
        count = len(batch[0]["images"])
        images[done : done + count].copy_(batch[0]["images"])
        sizes[done : done + count].copy_(batch[0]["sizes"])
        kept.keep(batch)  # DALI's buffers stay ours until the copies have run
        done += count
    kept.release_all()
    if done != stop - start:
        raise RuntimeError(f"DALI decoded {done} of this rank's {stop - start} samples")
    del outputs, pipe
    return images, sizes


def pipeline_device(cfg: TrainConfig, placement: Placement) -> tuple[torch.device, int | None, int]:
    """(torch device, DALI device_id (None = CPU-only mode), pipeline threads) for the placement.
    Threads: cfg.loader_workers, else this process's share of the cores (loaders.loader_workers),
    at most GPU_THREADS_MAX for a GPU pipeline."""
    device = torch.device(placement.device)
    if not dali_available(device):
        raise UserError(f"DALI cannot run on {device}: no CUDA device visible to DALI")
    threads = loader_workers(cfg, placement)
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
        threads = cfg.loader_workers or min(threads, GPU_THREADS_MAX)
        return torch.device("cuda", device_id), device_id, threads
    return torch.device("cpu"), None, threads


def shard_paths(directory: Path, manifest: Manifest, split: str) -> tuple[list[str], list[str]]:
    """The split's tars and their DALI indices, in manifest (global) order."""
    shards = manifest.splits[split].shards
    tars = [str(directory / shard.name) for shard in shards]
    return tars, [str(directory / shard.index_name) for shard in shards]


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI's pipeline seed (31 bits) for (cfg.seed, epoch, rank): epoch_seed's, folded. It seeds
    the reader's shuffle (once, when the pipeline is built) and, on the GPU, the crops and flips."""
    return epoch_seed(seed, epoch, rank) & 0x7FFFFFFF


class DaliLoader(BaseLoader):
    """Loader protocol over a DALI pipeline (see the module docstring)."""

    resplits = False  # the shuffle lives in the pipeline: a rank's rest is not the others'

    backend = "dali"

    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        manifest: Manifest,
        placement: Placement,
        first_epoch: int = 0,
        skip_samples: int = 0,
    ):
        device, device_id, threads = pipeline_device(cfg, placement)
        placement = placement._replace(device=device)
        super().__init__(cfg, split, manifest, placement, first_epoch, skip_samples)
        self.on_gpu = device_id is not None  # else DALI decodes and augment.py does the rest
        info = manifest.splits[split]
        canvas = canvas_px(tuple(info.image_px), cfg.image_size)
        tars, indices = shard_paths(Path(cfg.shards), manifest, split)
        self._new_pipeline = functools.partial(
            shard_pipeline,
            tars=tars,
            indices=indices,
            shard_id=placement.rank,
            num_shards=placement.world_size,
            train=self.train,
            fill=max(1, min(self.share.stop - self.share.start, SHUFFLE_BUFFER)),
            cfg=cfg,
            canvas_px=canvas,
            fit=canvas != tuple(info.image_px),
            device="gpu" if self.on_gpu else "cpu",
            batch_size=self.batch_size,
            num_threads=threads,
            device_id=device_id,
            prefetch_queue_depth=cfg.prefetch,
        )
        self._kept = KeepUntilDone(cuda_event_now if self.on_gpu else None)
        self._pipe = self._iterator = None
        self._start(first_epoch)
        self.summary = (
            f"dali: {'GPU (nvJPEG)' if self.on_gpu else 'CPU-only mode'}, {threads} "
            "threads" + ("" if self.on_gpu else f", {canvas[0]} x {canvas[1]} canvases")
        )
        powers = 10 ** torch.arange(LABEL_DIGITS - 1, -1, -1, dtype=torch.int64)
        self._powers = powers.to(self.device)

    def _start(self, epoch: int) -> None:
        """A fresh pipeline and iterator whose order is `epoch`'s: DALI's reader seeds its shuffle
        once, in its constructor, and a pipeline cannot be re-seeded, so a train pass rebuilds it
        (the previous one released first: its shuffle buffer and its buffers on the GPU)."""
        self._release()
        self._pipe = self._new_pipeline(seed=pipeline_seed(self.seed, epoch, self.rank))
        self._pipe.build()
        self._iterator = DALIGenericIterator(
            [self._pipe],
            ["images", "labels"] if self.on_gpu else ["images", "sizes", "labels"],
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        self._pipe_epoch = epoch
        self._taken: int | None = None  # batches taken from DALI's current epoch; None: none begun

    def _release(self) -> None:
        """Let the pipeline go once every kept batch's work has run."""
        self._kept.release_all()
        self._iterator = self._pipe = None

    def _rewind(self) -> None:
        """Take what DALI has left of its current epoch, then reset it for the next one.

        DALI cannot reset mid-epoch, and its own ``__iter__`` resets an iterator whose epoch has
        ended, so the remaining batches are taken with ``next()`` and counted against
        ``len(iterator)`` (DALI's batches per epoch for this share): a pass that took them all
        drains nothing, and no extra epoch is ever decoded."""
        if self._taken is None:
            return
        for _ in range(len(self._iterator) - self._taken):
            next(self._iterator)
        self._iterator.reset()

    def __iter__(self):
        epoch, first = self.next_pass()
        if self.train and (self._taken is not None or self._pipe_epoch != epoch):
            self._start(epoch)  # this epoch's order, whatever ran before: (seed, epoch, rank)
        else:  # the pipeline's first epoch, or val (in order: nothing to re-seed)
            self._rewind()
        self._taken = 0
        generator = epoch_generator(self.seed, epoch, self.rank)
        for _ in range(first):  # a resumed pass: the order is inside DALI, so consume the batches
            outputs = next(self._iterator)
            self._taken += 1
            if not self.on_gpu:  # advance the generator as the uninterrupted pass did
                self.augment.draw(outputs[0]["sizes"][:, 0], outputs[0]["sizes"][:, 1], generator)
        for _ in range(first, len(self)):
            outputs = next(self._iterator)
            self._taken += 1
            digits = outputs[0]["labels"]  # (N, LABEL_DIGITS) uint8 ASCII, on the device
            labels = ((digits.to(torch.int64) - ASCII_ZERO) * self._powers).sum(dim=1)
            if self.on_gpu:
                images = outputs[0]["images"].permute(0, 3, 1, 2)  # (N, 3, S, S) u8 channels_last
            else:
                with one_thread_on_cpu(self.device):
                    images = self._augment(outputs[0]["images"], outputs[0]["sizes"], generator)
            try:
                yield Batch(images, labels)
            finally:  # the consumer's work on this batch is queued (or it stopped): keep it
                self._kept.keep(outputs)

    def _augment(
        self, canvases: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """CPU-only mode: (N, H, W, 3) uint8 canvases -> (N, 3, S, S) uint8 channels_last, as
        the `cpu` backend does it (faster than DALI's per-sample CPU operators: docs/loaders.md)."""
        boxes, flips = self.augment.draw(sizes[:, 0], sizes[:, 1], generator)
        return self.augment.apply(canvases, boxes, flips, ragged_sizes(sizes, canvases.shape[1:3]))

    def close(self) -> None:
        if getattr(self, "_kept", None) is not None:
            self._release()
