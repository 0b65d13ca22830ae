"""The loader contract every backend shares: `Batch`, the `Loader` protocol, where a process's
share of a split lies (`rank_share`, `plan_share`), its decode workers, the canvas a decoded
image is held on, the transform of each split, and opening a pack for a split.

Imports torch, the config, the runtime's Placement, augment.py and the shard format; never a
backend (they import this). `fastalex.loaders` re-exports it. Reasons: docs/loaders.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from fastalex.config import TrainConfig, default_workers
from fastalex.errors import UserError
from fastalex.loaders.augment import Augment
from fastalex.runtime import Placement
from fastalex.shards import Manifest, check_pack, read_manifest

# Decoded images are kept at most twice the output size a side: a random-resized crop of the
# fast recipe's smallest area (0.35) of such an image is still ~1.2x the output.
CANVAS_SIDE_FACTOR = 2


class BackendMissing(UserError, ImportError):
    """The chosen backend's library does not import here: one line for the user (a UserError),
    a skipped row for the benchmarks (which skip on ImportError)."""


class Batch(NamedTuple):
    images: torch.Tensor  # (N, 3, S, S) uint8 channels_last, 0..255 RGB pixels, on the device
    labels: torch.Tensor  # (N,) int64, on the device


class Loader(Protocol):
    backend: str  # "dali", "cpu" or "resident": the one actually running
    samples: int  # samples this rank yields per epoch (train: after dropping the short batch)
    summary: str  # one line for the run's log: workers or threads, what it holds
    resplits: bool  # whether the rest of a part-done epoch can be split over another world size

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


def loader_workers(cfg: TrainConfig, placement: Placement) -> int:
    """cfg.loader_workers, or this process's share of the cores it may use: under torchrun, N
    processes on a machine each take 1/N of them (every rank taking every core would run N times
    as many decode processes or threads as cores)."""
    return cfg.loader_workers or max(1, default_workers() // max(1, placement.local_world_size))


def rank_share(samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's share of `samples` in global order: disjoint, covering, sizes
    floor((r+1)N/k) - floor(rN/k), the same split DALI's shard_id/num_shards makes."""
    return samples * rank // world_size, samples * (rank + 1) // world_size


def steps_per_epoch(samples: int, batch_size: int, placement: Placement, train: bool) -> int:
    """Train: full batches of the smallest rank share, floor(N/k), so every rank steps the same
    count. Val: batches covering this rank's own share, the last one short."""
    if train:
        return (samples // placement.world_size) // batch_size
    start, stop = rank_share(samples, placement.rank, placement.world_size)
    return -(-(stop - start) // batch_size)


class Share(NamedTuple):
    """This rank's part of a split: [start, stop) of the global order, steps per epoch, and the
    samples it yields per epoch (train: full batches only)."""

    start: int
    stop: int
    steps: int
    samples: int


def plan_share(total: int, batch_size: int, placement: Placement, train: bool) -> Share:
    start, stop = rank_share(total, placement.rank, placement.world_size)
    steps = steps_per_epoch(total, batch_size, placement, train)
    return Share(start, stop, steps, steps * batch_size if train else stop - start)


def canvas_px(image_px: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(height, width) of the canvas a decoded image is placed on: the split's largest image
    (manifest image_px), capped at CANVAS_SIDE_FACTOR * image_size a side. An image larger than
    the canvas is scaled down to fit (aspect kept) as it is decoded, so a batch's memory is
    bounded by batch * canvas * 3 bytes whatever the pack holds; Tiny ImageNet (64 x 64 at every
    image_size) is never scaled."""
    bound = CANVAS_SIDE_FACTOR * image_size
    return min(image_px[0], bound), min(image_px[1], bound)


def augment_for(cfg: TrainConfig, split: str) -> Augment:
    """The transform of `split` under `cfg`, the same for every backend."""
    return Augment(
        train=split == "train",
        image_size=cfg.image_size,
        crop_scale=(cfg.crop_scale_min, cfg.crop_scale_max),
        crop_ratio=(cfg.crop_ratio_min, cfg.crop_ratio_max),
    )


def open_pack(cfg: TrainConfig, split: str, placement: Placement) -> Manifest:
    """The manifest of cfg.shards, after checking this split's shards against it (size + sha256)
    and that the split can serve the requested batch; UserError otherwise."""
    manifest = read_manifest(Path(cfg.shards))
    if split not in manifest.splits:
        raise UserError(f"{cfg.shards}: the pack has no {split!r} split")
    check_pack(Path(cfg.shards), manifest, (split,))
    share = manifest.splits[split].samples // placement.world_size
    if split == "train" and share < placement.batch_share(cfg.batch_size):
        raise UserError(
            f"--batch-size {cfg.batch_size} over {placement.world_size} processes takes "
            f"{placement.batch_share(cfg.batch_size)} images a step from each, more than the "
            f"train share of each ({share} images); lower --batch-size"
        )
    return manifest
