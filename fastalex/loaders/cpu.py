"""The `cpu` backend: pure PyTorch + simplejpeg over the shards, and the correctness reference.

Imports torch, numpy, simplejpeg (Pillow as a fallback decoder), the shard format and augment.py;
never DALI. Works on any device: the CPU decodes, the device augments.

How a batch is made:

- Sample table (built once, vectorised): every sample of the split in global order (shard order,
  then index order) as (shard, JPEG offset, JPEG size), and every label, read from the fixed-width
  ASCII ``.cls`` members with one numpy gather and no per-sample Python.
- This rank's share is ``rank_share`` of that order. Each epoch is a permutation of the share
  (train; seeded by (seed, epoch, rank)) or the share in order (val), cut into batches of sample
  ids: train keeps ``steps_per_epoch`` full batches, val keeps the short last one.
- Worker processes (a torch DataLoader, one batch of ids per task, persistent across epochs) read
  the JPEGs by random access through an mmap of each tar (no tar streaming) and decode them with
  simplejpeg straight into a uint8 (N, H, W, 3) canvas, one of a small ring of them in shared
  memory (``prefetch * workers + 2`` batches; 19 MB for Tiny ImageNet at the defaults, checked
  against free /dev/shm: `fit_ring`). H x W is the split's largest image (``image_px``, 64 x 64
  for Tiny ImageNet) capped at twice image_size a side (``loaders.canvas_px``): a larger image
  (a user's photo packed with --max-side 0, say) is scaled down to fit as it is decoded
  (`decode_to_fit`: libjpeg-turbo's DCT scaling, then an antialiased resize), so memory is
  bounded by the batch, not by the largest image. A smaller image sits top-left and its (h, w)
  travels with the batch. Workers never crop or convert to float, so their cost per image does
  not depend on image_size.
- The main process reads the canvas in place, pins it (CUDA only) and copies it ``non_blocking``
  to the device, draws the crop boxes and flips for the whole batch from a torch.Generator seeded
  by (seed, epoch, rank), and runs augment.crop_resize there: crop + resize + flip + normalise in
  one batched op.

Cost on the 2-vCPU box (64 x 64 JPEGs, batch 256, CPU device): ~40 CPU-us per image in the
workers (decoding ~33) at any image_size; in the main process, crop_resize's share grows with the
output (see augment.py): ~30 CPU-us per image at 64 px, ~150 at 227 px (a 158 MB float batch).

Decoder speed, 64 x 64 Tiny-ImageNet-like JPEGs, one process on this 2-vCPU box (3,000 images,
`python -c` timing loop): simplejpeg 17k img/s, 24k img/s decoding into a preallocated buffer
(``buffer=``), Pillow 5.2k img/s, so simplejpeg with ``buffer=`` is ~4.6x Pillow.
"""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Batch, Placement, augment_for, canvas_px, loader_workers, plan_share
from fastalex.loaders.augment import (
    epoch_generator,
    keep_large_blocks_in_heap,
    one_thread_on_cpu,
    ragged_sizes,
)
from fastalex.shards import ASCII_ZERO, LABEL_DIGITS, Manifest, read_index

SHM_DIR = "/dev/shm"  # torch's shared CPU tensors live here (Docker's default size: 64 MB)
SHM_HEADROOM = 0.8  # share of the free shared memory this machine's rings may take


def decode_labels(digits: np.ndarray) -> np.ndarray:
    """(N, LABEL_DIGITS) uint8 ASCII digits -> (N,) int64 labels, vectorised."""
    powers = 10 ** np.arange(digits.shape[1] - 1, -1, -1, dtype=np.int64)
    return (digits.astype(np.int64) - ASCII_ZERO) @ powers


