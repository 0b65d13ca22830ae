"""The `cpu` backend: pure PyTorch + simplejpeg over the shards, and the correctness reference.

Imports torch, numpy, decode.py, augment.py and host.py; never DALI. Works on any device: worker
processes (a persistent torch DataLoader, one batch of sample ids per task) decode into a ring of
uint8 canvases in shared memory; the main process copies a canvas to the device and augments it
there (augment.py: crop + resize + flip + normalise in one batched op). Reasons and measurements:
docs/loaders.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Batch, Placement, loader_workers
from fastalex.loaders.augment import ragged_sizes
from fastalex.loaders.base import BaseLoader
from fastalex.loaders.decode import SampleTable, ShardDecoder, worker_start_method
from fastalex.loaders.host import keep_large_blocks_in_heap, one_thread_on_cpu
from fastalex.shards import Manifest

SHM_DIR = "/dev/shm"  # torch's shared CPU tensors live here (Docker's default size: 64 MB)
SHM_HEADROOM = 0.8  # share of the free shared memory this machine's rings may take


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


class CpuLoader(BaseLoader):
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
        super().__init__(cfg, split, manifest, placement, first_epoch)
        self.table = SampleTable(Path(cfg.shards), manifest, split, cfg.image_size)
        height, width = self.table.canvas_px
        batch_bytes = cfg.batch_size * height * width * 3
        workers = fit_ring(cfg, placement, batch_bytes, self.train)
        slots = ring_slots(workers, cfg.prefetch)
        self.summary = (
            f"cpu: {workers} decode workers, {height} x {width} canvases, "
            f"{slots}-batch shared-memory ring"
        )
        canvases = torch.empty((slots, cfg.batch_size, height, width, 3), dtype=torch.uint8)
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

    def plan_epoch(self) -> tuple[list[np.ndarray], torch.Generator]:
        """The next epoch's batches of global sample ids, and the generator for its augmentation."""
        start, stop, steps, _ = self.share
        _, generator = self.next_epoch()
        if self.train:
            order = torch.randperm(stop - start, generator=generator).numpy() + start
            order = order[: steps * self.batch_size]
        else:
            order = np.arange(start, stop)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches, generator

    def __iter__(self):
        batches, generator = self.plan_epoch()
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
            images = images.pin_memory().to(self.device, non_blocking=True)  # the slot is free
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
            # Private, on purpose: persistent workers otherwise live until the DataLoader is
            # garbage-collected, and torch has no public way to stop them now.
            # test_close_stops_the_decode_workers pins this behaviour.
            iterator._shutdown_workers()
