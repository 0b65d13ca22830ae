"""Several processes as one run: joining the process group, the ranks' votes, collectives whose
failure is a message naming them (never a hang), and the signals that stop a run.

`join_process_group` keys every attempt of a run under its own store prefix; `agree` is the one
vote of the loop (stop, a non-finite step, a checkpoint due); `collective` turns a peer's death or
silence into a UserError naming the collective. Imports torch and the runtime; never a loader,
the model or the run folder. Reasons and what each failure costs: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from fastalex.errors import UserError
from fastalex.runtime import Runtime


class Agreed(NamedTuple):
    stop: bool  # some rank was signalled
    bad_step: int | None  # the earliest non-finite step any rank saw (None: none)
    save: bool  # some rank's checkpoint clock is due


def agree(runtime: Runtime, stop: bool, bad_step: int | None = None, save: bool = False) -> Agreed:
    """What every rank decides at a log point or an epoch end, from each rank's own view.

    One MIN all-reduce under DDP (a collective: every rank must call it at the same point); the
    values as given in a single process. Every stop and periodic-checkpoint decision of the loop
    goes through here.
    """
    if runtime.world_size == 1:
        return Agreed(stop, bad_step, save)
    flags = torch.tensor(
        [math.inf if bad_step is None else bad_step, 0.0 if stop else 1.0, 0.0 if save else 1.0],
        dtype=torch.float64,
        device=runtime.device,
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    bad, keep_going, no_save = flags.tolist()
    return Agreed(keep_going == 0.0, None if math.isinf(bad) else int(bad), no_save == 0.0)


def is_collective_error(error: BaseException) -> bool:
    """A failure of the process group (a peer died, a timeout), not of the code."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("gloo", "NCCL", "Connection closed", "Timed out", "timed out")
    )


@contextlib.contextmanager
def process_group(runtime: Runtime, timeout_s: float, attempt: int):
    """The run's process group for the block (nothing in a single process, or where one is
    already joined): gloo on the CPU, NCCL on CUDA, every collective bounded by `timeout_s`."""
    joined = runtime.world_size > 1 and not dist.is_initialized()
    if joined:
        timeout = timedelta(seconds=timeout_s)
        # torchrun's store (MASTER_ADDR/PORT from its env) outlives a restart and still holds the
        # dead attempt's process-group keys: a restarted rank could read a dead peer's address
        # ("connectFullMesh ... connection refused"), so each attempt keys under its own prefix
        store, _, _ = next(
            dist.rendezvous("env://", runtime.rank, runtime.world_size, timeout=timeout)
        )
        dist.init_process_group(
            "nccl" if runtime.device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"fastalex/attempt-{attempt}", store),
            rank=runtime.rank,
            world_size=runtime.world_size,
            timeout=timeout,
        )
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


@contextlib.contextmanager
def collective(runtime: Runtime, what: str, timeout_s: float, continue_hint: str):
    """A collective whose failure (a peer died or went silent past the timeout) ends this
    process with a message naming it and how to continue, never a wait."""
    try:
        yield
    except RuntimeError as e:
        if runtime.world_size == 1 or not is_collective_error(e):
            raise
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        message = (
            f"rank {runtime.rank}: {what} failed ({reason}): another process died or "
            f"did not answer within --collective-timeout-s {timeout_s:g};"
            " see its log (a process the kernel's OOM killer ended leaves none: likely "
            f"memory). {continue_hint}"
        )
        if runtime.rank != 0:  # cli.py prints rank 0's errors only
            sys.stderr.write(f"error: {message}\n")
        raise UserError(message) from None


class StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads after each step; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
