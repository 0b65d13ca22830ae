"""Several processes as one run: joining the process group, the ranks' votes, collectives whose
failure is a message naming them (never a hang), and the signals that stop a run.

`process_group` joins under a generation every node agrees on through torchrun's store (never a
node's own restart count) and agrees on the restarts so far; `agree` is the one vote of the loop
(stop, a non-finite step, a checkpoint due); `collective` turns a peer's death or silence into a
UserError naming the collective and the ranks that did not answer; `from_rank0` hands rank 0's
result (its probes) to ranks that wait longer than a collective. Imports torch and the runtime;
never a loader, the model or the run folder. Reasons and what each failure costs:
docs/distributed.md."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
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


JOIN_PREFIX = "fastalex/join"  # the join's keys in torchrun's store; each group then keys under
# f"fastalex/generation-{G}"
JOIN_POLL_S = 0.05  # rank 0's poll of the other ranks' asks and acks while joining
ROLL_CALL_S = 5.0  # after a failed collective, how long a rank waits for the others to answer
# Rank 0's `auto` probes (compile and bf16 at 227 px on a CPU under OMP_NUM_THREADS=1) can outlast
# the 300 s collective timeout while the other ranks wait; they wait this long (torch's own
# default collective timeout, 30 min) or --collective-timeout-s if longer
RANK0_ALONE_S = 1800.0
RESTART_HINT = "torchrun --max-restarts K restarts the group, or rerun with --resume --out RUN"

_joined: dict = {}  # "store": this attempt's prefixed store (roll calls), while a group is joined


def join_generation(store, rank: int, world_size: int, timeout_s: float) -> int:
    """The generation G every rank of this attempt agrees on, through torchrun's store.

    The store outlives restarts and holds every dead attempt's keys, and torchrun's restart
    count is each node's own (a healthy node restarted for a peer's failure keeps its count), so
    neither names the attempt alike on every node. What is sure: torchrun starts an attempt's
    processes only once every process of the previous one is gone (each agent stops its workers
    before the next rendezvous round, which needs every agent), and `store.add` hands each
    caller a value no other caller ever got. So rank 0 takes G = add(generation, 1), a number no
    earlier rank 0 held; rank r takes s = add(starts/r, 1), its own fresh number, posts it under
    asks/r and waits for answer/r/s. Rank 0 answers every value it sees under asks/r (a dead
    process's stale ask gets an answer nobody reads) until rank r acknowledges under ack/G/r. An
    answer under a fresh s can only come from a rank 0 that read this process's ask, i.e. the
    live one; an ack under a fresh G only from a live rank r: no stale key is ever taken for live.
    """
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        generation = store.add(f"{JOIN_PREFIX}/generation", 1)
        answered: dict[int, bytes] = {}
        waiting = set(range(1, world_size))
        while waiting:
            for other in sorted(waiting):
                if store.check([f"{JOIN_PREFIX}/ack/{generation}/{other}"]):
                    waiting.discard(other)
                elif store.check([f"{JOIN_PREFIX}/asks/{other}"]):
                    asked = store.get(f"{JOIN_PREFIX}/asks/{other}")
                    if answered.get(other) != asked:
                        answer = f"{JOIN_PREFIX}/answer/{other}/{asked.decode()}"
                        store.set(answer, str(generation))
                        answered[other] = asked
            if waiting and time.monotonic() > deadline:
                ranks = ", ".join(map(str, sorted(waiting)))
                raise RuntimeError(f"Timed out: rank {ranks} did not join")
            if waiting:
                time.sleep(JOIN_POLL_S)
        return generation
    start = store.add(f"{JOIN_PREFIX}/starts/{rank}", 1)
    store.set(f"{JOIN_PREFIX}/asks/{rank}", str(start))
    answer = f"{JOIN_PREFIX}/answer/{rank}/{start}"
    try:
        store.wait([answer], timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
    except RuntimeError:
        raise RuntimeError("Timed out: rank 0 did not answer the join") from None
    generation = int(store.get(answer))
    store.set(f"{JOIN_PREFIX}/ack/{generation}/{rank}", "1")
    return generation


@contextlib.contextmanager
def process_group(runtime: Runtime, timeout_s: float, restart_count: int):
    """The run's process group for the block (nothing in a single process, or where one is
    already joined): gloo on the CPU, NCCL on CUDA, every collective bounded by `timeout_s`.

    Yields the restarts so far as every rank agrees on them: the most of any node's torchrun
    restart count (`restart_count`, this node's) and of rank 0's earlier starts in torchrun's store
    (a node restarted only for a membership change counts 0 of its own). > 0: resume by itself.
    """
    joined = runtime.world_size > 1 and not dist.is_initialized()
    restarts = restart_count
    if joined:
        timeout = timedelta(seconds=timeout_s)
        with collective(runtime, "joining the process group", timeout_s, RESTART_HINT):
            store, _, _ = next(
                dist.rendezvous("env://", runtime.rank, runtime.world_size, timeout=timeout)
            )
            generation = join_generation(store, runtime.rank, runtime.world_size, timeout_s)
            prefixed = dist.PrefixStore(f"fastalex/generation-{generation}", store)
            dist.init_process_group(
                "nccl" if runtime.device.type == "cuda" else "gloo",
                store=prefixed,
                rank=runtime.rank,
                world_size=runtime.world_size,
                timeout=timeout,
            )
            _joined["store"] = prefixed
            most = torch.tensor([restart_count, generation - 1], device=runtime.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            restarts = int(most.max())
    try:
        yield restarts
    finally:
        if joined:
            _joined.clear()
            dist.destroy_process_group()


def silent_ranks(runtime: Runtime, wait_s: float) -> list[int] | None:
    """After a failed collective: the ranks that do not answer a roll call in this attempt's
    store within `wait_s` (dead, stopped or hung), or None where no store tells."""
    store = _joined.get("store")
    if store is None:
        return None
    keys = [f"roll-call/{rank}" for rank in range(runtime.world_size)]
    try:
        store.set(keys[runtime.rank], "1")
        deadline = time.monotonic() + wait_s
        while not all(present := [store.check([key]) for key in keys]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except RuntimeError:  # the store's host is gone too
        return None
    return [rank for rank, here in enumerate(present) if not here]


@contextlib.contextmanager
def collective(runtime: Runtime, what: str, timeout_s: float, continue_hint: str, limit: str = ""):
    """A collective whose failure (a peer died or went silent past the timeout) ends this
    process with a message naming it, the ranks that did not answer a roll call after it, and
    how to continue, never a wait. `limit` names the wait (default: --collective-timeout-s)."""
    try:
        yield
    except RuntimeError as e:
        if runtime.world_size == 1 or not is_collective_error(e):
            raise
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        silent = silent_ranks(runtime, min(ROLL_CALL_S, timeout_s))
        who = "another process"
        if silent:
            who = f"rank {', '.join(map(str, silent))}"
        message = (
            f"rank {runtime.rank}: {what} failed ({reason}): {who} died or did not answer "
            f"within {limit or f'--collective-timeout-s {timeout_s:g}'};"
            " see its log (a process the kernel's OOM killer ended leaves none: likely "
            f"memory). {continue_hint}"
        )
        if runtime.rank != 0:  # cli.py prints rank 0's errors only
            sys.stderr.write(f"error: {message}\n")
        raise UserError(message) from None


class Failed(NamedTuple):
    """What rank 0 sends in place of a result it could not compute."""

    error: str


def from_rank0(runtime: Runtime, compute: Callable, what: str, budget_s: float):
    """compute() on rank 0 alone, its result on every rank (it alone in a single process). The
    others wait up to `budget_s` (for rank 0's probes: longer than the collective timeout) in a
    gloo group of their own, inside `collective`: a silent rank 0 is one line naming `what`;
    rank 0's own error is raised on rank 0 and named on the others."""
    if runtime.world_size == 1 or not dist.is_initialized():
        return compute()
    box: list = [None]
    failed: Exception | None = None
    with collective(runtime, what, budget_s, RESTART_HINT, f"{budget_s:g} s"):
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=budget_s))
        try:
            if runtime.rank == 0:
                try:
                    box = [compute()]
                except Exception as e:  # the other ranks hear of it rather than wait
                    failed, box = e, [Failed(f"{type(e).__name__}: {e}")]
            dist.broadcast_object_list(box, src=0, group=group)
        finally:
            dist.destroy_process_group(group)
    if failed is not None:
        raise failed
    if isinstance(box[0], Failed):
        raise UserError(f"rank 0 could not settle {what}: {box[0].error}")
    return box[0]


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
