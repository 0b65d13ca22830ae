"""FFCV, the peer the loader group compares with: its own writer and loader over the pack's images.

The only benchmark module that imports ffcv (install: README, "Benchmarks"). It is not a fastalex
backend: nothing in fastalex imports it, and the trainer never sees it.

- `beton_path` / `write_beton`: FFCV's `DatasetWriter` turns a split of the pack into a JPEG
  ``.beton`` (``RGBImageField(write_mode="jpg")`` + ``IntField``), cached beside the pack as
  ``<pack>.ffcv/<split>-q<quality>-<manifest digest>.beton``, so a pack re-made with other content
  gets a new file and a re-run reuses the old one. FFCV's writer takes pixels, not JPEG bytes: the
  pack's JPEGs are decoded and FFCV re-encodes them at its default quality (JPEG_QUALITY). Written
  to a temporary name and renamed: a killed run leaves no .beton that looks finished. Where the
  pack's directory cannot be written, the cache goes to the run's scratch directory.
- `FfcvLoader`: FFCV's `Loader` doing the work fastalex's train loaders do: random-resized-crop at
  the config's area and aspect ranges to image_size (FFCV's decoder crops while decoding), a
  horizontal flip, and what fastalex's loaders hand over: (N, 3, S, S) uint8 pixels, channels-last
  (FFCV's ToTorchImage view), on CUDA copied to the device by FFCV's ToDevice; the model
  normalises, so no NormalizeImage. Random order each epoch, the short last batch dropped, the
  batch size and worker count the fastalex rows get. Same iteration surface as a fastalex Loader:
  each ``__iter__`` one epoch, ``len()`` batches per epoch, ``close()``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from fastalex.config import TrainConfig
from fastalex.loaders import Batch
from fastalex.shards import iter_shard, read_index, read_manifest

JPEG_QUALITY = 90  # ffcv.fields.RGBImageField's default jpeg_quality
DIGEST_CHARS = 12  # of the manifest's sha256, in the cache's file name


def beton_path(shards: Path, split: str, scratch: Path) -> Path:
    """Where the .beton of `split` is cached: beside the pack when its directory is writable,
    else in `scratch`."""
    digest = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()[:DIGEST_CHARS]
    name = f"{split}-q{JPEG_QUALITY}-{digest}.beton"
    beside = shards.parent / f"{shards.name}.ffcv"
    if os.access(shards.parent, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK)):
        return beside / name
    return scratch / "ffcv" / name


class PackImages:
    """The pack's `split` as FFCV's writer reads a dataset: (H, W, 3) uint8 RGB pixels and the
    label, by index. Holds the split's JPEG bytes in memory (the writer's workers fork from it)."""

    def __init__(self, shards: Path, split: str) -> None:
        manifest = read_manifest(shards)
        self.samples: list[tuple[bytes, int]] = []
        for shard in manifest.splits[split].shards:
            index = read_index(shards / shard.index_name)
            self.samples += list(iter_shard(shards / shard.name, index))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        import simplejpeg

        jpeg, label = self.samples[index]
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB"), label  # (H, W, 3) uint8


def write_beton(shards: Path, split: str, path: Path, workers: int) -> Path:
    """`path`, written by FFCV's DatasetWriter from the pack's `split` unless it exists."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    fields = {
        "image": RGBImageField(write_mode="jpg", jpeg_quality=JPEG_QUALITY),
        "label": IntField(),
    }
    try:
        DatasetWriter(str(part), fields, num_workers=workers).from_indexed_dataset(
            PackImages(shards, split)
        )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


class FfcvLoader:
    """FFCV's Loader over a .beton, yielding fastalex `Batch`es (see the module docstring)."""

    backend = "ffcv"

    def __init__(self, cfg: TrainConfig, beton: Path, device: torch.device, workers: int) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        decode = RandomResizedCropRGBImageDecoder(
            (cfg.image_size, cfg.image_size),
            scale=(cfg.crop_scale_min, cfg.crop_scale_max),
            ratio=(cfg.crop_ratio_min, cfg.crop_ratio_max),
        )
        images = [
            decode,  # (N, S, S, 3) uint8
            RandomHorizontalFlip(),
            ToTensor(),
            *([ToDevice(self.device, non_blocking=True)] if cuda else []),
            ToTorchImage(channels_last=True),  # a (N, 3, S, S) view: channels_last strides
        ]
        self.hands_over = "uint8 pixels, channels_last" + (
            ", copied to the device by FFCV's ToDevice" if cuda else ""
        )
        labels = [IntDecoder(), ToTensor(), Squeeze()]
        if cuda:
            labels.append(ToDevice(self.device, non_blocking=True))
        self.loader = Loader(
            str(beton),
            batch_size=cfg.batch_size,
            num_workers=workers,
            order=OrderOption.RANDOM,
            seed=cfg.seed,
            drop_last=True,
            os_cache=True,
            pipelines={"image": images, "label": labels},
        )
        self.samples = len(self.loader) * cfg.batch_size
        self._epoch = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self._epoch = iter(self.loader)
        for images, labels in self._epoch:  # (N, 3, S, S) uint8 channels_last; (N,) int64
            yield Batch(images, labels.long())

    def close(self) -> None:
        if self._epoch is not None:
            self._epoch.close()  # FFCV's epoch thread: stop it now, not at garbage collection
            self._epoch = None
