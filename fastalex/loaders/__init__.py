"""The loader contract, and `build_loader`: the only thing the trainer and the benchmarks import
from the data side.

Iterating a Loader yields one epoch of `Batch(images, labels)`: images (N, 3, image_size,
image_size) uint8 pixels (after crop, resize and flip, rounded), channels_last, on the training
device, which the model normalises as its first op (model.py); labels int64 (N,). Train:
random-resized-crop + flip, each sample at most once per epoch, the short last batch dropped,
every rank the same number of steps. Val: resize only, every sample once, the short batch kept.
Imports no backend at import time (`dali` lazily), so the CPU tests run without DALI.
Reasons, and what resuming gives each backend: docs/loaders.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastalex.config import TrainConfig
from fastalex.loaders.contract import (
    CANVAS_SIDE_FACTOR,
    BackendMissing,
    Batch,
    Loader,
    Placement,
    Share,
    augment_for,
    canvas_px,
    loader_workers,
    open_pack,
    plan_share,
    rank_share,
    steps_per_epoch,
)
from fastalex.loaders.shm import sweep_stale_segments

__all__ = [
    "BackendMissing",
    "Batch",
    "CANVAS_SIDE_FACTOR",
    "Loader",
    "Placement",
    "Share",
    "augment_for",
    "canvas_px",
    "loader_workers",
    "open_pack",
    "plan_share",
    "rank_share",
    "steps_per_epoch",
    "BACKENDS",
    "build_loader",
    "continue_train_loader",
    "dali_usable",
]

BACKENDS = ("dali", "cpu", "resident")
GLOBAL_ORDER = ("cpu", "resident")  # train order base.epoch_order: (seed, epoch) only, any rank


def build_loader(
    cfg: TrainConfig,
    split: str,
    placement: Placement,
    first_epoch: int = 0,
    skip_samples: int = 0,
) -> Loader:
    """The configured backend's loader for `split` ("train" or "val").

    cfg.batch_size is the global batch: this process's batches hold placement.batch_share of it.
    `cfg.loader` is explicit (auto.decide or auto.loader_for settle `auto` first). `first_epoch`
    is the epoch the first `__iter__` yields (a resumed run passes the epoch it resumes at).
    `skip_samples` (train only; a multiple of the global batch) is where in that epoch's global
    order the first pass starts: it yields the remaining batches, `len()` stays the full count.
    `cpu` and `resident` start there without decoding the skipped samples, for any world size
    (`resplits`); `dali` consumes the skipped batches, right only with the world size that took
    them.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    manifest = open_pack(cfg, split, placement)
    sweep_stale_segments()  # what crashed processes left in shared memory, whatever the backend
    backend = cfg.loader
    if backend == "dali":
        try:
            from fastalex.loaders.dali import DaliLoader as chosen
        except ImportError as e:
            raise BackendMissing(
                f"--loader dali: nvidia.dali does not import here ({e}); install DALI "
                "(README, Installing on a GPU machine) or choose --loader cpu"
            ) from None
    elif backend == "cpu":
        from fastalex.loaders.cpu import CpuLoader as chosen
    elif backend == "resident":
        from fastalex.loaders.resident import ResidentLoader as chosen
    else:
        raise ValueError(
            f"loader {backend!r}: build_loader takes one of {BACKENDS} (auto.py settles `auto`)"
        )
    return chosen(cfg, split, manifest, placement, first_epoch, skip_samples)


def continue_train_loader(
    cfg: TrainConfig,
    placement: Placement,
    epoch: int,
    cursor: int,
    saved_world_size: int,
    saved_backend: str,
    build: Callable[..., Loader] | None = None,
) -> tuple[Loader, str]:
    """(train loader, "") that continues a run saved `cursor` global samples into `epoch` by
    `saved_world_size` processes with the `saved_backend` loader; or, where this loader cannot
    continue that epoch with each remaining sample once, (the next epoch's loader, why): the
    trainer then ends that epoch where it stopped. `cpu` and `resident` share one global order;
    `dali`'s lives in its pipeline (its own rank shares, its own shuffle). `build`: build_loader
    or a stand-in for it (the trainer's, which tests replace)."""
    build = build or build_loader
    why = ""
    if (
        cursor
        and saved_backend not in (cfg.loader, "auto")
        and not ({saved_backend, cfg.loader} <= set(GLOBAL_ORDER))
    ):
        why = f"the {cfg.loader} loader cannot continue the {saved_backend} loader's order"
    loader = build(cfg, "train", placement, epoch + bool(why), 0 if why else cursor)
    if cursor and not why and saved_world_size != placement.world_size and not loader.resplits:
        loader.close()
        why = (
            f"on {placement.world_size} processes (saved on {saved_world_size}) the "
            f"{cfg.loader} loader cannot split the rest of an epoch anew"
        )
        loader = build(cfg, "train", placement, epoch + 1)
    return loader, why


def dali_usable(device: torch.device) -> bool:
    """Whether `nvidia.dali` imports and supports this device (CPU-only mode on the CPU)."""
    try:
        from fastalex.loaders.dali import dali_available
    except ImportError:
        return False
    return dali_available(device)