class SampleTable:
    """Where every sample of a split lies in its shards, and its label, in global order; and the
    canvas its images are decoded onto (loaders.canvas_px for `image_size`)."""

    def __init__(self, directory: Path, manifest: Manifest, split: str, image_size: int):
        info = manifest.splits[split]
        self.paths = [str(directory / shard.name) for shard in info.shards]
        shard_ids, offsets, sizes, labels = [], [], [], []
        for number, shard in enumerate(info.shards):
            index = read_index(directory / shard.index_name)
            if len(index) and not (index.cls_sizes == LABEL_DIGITS).all():
                raise UserError(
                    f"{directory / shard.index_name}: label members are not {LABEL_DIGITS} "
                    "digits wide; re-pack with this version"
                )
            shard_ids.append(np.full(len(index), number, dtype=np.int32))
            offsets.append(index.jpg_offsets)
            sizes.append(index.jpg_sizes)
            tar = np.memmap(directory / shard.name, dtype=np.uint8, mode="r")
            labels.append(decode_labels(tar[index.cls_offsets[:, None] + np.arange(LABEL_DIGITS)]))
            del tar
        self.shard_ids = np.concatenate(shard_ids)
        self.offsets = np.concatenate(offsets)
        self.sizes = np.concatenate(sizes)
        self.labels = torch.from_numpy(np.concatenate(labels))
        self.canvas_px = canvas_px(tuple(info.image_px), image_size)  # (height, width)
        self.may_exceed = self.canvas_px != tuple(info.image_px)  # some image is scaled to fit
        if len(self.labels) != info.samples:
            raise UserError(
                f"{directory}: the {split} indices list {len(self.labels)} samples, "
                f"the manifest {info.samples}; re-pack"
            )
        classes = manifest.num_classes
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= classes):
            raise UserError(f"{directory}: {split} labels outside 0..{classes - 1}")


