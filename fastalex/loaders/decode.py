"""Where a split's samples lie in its shards, and decoding them onto a bounded canvas.

Imports numpy, torch, simplejpeg (Pillow as a fallback), the shard format, augment.py (the crop
boxes) and cvcrop.py (the crop on the CPU); never a backend. Used by the `cpu` loader (in its
decode worker processes, or its threads: `ThreadDecoder`; on the CPU device they crop too) and the
`resident` loader (its one-off decode).
Contract: images are uint8 (N, H, W, 3), each top-left on an H x W canvas (``loaders.canvas_px``),
with its (height, width); an image larger than the canvas is scaled down to fit as it is decoded.
Reasons and measurements: docs/loaders.md.
"""

from __future__ import annotations

import io
import mmap
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from fastalex.errors import UserError
from fastalex.loaders.augment import Augment
from fastalex.loaders.contract import canvas_px
from fastalex.loaders.cvcrop import crop_into
from fastalex.loaders.shm import map_segment
from fastalex.shards import ASCII_ZERO, LABEL_DIGITS, Manifest, read_index


class UndecodableSample(UserError):
    """A sample's JPEG bytes do not decode (the shard changed after it was checked, or the pack
    is damaged): names the shard, the sample and the fix."""


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

    With `ring` ((path, shape) of a shared-memory segment: the `cpu` loader's ring): a task is
    (batch number, sample ids, uniforms), written into slot ``number % slots``, which the main
    process then reads in place; the task returns (slot, sizes). Without `augment` the slots are
    (batch, H, W, 3) canvases and the images are decoded onto them; with it (the CPU device) the
    slots are (batch, S, S, 3) and each image is decoded onto this process's own canvas, then
    cropped, resized and flipped into the slot by `crop_into` (its uniforms: Augment.uniforms'
    rows of the batch, None for val; sizes then None). Without a ring: a task is the sample ids
    and returns (images, sizes) as fresh tensors (for one-off decoding, e.g. the `resident`
    loader's).

    images: (N, H, W, 3) uint8, each image top-left on the H x W canvas; sizes: (N, 2) int32
    (height, width) of each image (a numpy array in ring mode).
    """

    def __init__(
        self,
        table: SampleTable,
        ring: tuple[str, tuple[int, ...]] | None = None,
        augment: Augment | None = None,
    ):
        self.paths = table.paths
        self.shard_ids = table.shard_ids
        self.offsets = table.offsets
        self.sizes = table.sizes
        self.canvas_px = table.canvas_px
        self.may_exceed = table.may_exceed
        self.ring = ring
        self.augment = augment
        self._maps: list[memoryview] | None = None  # opened in the worker, never pickled
        self._canvases: np.ndarray | None = None  # the ring, mapped in the worker
        self._scratch: np.ndarray | None = None  # this worker's canvas, when it crops

    def __getstate__(self):
        return {**self.__dict__, "_maps": None, "_canvases": None, "_scratch": None}

    def __getitem__(self, task):
        if self.ring is None:
            images = torch.empty((len(task), *self.canvas_px, 3), dtype=torch.uint8)
            return images, torch.from_numpy(self.decode_into(images.numpy(), task))
        if self._canvases is None:
            self._canvases = map_segment(*self.ring)
        number, ids, uniforms = task
        slot = number % len(self._canvases)
        if self.augment is None:
            return slot, self.decode_into(self._canvases[slot], ids)
        if self._scratch is None:
            self._scratch = np.empty((len(self._canvases[slot]), *self.canvas_px, 3), np.uint8)
        self.decode_crop_into(self._canvases[slot], self._scratch, ids, uniforms)
        return slot, None

    def decode_crop_into(
        self, out: np.ndarray, canvas: np.ndarray, ids: np.ndarray, uniforms: np.ndarray | None
    ) -> None:
        """Decode samples `ids` onto canvas[:len(ids)], then write each one's crop (its box and
        flip from its `uniforms` row, by self.augment) resized into out[:len(ids)]."""
        hw = self.decode_into(canvas, ids)
        sizes = torch.from_numpy(hw)
        rows = None if uniforms is None else torch.from_numpy(uniforms)
        boxes, flips = self.augment.boxes(sizes[:, 0], sizes[:, 1], rows)
        n = len(ids)
        flips = None if flips is None else flips.numpy()
        crop_into(out[:n], canvas[:n], hw, boxes.numpy(), flips)

    def open_shards(self) -> None:
        """Map every shard read-only (once per process: a worker's first task, or before threads
        share this decoder)."""
        if self._maps is None:
            maps = []
            for path in self.paths:
                with open(path, "rb") as f:
                    tar = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                maps.append(memoryview(tar))
            self._maps = maps

    def decode_into(self, pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Decode samples `ids` into pixels[:len(ids)] ((B, H, W, 3) uint8); their (h, w).
        UndecodableSample names a sample that neither libjpeg-turbo nor Pillow decodes."""
        self.open_shards()
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
                image = self.decode_with_pillow(data, ids[k])
                copied = True
            h, w = image.shape[:2]
            if copied or h != height or w != width:
                row[:h, :w] = np.array(image)  # a copy first: it may overlap the rows it moves to
            hw[k] = h, w
        return hw

    def decode_with_pillow(self, data, sample: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB through Pillow; UndecodableSample if it fails too."""
        try:
            with Image.open(io.BytesIO(data)) as source:
                return np.asarray(source.convert("RGB"))
        except Exception as error:  # Pillow raises several types for bad bytes
            shard = self.paths[self.shard_ids[sample]]
            raise UndecodableSample(
                f"{shard}: sample {sample} of the split ({self.sizes[sample]} bytes at offset "
                f"{self.offsets[sample]}) does not decode ({type(error).__name__}: {error}); "
                "the shard changed after it was checked: `fastalex verify` it, or re-pack"
            ) from None

    def __len__(self) -> int:  # tasks are addressed by sample ids, not by position
        return len(self.offsets)


class ThreadDecoder:
    """ShardDecoder's decoding in `threads` threads of this process, straight into buffers the
    caller owns: a batch is split into one contiguous chunk per thread, each decoded by one call
    of `decode_into` (simplejpeg releases the GIL while it decodes). No process, no shared
    memory, no copy."""

    def __init__(self, table: SampleTable, threads: int, augment: Augment | None = None):
        self.decoder = ShardDecoder(table, augment=augment)
        self.decoder.open_shards()  # before the threads share it
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="fastalex-decode")

    def submit(
        self,
        pixels: np.ndarray,
        ids: np.ndarray,
        out: np.ndarray | None = None,
        uniforms: np.ndarray | None = None,
    ) -> list[Future]:
        """Start decoding samples `ids` into pixels[:len(ids)] (with `out`: then cropping them
        into it, as ShardDecoder.decode_crop_into); the chunks' futures, for `result`."""
        bounds = np.linspace(0, len(ids), min(self.threads, len(ids)) + 1).astype(int)
        futures = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            part = slice(start, stop)
            if out is None:
                work = (self.decoder.decode_into, pixels[part], ids[part])
            else:
                draws = None if uniforms is None else uniforms[part]
                work = (self.decoder.decode_crop_into, out[part], pixels[part], ids[part], draws)
            futures.append(self.pool.submit(*work))
        return futures

    @staticmethod
    def result(futures: list[Future]) -> np.ndarray | None:
        """(N, 2) int32 (h, w) once every chunk is decoded (None once cropped); a chunk's error
        raised here."""
        parts = [future.result() for future in futures]
        return None if parts[0] is None else np.concatenate(parts)

    @staticmethod
    def cancel(futures: list[Future]) -> None:
        """Drop the chunks not started and wait for the others: afterwards no thread writes into
        their buffer."""
        for future in futures:
            future.cancel()
        wait(futures)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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
