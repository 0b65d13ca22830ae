"""Counting what a run reports: top-k hits, the `EpochMeter` (an epoch pass's sums, timed window
and loader wait), count-weighted totals, and the run directory's JSON / JSONL files.

Every rate is a ratio of summed counts, never a mean of per-batch means. Values stay on the device
until a log point or an epoch end asks for them: one host sync each, never per step.

Imports torch and the standard library only (no data, model or config code). Writes files
atomically (temporary name, then os.replace). Reasons: docs/training.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def count_topk(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Hits at each k: (len(ks),) int64 on the logits' device, no sync. k above the class count
    counts every sample (top-5 of a 4-class problem is 100 %)."""
    largest = min(max(ks), logits.shape[1])
    top = logits.topk(largest, dim=1).indices  # (N, largest), best first
    hits = (top == labels[:, None]).cumsum(dim=1)  # (N, largest): 1 from the label's rank on
    return torch.stack([hits[:, min(k, largest) - 1].sum() for k in ks])


class StepWindow:
    """Per-step (loss sum, correct) of the train loop, held on the device between log points.

    `add` is two device-side copies (no sync); `drain` is one device-to-host copy of the whole
    window, the only place the loop waits for the device. Keeping every step (not a running sum)
    lets a NaN be pinned to its step and keeps float sums independent of where a window ends, so a
    resumed run adds exactly what an uninterrupted one adds.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.values = torch.zeros(size, 2, dtype=torch.float64, device=device)  # (size, 2)
        self.count = 0

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        self.values[self.count, 0] = loss_sum
        self.values[self.count, 1] = correct
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count == len(self.values)

    def drain(self) -> list[tuple[float, float]]:
        """The window's rows on the host (CUDA sync point), oldest first; the window is emptied."""
        rows = [tuple(row) for row in self.values[: self.count].tolist()]
        self.count = 0
        return rows


class LoaderWait:
    """How long the device had nothing to do because the next batch was not ready.

    Used as ``with wait: batch = next(batches)`` around each fetch. On the CPU the step runs on the
    host, so the host time blocked in next() is the wait. On CUDA that would mislead: while the
    GPU still works through queued steps, a blocked host costs nothing. So two CUDA events bracket
    the fetch on the current stream; on the GPU's timeline the gap between them is zero while
    queued work covers the fetch, and otherwise the time the GPU sat idle waiting for the host to
    hand it the batch (work the loader itself queues, e.g. its crop/resize, counts as waiting:
    the model was not running). The events are read in `seconds`, after the loop's final sync;
    no sync per step.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_s = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._started: float | torch.cuda.Event | None = None

    def __enter__(self) -> LoaderWait:
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.events.append((self._started, ended))
        else:
            self.host_s += time.perf_counter() - self._started

    def seconds(self) -> float:
        """The wait so far (CUDA: waits for the recorded events, a sync point)."""
        gaps_ms = 0.0
        for started, ended in self.events:
            ended.synchronize()
            gaps_ms += started.elapsed_time(ended)
        return self.host_s + gaps_ms / 1000


@dataclass
class EpochSums:
    """An epoch's train totals so far, GLOBAL: summed over every rank (the loader wait is the
    ranks' mean), so a run resumed on any number of processes adds them exactly once."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    steps: int = 0  # steps of the epoch taken (the same on every rank)
    train_s: float = 0.0
    timed_s: float = 0.0  # train_s less the warm-up steps'
    timed_samples: int = 0  # samples of the timed steps, all ranks
    loader_wait_s: float = 0.0  # time the model waited on the loader

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict | None) -> EpochSums:
        """From a checkpoint's partial-epoch state (None: nothing carried). fastalex 0.1 nested
        the sums under "totals" (one process's: right for the runs that could resume them)."""
        state = dict(state or {})
        state.update(state.pop("totals", {}))
        return cls(**state)


