"""The `cpu` backend: pure PyTorch + simplejpeg over the shards, and the correctness reference.

Imports torch, numpy, decode.py and augment.py; never DALI. Works on any device. Decoding
(cfg.decode): worker processes (a persistent torch DataLoader, one batch of sample ids per task)
into a ring in shared memory, or threads of this process (decode.ThreadDecoder) into a ring in its
own (CUDA: pinned) memory. On the CPU device the workers (or threads) also crop, resize and flip
each image through OpenCV (cvcrop.py), so the ring holds finished uint8 batches and the main
process copies one out; on CUDA the ring holds canvases, which the main process copies to the
device and augments there (augment.py: one batched op, uint8 out).
Reasons and measurements: docs/loaders.md.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders.augment import ragged_sizes
from fastalex.loaders.base import BaseLoader
from fastalex.loaders.contract import Batch, Placement, loader_workers
from fastalex.loaders.decode import SampleTable, ShardDecoder, ThreadDecoder
from fastalex.loaders.host import one_thread_on_cpu
from fastalex.loaders.shm import (
    SharedSegment,
    free_shared_memory,
    map_segment,
    run_label,
    semaphores_named,
    shm_dir,
    sweep_stale_segments,
)
from fastalex.loaders.workers import end_with_this_process, worker_start_method
from fastalex.shards import Manifest

SHM_HEADROOM = 0.8  # share of the free shared memory this machine's rings may take
# What --decode auto runs: the mode the loader rows `cpu` (processes) and `cpu-threads` measured
# fastest (docs/loaders.md); auto also takes threads when a process ring cannot fit.
AUTO_DECODE = "processes"


def ring_slots(workers: int, prefetch: int) -> int:
    """Batches in the shared-memory ring. Slot reuse is safe: the DataLoader keeps prefetch *
    workers tasks outstanding, so batch i + slots is dispatched only after batch i + 2 was handed
    over, when batch i is long done."""
    return prefetch * workers + 2


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
            f"--prefetch {cfg.prefetch}, --batch-size {cfg.batch_size}) but {shm_dir()} has "
            f"{free / 2**20:.0f} MiB free for {placement.local_world_size} process(es); lower "
            "--loader-workers, --prefetch or --batch-size, or give the machine more shared "
            "memory (Docker: --shm-size=2g)"
        )
    return workers


def keep_as_is(task_result):
    """collate_fn for the DataLoader: worker results are already batches (no tensor conversion)."""
    return task_result


class _EpochBatches(torch.utils.data.Sampler):
    """The current epoch's tasks, (number, ids, uniforms), made as the DataLoader dispatches them;
    CpuLoader sets `batches` and `draws` (batch number -> its uniforms or None) before each
    pass."""

    def __init__(self):
        self.batches: list[np.ndarray] = []
        self.draws = lambda number: None

    def __iter__(self):
        for number, ids in enumerate(self.batches):
            yield number, ids, self.draws(number)

    def __len__(self) -> int:
        return len(self.batches)


class DecodeWorkerDied(RuntimeError):
    """A decode worker process ended mid-epoch (most often killed by the kernel's OOM killer)."""


class CpuLoader(BaseLoader):
    """Loader protocol over the shards: worker processes or threads decode, the device augments.
    `decode` names the mode running ("processes" or "threads")."""

    backend = "cpu"

    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        manifest: Manifest,
        placement: Placement,
        first_epoch: int = 0,
        skip_samples: int = 0,
    ):
        super().__init__(cfg, split, manifest, placement, first_epoch, skip_samples)
        self.table = SampleTable(Path(cfg.shards), manifest, split, cfg.image_size)
        height, width = self.table.canvas_px
        # On the CPU device the decode workers (or threads) crop too, through OpenCV: the ring
        # then holds finished (S, S) batches and the main process only copies one out.
        self.cropped = self.device.type == "cpu"
        # (height, width) of what a ring slot holds: finished batches or canvases.
        self.slot_px = (cfg.image_size, cfg.image_size) if self.cropped else (height, width)
        batch_bytes = self.batch_size * self.slot_px[0] * self.slot_px[1] * 3
        self.decode, why = cfg.decode, ""
        if self.decode == "auto":
            self.decode, why = AUTO_DECODE, " (auto)"
        if self.decode == "processes":
            try:
                workers = fit_ring(cfg, placement, batch_bytes, self.train)
            except UserError as full:
                if cfg.decode != "auto":
                    raise
                self.decode, why = "threads", f" (auto: no room for processes; {full})"
        if self.decode == "threads":
            self._start_threads(cfg, placement, height, width)
        else:
            self._start_processes(cfg, placement, workers, height, width)
        if self.cropped:
            self.summary += f", cropping to {cfg.image_size} px there (OpenCV)"
        self.summary += why

    def _start_threads(self, cfg: TrainConfig, placement: Placement, height: int, width: int):
        """Decode threads and a ring of prefetch + 1 canvases: while the step uses one, the
        threads fill the next `prefetch`."""
        threads = loader_workers(cfg, placement)
        self.threads = ThreadDecoder(self.table, threads, self.augment if self.cropped else None)
        slots = cfg.prefetch + 1
        pinned = self.device.type == "cuda"  # copied to the device straight from the ring
        self.canvases = torch.empty(
            (slots, self.batch_size, height, width, 3), dtype=torch.uint8, pin_memory=pinned
        )
        # The threads crop each canvas into the same slot of this ring (the CPU device only).
        self.outputs = (
            torch.empty((slots, self.batch_size, *self.slot_px, 3), dtype=torch.uint8)
            if self.cropped
            else None
        )
        self._copied: list[torch.cuda.Event | None] = [None] * slots  # CUDA: slot's copy done
        self._pending: deque = deque()  # (slot, futures) of the batches started, oldest first
        self.summary = (
            f"cpu: {threads} decode threads, {height} x {width} canvases, {slots}-batch ring"
        )

    def _start_processes(
        self, cfg: TrainConfig, placement: Placement, workers: int, height: int, width: int
    ):
        """Decode worker processes and their ring in shared memory."""
        slots = ring_slots(workers, cfg.prefetch)
        self.run = run_label(cfg.out)
        self.ring = SharedSegment(self.run, (slots, self.batch_size, *self.slot_px, 3))
        self.canvases = torch.from_numpy(map_segment(self.ring.path, self.ring.shape))
        self.outputs = self.canvases if self.cropped else None  # the workers' finished batches
        self.summary = (
            f"cpu: {workers} decode workers, {height} x {width} canvases, "
            f"{slots}-batch shared-memory ring {self.ring.path.name}"
        )
        self._tasks = _EpochBatches()
        self._loader = DataLoader(
            ShardDecoder(
                self.table,
                (str(self.ring.path), self.ring.shape),
                self.augment if self.cropped else None,
            ),
            batch_size=None,  # each task is a whole batch
            sampler=self._tasks,
            collate_fn=keep_as_is,
            num_workers=workers,
            prefetch_factor=cfg.prefetch,
            persistent_workers=True,
            multiprocessing_context=worker_start_method(),
            worker_init_fn=end_with_this_process((str(self.ring.path),)),
        )

    def plan_pass(self) -> tuple[int, list[int | None], list[np.ndarray]]:
        """The next pass: its epoch, the global step of each batch (None for val), and each
        batch's global sample ids. Train: this rank's slices of the epoch's global order from the
        first step not skipped; val: this rank's share in order."""
        epoch, first = self.next_pass()
        if self.train:
            plan = self.train_plan(epoch, first)
            return epoch, [step for step, _ in plan], [ids.numpy() for _, ids in plan]
        order = np.arange(self.share.start, self.share.stop)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return epoch, [None] * len(batches), batches

    def uniforms(self, epoch: int, step: int | None, n: int) -> torch.Tensor | None:
        """The augmentation draws of this rank's n samples of global step `step` of `epoch`, on
        the CPU: its slice of the global batch's (None for val, which draws nothing)."""
        if step is None:
            return None
        generator = self.step_generator(epoch, step)
        return self.augment.uniforms(n, generator, self.rank * self.batch_size, self.global_batch)

    def __iter__(self):
        epoch, steps, batches = self.plan_pass()

        def draws(number: int) -> np.ndarray | None:
            """What batch `number`'s task carries: its draws, where the workers crop."""
            if not self.cropped:
                return None
            rows = self.uniforms(epoch, steps[number], len(batches[number]))
            return None if rows is None else rows.numpy()

        if self.decode == "threads":
            decoded = self._decoded_in_threads(batches, draws)
        else:
            self._tasks.batches, self._tasks.draws = batches, draws
            with semaphores_named(self.run):  # the workers' queues, on the first pass
                decoded = iter(self._loader)
        try:
            yield from self._batches(epoch, steps, batches, decoded)
        finally:
            if self.decode == "threads":
                decoded.close()  # stops the threads' work for this pass now

    def _batches(self, epoch, steps, batches, decoded):
        for step, ids in zip(steps, batches):
            try:
                slot, sizes = next(decoded)
                labels = self.table.labels[ids]
                if self.cropped:  # (N, S, S, 3) finished: copied out, since the slot is reused
                    with one_thread_on_cpu(self.device):  # no idle OpenMP threads spinning after
                        images = self.outputs[slot, : len(ids)].clone()
                    batch = Batch(images.permute(0, 3, 1, 2), labels)  # channels_last
                else:
                    images = self.canvases[slot, : len(ids)]  # (N, H, W, 3) uint8, in place
                    uniforms = self.uniforms(epoch, step, len(ids))
                    batch = self._augment(images, torch.from_numpy(sizes), labels, uniforms)
                if self.decode == "threads" and self.device.type == "cuda":
                    self._copied[slot] = torch.cuda.Event()
                    self._copied[slot].record()  # after the copy out of the pinned slot
            except RuntimeError as error:  # the DataLoader's, on a dead worker (also by SIGCHLD)
                if "DataLoader worker" not in str(error):
                    raise
                raise DecodeWorkerDied(
                    f"cpu loader: a decode worker died ({error}). The likely cause is memory: "
                    "the kernel's OOM killer ends the largest process first; free memory, or "
                    "lower --loader-workers, --prefetch or --batch-size"
                ) from error
            yield batch

    def _decoded_in_threads(self, batches: list[np.ndarray], draws):
        """(slot, (N, 2) sizes, or None once cropped) of each batch in turn, the threads
        `prefetch` batches ahead (`draws`: batch number -> its uniforms, as the workers get).
        Batch i goes to slot i % slots; it is started once batch i - 1 was handed over (and, on
        CUDA, its copy out of that slot has run), so no slot is written while it is read."""
        slots = len(self.canvases)
        self._drop_pending()  # what an abandoned pass left running
        pending = self._pending

        def start(number: int) -> None:
            slot = number % slots
            if self._copied[slot] is not None:
                self._copied[slot].synchronize()  # CUDA sync point: only if the copy still runs
                self._copied[slot] = None
            out = None if self.outputs is None else self.outputs[slot].numpy()
            futures = self.threads.submit(
                self.canvases[slot].numpy(), batches[number], out, draws(number)
            )
            pending.append((slot, futures))

        try:
            for number in range(min(slots - 1, len(batches))):
                start(number)
            for number in range(len(batches)):
                if number + slots - 1 < len(batches):
                    start(number + slots - 1)
                slot, futures = pending.popleft()
                yield slot, self.threads.result(futures)
        finally:  # a pass ended early or by an error: no thread may still write into a slot
            self._drop_pending()

    def _drop_pending(self) -> None:
        while self._pending:
            self.threads.cancel(self._pending.popleft()[1])

    def _augment(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        labels: torch.Tensor,
        uniforms: torch.Tensor | None,
    ) -> Batch:
        """The device's crop (CUDA): the canvases copied over and augmented there; the boxes and
        flips from `uniforms` (`self.uniforms`), on the CPU."""
        boxes, flips = self.augment.boxes(sizes[:, 0], sizes[:, 1], uniforms)
        sizes = ragged_sizes(sizes, images.shape[1:3])
        # A process ring's slot is copied into pinned memory (then free); a thread ring is pinned
        # already (pin_memory returns it) and guarded by _copied.
        images = images.pin_memory().to(self.device, non_blocking=True)
        boxes = boxes.pin_memory().to(self.device, non_blocking=True)
        flips = None if flips is None else flips.pin_memory().to(self.device, non_blocking=True)
        sizes = None if sizes is None else sizes.pin_memory().to(self.device, non_blocking=True)
        labels = labels.pin_memory().to(self.device, non_blocking=True)
        out = self.augment.apply(images, boxes, flips, sizes)  # (N, 3, S, S) u8 channels_last
        return Batch(out, labels)

    def close(self) -> None:
        threads = getattr(self, "threads", None)
        if threads is not None:
            self._drop_pending()
            threads.close()
            self.threads = None
        loader, self._loader = getattr(self, "_loader", None), None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            # Private, on purpose: persistent workers otherwise live until the DataLoader is
            # garbage-collected, and torch has no public way to stop them now.
            # test_close_stops_the_decode_workers pins this behaviour.
            iterator._shutdown_workers()
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.unlink()
        sweep_stale_segments()  # and what processes that died before this one left