class ShardDecoder(torch.utils.data.Dataset):
    """Decodes one batch of samples per task, in a worker process.

    With `canvases` ((slots, batch, H, W, 3) uint8 in shared memory, the `cpu` loader's ring): a
    task is (batch number, sample ids), decoded into slot ``number % slots``, which the main process
    then reads in place; the task returns (slot, sizes). No tensor crosses the process boundary per
    batch: allocating a fresh shared-memory batch (``share_memory_()``) cost 11 ms, as much as
    decoding its 256 images. Without `canvases`: a task is the sample ids and returns (images,
    sizes) as fresh tensors (for one-off decoding, e.g. the `resident` loader's).

    images: (N, H, W, 3) uint8, each image top-left on the H x W canvas; sizes: (N, 2) int32
    (height, width) of each image (a numpy array in ring mode).
    """

    def __init__(self, table: SampleTable, canvases: torch.Tensor | None = None):
        self.paths = table.paths
        self.shard_ids = table.shard_ids
        self.offsets = table.offsets
        self.sizes = table.sizes
        self.canvas_px = table.canvas_px
        self.may_exceed = table.may_exceed
        self.canvases = canvases
        self._maps: list[memoryview] | None = None  # opened in the worker, never pickled

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, task):
        if self.canvases is None:
            images = torch.empty((len(task), *self.canvas_px, 3), dtype=torch.uint8)
            return images, torch.from_numpy(self.decode_into(images.numpy(), task))
        number, ids = task
        slot = number % len(self.canvases)
        return slot, self.decode_into(self.canvases[slot].numpy(), ids)

    def decode_into(self, pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Decode samples `ids` into pixels[:len(ids)] ((B, H, W, 3) uint8); their (h, w)."""
        if self._maps is None:
            self._maps = []
            for path in self.paths:
                with open(path, "rb") as f:
                    tar = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps.append(memoryview(tar))
        height, width = pixels.shape[1:3]
        hw = np.empty((len(ids), 2), dtype=np.int32)
        maps, decode = self._maps, simplejpeg.decode_jpeg
        shard_ids, offsets = self.shard_ids[ids].tolist(), self.offsets[ids].tolist()
        ends = (self.offsets[ids] + self.sizes[ids]).tolist()
        for k in range(len(ids)):
            data = maps[shard_ids[k]][offsets[k] : ends[k]]
            row = pixels[k]
            if self.may_exceed:
                size = jpeg_size(data)
                if size[0] > height or size[1] > width:
                    image = decode_to_fit(data, size, height, width)
                    h, w = image.shape[:2]
                    row[:h, :w] = image
                    hw[k] = h, w
                    continue
            try:
                # (h, w, 3) written contiguously at the start of the canvas row. Positional:
                # colorspace, fastdct, fastupsample, min_height, min_width, min_factor, buffer,
                # strict (False: what libjpeg-turbo can recover, it does, as Pillow would).
                image = decode(data, "RGB", False, False, 0, 0, 1, row, False)
                copied = False
            except ValueError:  # what libjpeg-turbo refuses; pack accepted it through Pillow
                with Image.open(io.BytesIO(data)) as source:
                    image = np.asarray(source.convert("RGB"))
                copied = True
            h, w = image.shape[:2]
            if copied or h != height or w != width:
                row[:h, :w] = np.array(image)  # a copy first: it may overlap the rows it moves to
            hw[k] = h, w
        return hw

    def __len__(self) -> int:  # tasks are addressed by sample ids, not by position
        return len(self.offsets)


def jpeg_size(data) -> tuple[int, int]:
    """(height, width) from the JPEG's header, nothing decoded."""
    try:
        return tuple(simplejpeg.decode_jpeg_header(data)[:2])
    except ValueError:  # what libjpeg-turbo refuses: Pillow, which reads only the header here
        with Image.open(io.BytesIO(data)) as source:
            return source.size[::-1]


def decode_to_fit(data, size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a JPEG of (height, width) `size` larger than the canvas, scaled
    down (aspect kept) to fit in height x width. libjpeg-turbo first decodes at the largest of
    1/2, 1/4, 1/8 that still covers the canvas (DCT scaling: most of a large JPEG's pixels are
    never computed), then Pillow's antialiased bilinear resize makes up the rest."""
    full_h, full_w = size
    factor = max(full_h / height, full_w / width)
    reduce = next(r for r in (8, 4, 2, 1) if r <= factor)
    try:
        image = Image.fromarray(
            simplejpeg.decode_jpeg(
                data,
                "RGB",
                False,
                False,
                -(-full_h // reduce),
                -(-full_w // reduce),
                1,
                None,
                False,
            )
        )
    except ValueError:  # what libjpeg-turbo refuses: Pillow's own DCT scaling
        with Image.open(io.BytesIO(data)) as source:
            source.draft("RGB", (-(-full_w // reduce), -(-full_h // reduce)))
            image = source.convert("RGB")
    scale = min(height / image.height, width / image.width, 1.0)
    if scale < 1.0:
        size = (
            max(1, min(width, round(image.width * scale))),
            max(1, min(height, round(image.height * scale))),
        )
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image)


def ring_slots(workers: int, prefetch: int) -> int:
    """Batches in the shared-memory ring. Slot reuse is safe: the DataLoader keeps prefetch *
    workers tasks outstanding, so batch i + slots is dispatched only after batch i + 2 was handed
    over, when batch i is long done."""
    return prefetch * workers + 2


def free_shared_memory() -> int | None:
    """Bytes free in SHM_DIR, where torch puts shared CPU tensors (None: no such mount)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def fit_ring(cfg: TrainConfig, placement: Placement, batch_bytes: int, train: bool) -> int:
    """Decode workers for this loader, with its ring checked against free shared memory.

    Every process on the machine builds a train ring, then a val ring: this one may take
    SHM_HEADROOM of what is free divided by the rings still to come (so the first rings leave room
    for the later ones). With the default worker count, workers are dropped until the ring fits;
    a ring that cannot fit is a UserError naming the fixes, never a SIGBUS in a worker.
    """
    workers = loader_workers(cfg, placement)
    free = free_shared_memory()
    if free is None:
        return workers
    budget = SHM_HEADROOM * free / (placement.local_world_size * (2 if train else 1))
    while (
        not cfg.loader_workers
        and workers > 1
        and ring_slots(workers, cfg.prefetch) * batch_bytes > budget
    ):
        workers -= 1
    need = ring_slots(workers, cfg.prefetch) * batch_bytes
    if need > budget:
        raise UserError(
            f"the cpu loader's shared-memory ring needs {need / 2**20:.0f} MiB ({workers} workers, "
            f"--prefetch {cfg.prefetch}, --batch-size {cfg.batch_size}) but {SHM_DIR} has "
            f"{free / 2**20:.0f} MiB free for {placement.local_world_size} process(es); lower "
            "--loader-workers, --prefetch or --batch-size, or give the machine more shared "
            "memory (Docker: --shm-size=2g)"
        )
    return workers


def worker_start_method(placement: Placement) -> str | None:
    """How decode workers start: fork (the DataLoader's default, fastest) in a single process;
    forkserver once a process group exists, whose threads a fork would copy mid-operation (a
    forked worker deadlocked in Python's after-fork code beside gloo's threads)."""
    return "forkserver" if placement.world_size > 1 else None


def keep_as_is(task_result):
    """collate_fn for the DataLoader: worker results are already batches (no tensor conversion)."""
    return task_result


class _EpochBatches(torch.utils.data.Sampler):
    """The current epoch's tasks, (number, ids); CpuLoader sets them before each pass."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(enumerate(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class CpuLoader:
    """Loader protocol over the shards: worker processes decode, the device augments."""

    backend = "cpu"

    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        manifest: Manifest,
        placement: Placement,
        first_epoch: int = 0,
    ):
        self.augment = augment_for(cfg, split)
        self.device = torch.device(placement.device)
        self.rank = placement.rank
        self.batch_size = cfg.batch_size
        self.seed = cfg.seed
        self.epoch = first_epoch
        self.table = SampleTable(Path(cfg.shards), manifest, split, cfg.image_size)
        self.share = plan_share(
            manifest.splits[split].samples, cfg.batch_size, placement, self.augment.train
        )
        self.samples = self.share.samples
        height, width = self.table.canvas_px
        batch_bytes = cfg.batch_size * height * width * 3
        workers = fit_ring(cfg, placement, batch_bytes, self.augment.train)
        self.summary = (
            f"cpu: {workers} decode workers, {height} x {width} canvases, "
            f"{ring_slots(workers, cfg.prefetch)}-batch shared-memory ring"
        )
        canvases = torch.empty(
            (ring_slots(workers, cfg.prefetch), cfg.batch_size, height, width, 3), dtype=torch.uint8
        )
        self._tasks = _EpochBatches()
        self._loader = DataLoader(
            ShardDecoder(self.table, canvases.share_memory_()),
            batch_size=None,  # each task is a whole batch
            sampler=self._tasks,
            collate_fn=keep_as_is,
            num_workers=workers,
            prefetch_factor=cfg.prefetch,
            persistent_workers=True,
            multiprocessing_context=worker_start_method(placement),
        )
        if self.device.type == "cpu":
            keep_large_blocks_in_heap()

    def __len__(self) -> int:
        return self.share.steps

    def plan_epoch(self, epoch: int) -> tuple[list[np.ndarray], torch.Generator]:
        """The epoch's batches of global sample ids, and the generator for its augmentation."""
        start, stop, steps, _ = self.share
        generator = epoch_generator(self.seed, epoch, self.rank)
        if self.augment.train:
            order = torch.randperm(stop - start, generator=generator).numpy() + start
            order = order[: steps * self.batch_size]
        else:
            order = np.arange(start, stop)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches, generator

    def __iter__(self):
        batches, generator = self.plan_epoch(self.epoch)
        self.epoch += 1
        self._tasks.batches = batches
        canvases = self._loader.dataset.canvases
        for ids, (slot, sizes) in zip(batches, self._loader):
            images = canvases[slot, : len(ids)]  # (N, H, W, 3) uint8, read in place
            labels = self.table.labels[ids]
            with one_thread_on_cpu(self.device):
                batch = self._augment(images, torch.from_numpy(sizes), labels, generator)
            yield batch

    def _augment(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
    ) -> Batch:
        boxes, flips = self.augment.draw(sizes[:, 0], sizes[:, 1], generator)  # on the CPU
        sizes = ragged_sizes(sizes, images.shape[1:3])
        if self.device.type == "cuda":
            images = images.pin_memory().to(
                self.device, non_blocking=True
            )  # the slot is free again
            boxes = boxes.pin_memory().to(self.device, non_blocking=True)
            flips = None if flips is None else flips.pin_memory().to(self.device, non_blocking=True)
            sizes = None if sizes is None else sizes.pin_memory().to(self.device, non_blocking=True)
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        out = self.augment.apply(images, boxes, flips, sizes)  # (N, 3, S, S) f32 channels_last
        return Batch(out, labels)

    def close(self) -> None:
        loader, self._loader = getattr(self, "_loader", None), None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # persistent workers: stop them now, not at exit

    def __del__(self):
        self.close()