class EpochMeter:
    """One epoch pass of one process: its sums, the timed window and the loader wait.

    The loop reads ``fetch -> step -> add``; `drain` at a log point moves the device-side window
    to host sums (a sync) and `all_reduced` gives the epoch so far as `EpochSums` (a collective).
    The sums a resumed epoch carried in (`merge`) are global and added once, after the reduce.
    Time spent on other work inside the pass (a checkpoint) is left out with `exclude`.
    """

    def __init__(
        self, device: torch.device, window_steps: int, batch_size: int, world_size: int = 1
    ) -> None:
        self.device, self.batch_size, self.world_size = device, batch_size, world_size
        self.window = StepWindow(window_steps, device)
        self.wait = LoaderWait(device)
        self.carried = EpochSums()
        self.loss_sum, self.correct, self.samples = 0.0, 0.0, 0  # this process, this pass
        self.steps = 0  # steps of the epoch drained into the sums, carried ones included
        self.taken = 0  # steps this pass has taken
        self.first_bad_step: int | None = None  # step within the epoch of the first NaN/inf
        self.started = self.timed_from = self.ended = 0.0
        self.timed_after = 0  # steps of this pass before the timed window
        self.excluded_s = self.excluded_timed_s = 0.0
        self.timing = False  # inside the timed window

    def merge(self, carried: EpochSums) -> None:
        self.carried, self.steps = carried, carried.steps

    def start(self, timed: bool) -> float:
        """The pass starts (a sync); `timed`: no warm-up steps in it."""
        _synchronize(self.device)
        self.started = self.timed_from = time.perf_counter()
        self.timing = timed
        return self.started

    def fetch(self, batches):
        """The next batch, its wait counted, with the host RNG fenced off: whatever a loader
        draws from torch's global generator never shifts the dropout stream, so a resumed run
        draws the masks an uninterrupted one draws."""
        with self.wait, torch.random.fork_rng(devices=[]):
            return next(batches)

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        self.window.add(loss_sum, correct)
        self.taken += 1

    def begin_timed(self) -> float:
        """End of the warm-up steps (a sync): the timed window and the loader wait start here.
        Returns the warm-up's seconds."""
        _synchronize(self.device)
        self.timed_from, self.timed_after = time.perf_counter(), self.taken
        self.timing = True
        self.wait = LoaderWait(self.device)
        return self.timed_from - self.started

    def drain(self) -> list[tuple[float, float]]:
        """The window's (loss sum, correct) rows, added to the host sums (a sync point)."""
        rows = self.window.drain()
        for loss_sum, correct in rows:
            if self.first_bad_step is None and not math.isfinite(loss_sum):
                self.first_bad_step = self.steps
            self.loss_sum += loss_sum
            self.correct += correct
            self.samples += self.batch_size
            self.steps += 1
        return rows

    def exclude(self, seconds: float) -> None:
        self.excluded_s += seconds
        if self.timing:
            self.excluded_timed_s += seconds

    def stop(self) -> float:
        _synchronize(self.device)
        self.ended = time.perf_counter()
        return self.ended

    @property
    def timed_steps(self) -> int:
        return max(0, self.taken - self.timed_after)

    def all_reduced(self) -> EpochSums:
        """The epoch so far, summed over the ranks (a collective), carried part added once."""
        local = torch.tensor(
            [self.loss_sum, self.correct, self.samples, self.wait.seconds()],
            dtype=torch.float64,
            device=self.device,
        )
        loss_sum, correct, samples, wait_s = all_reduce_sum(local).tolist()
        now = self.ended or time.perf_counter()
        carried, timed = self.carried, self.timed_steps
        return EpochSums(
            loss_sum=carried.loss_sum + loss_sum,
            correct=carried.correct + correct,
            samples=carried.samples + int(samples),
            steps=self.steps,
            train_s=carried.train_s + now - self.started - self.excluded_s,
            timed_s=carried.timed_s
            + (now - self.timed_from - self.excluded_timed_s if timed else 0.0),
            timed_samples=carried.timed_samples + timed * self.batch_size * self.world_size,
            loader_wait_s=carried.loader_wait_s + wait_s / self.world_size,
        )

    def state_dict(self) -> dict:
        """The partial-epoch state a checkpoint carries (a collective)."""
        return self.all_reduced().state_dict()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the DDP ranks (in place; unchanged without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def percent(count: float, total: float) -> float:
    return 100.0 * count / total if total else float("nan")


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if not ordered:
        return float("nan")
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def write_json(path: Path, obj: object) -> None:
    """`obj` as indented JSON at `path`, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """`rows` as JSON lines at `path`, atomically (replacing what was there)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    """One more line; a line is written in one call, so a reader never sees half a row."""
    with open(path, "a") as file:
        file.write(json.dumps(row) + "\n")
