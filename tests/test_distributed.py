"""Several processes as one run (fastalex/distributed.py): the join every node agrees on, rank 0's
long decisions, and the failures of a two-node run (two torchrun launchers on localhost, c10d
rendezvous, one process each: the killed and the silent rank). hue_pack, global batch 64: 4 steps
per epoch.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import TINY_CPU, torchrun_command, without_timing

from fastalex.distributed import JOIN_PREFIX, from_rank0, join_generation, process_group
from fastalex.errors import UserError
from fastalex.plot import read_metrics
from fastalex.runtime import Placement, Runtime

# The tiny run on the cpu loader, 2 epochs: no probe, no cached figure either
RUN = (*TINY_CPU, "--batch-size", "64", "--epochs", "2")
WAIT_S = 150  # a bound on every wait of a two-node test (~60-90 s on the 2-core box)


def join_all(port: int, world_size: int, first: int = 0) -> dict[int, int]:
    """{rank: generation} of `world_size` ranks joining through the store at `port` in threads,
    each with its own client as processes have, rank `first` started first (the others 0.2 s
    later)."""
    found: dict[int, int] = {}

    def join(rank):
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        found[rank] = join_generation(store, rank, world_size, timeout_s=10)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(world_size)]
    threads[first].start()
    time.sleep(0.2)
    for rank, thread in enumerate(threads):
        if rank != first:
            thread.start()
    for thread in threads:
        thread.join(20)
    return found


def test_a_restarted_group_agrees_on_a_fresh_generation_despite_a_dead_attempts_keys():
    """The store still holds a dead attempt's keys (a generation, a rank 1 that asked twice and
    was answered once): whichever rank starts first, every live rank joins one fresh generation,
    never a stale answer, on every restart."""
    from helpers import free_port

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    assert set(join_all(port, 3).values()) == {1}
    # a rank 1 that asked and died before rank 0 answered, with a stale answer it never read
    store.add(f"{JOIN_PREFIX}/starts/1", 1)
    store.set(f"{JOIN_PREFIX}/asks/1", "2")
    store.set(f"{JOIN_PREFIX}/answer/1/1", "7")
    for first, expected in ((1, 2), (2, 3), (0, 4)):
        assert join_all(port, 3, first) == {0: expected, 1: expected, 2: expected}


def runtime_of(rank: int, world_size: int = 2) -> Runtime:
    return Runtime(Placement(torch.device("cpu"), rank, world_size), None, False, False)


def rank0_decides_slowly(rank: int, port: int, compute_s: float, fail: bool, results) -> None:
    """Spawned rank of a group whose collectives time out after 2 s: rank 0 computes for
    `compute_s` (failing if `fail`) while rank 1 waits in from_rank0 with a budget of 20 s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    runtime = runtime_of(rank)

    def compute():
        time.sleep(compute_s)
        if fail:
            raise ValueError("no probe fits")
        return {"amp": "bf16"}

    with process_group(runtime, 2.0, 0):
        try:
            results[rank] = from_rank0(runtime, compute, "the `auto` options", 20.0)
        except (UserError, ValueError) as e:
            results[rank] = f"{type(e).__name__}: {e}"


@pytest.mark.slow  # spawns two ranks
@pytest.mark.parametrize("fail", [False, True])
def test_ranks_wait_for_rank0s_probes_past_the_collective_timeout(fail):
    """Rank 0 decides for 4 s, twice the collective timeout: rank 1 waits (its own budget) and
    gets the decision; a failure on rank 0 reaches rank 1 as one line naming it."""
    import torch.multiprocessing as mp
    from helpers import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank0_decides_slowly, (free_port(), 4.0, fail, results), nprocs=2)
        got = dict(results)
    if fail:
        assert got[0] == "ValueError: no probe fits"
        assert got[1] == (
            "UserError: rank 0 could not settle the `auto` options: ValueError: no probe fits"
        )
    else:
        assert got == {0: {"amp": "bf16"}, 1: {"amp": "bf16"}}


class Node:
    """One torchrun launcher (a node) of a two-node run; its output drained by threads."""

    def __init__(self, launch, pack, out, port: int, *args):
        launcher = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d")
        launcher += ("--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "2")
        command = torchrun_command(pack, out, *args, launcher=launcher, options=RUN)
        self.job = launch(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [
            threading.Thread(target=self.drain, args=(name,), daemon=True) for name in self.lines
        ]
        for reader in self.readers:
            reader.start()

    def drain(self, name: str) -> None:
        for line in getattr(self.job.process, name):
            self.lines[name].append(line)

    def text(self, name: str = "stdout") -> str:
        return "".join(self.lines[name])

    def worker(self) -> tuple[int, int] | None:
        """(rank, pid) of this node's worker, once started."""
        from helpers import rank_pids

        found = rank_pids(self.job.process.pid)
        return next(iter(found.items())) if found else None

    def finish(self, timeout_s: float) -> int:
        try:
            code = self.job.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.job.kill_group()
            pytest.fail(f"a node ran past {timeout_s} s:\n{self.text()}\n{self.text('stderr')}")
        for reader in self.readers:
            reader.join(10)
        return code


def wait_until(condition, timeout_s: float, what: str, nodes):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        if time.monotonic() > deadline:
            output = "\n".join(n.text() + n.text("stderr")[-3000:] for n in nodes)
            pytest.fail(f"no {what} within {timeout_s} s:\n{output}")
        time.sleep(0.05)
    return found


def two_nodes(launch, pack, out, *args) -> tuple[list[Node], dict[int, int]]:
    """Two launchers of one process each, started; returns them and {rank: worker pid} once the
    first periodic checkpoint (step 2) is written."""
    from helpers import free_port

    port = free_port()
    nodes = [Node(launch, pack, out, port, "--checkpoint-every", "2", *args) for _ in range(2)]
    wait_until(
        lambda: any("checkpoint step-00000002.pt" in n.text() for n in nodes),
        WAIT_S,
        "first checkpoint",
        nodes,
    )
    wait_until(lambda: all(n.worker() for n in nodes), 10, "workers", nodes)
    return nodes, dict(n.worker() for n in nodes)


def kill_with_its_workers(pid: int) -> None:
    """SIGKILL a rank and its loader's processes (a killed container takes them along: they
    would hold the output pipes open)."""
    from helpers import descendants

    below = descendants(pid)
    for each in [pid, *below]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def sigterm_pending(pid: int) -> bool:
    """Whether a (stopped) process has a SIGTERM waiting: its torchrun agent began stopping it."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return bool(int(fields["ShdPnd"], 16) >> (signal.SIGTERM - 1) & 1)


def killed_once_its_agent_stops_it(pid: int, nodes) -> None:
    """A stopped worker whose node restarts for the new round (a membership change: torchrun
    counts no restart there): SIGKILL it, with its loader's processes, once its agent has sent
    SIGTERM (the agent itself kills it 30 s later)."""
    wait_until(lambda: sigterm_pending(pid), 60, "SIGTERM from its agent", nodes)
    kill_with_its_workers(pid)


@pytest.mark.slow
def test_a_node_whose_worker_is_killed_restarts_and_the_run_gives_the_uninterrupted_rows(
    hue_pack, tmp_path, launch, straight_ddp_rows
):
    """SIGKILL rank 1's worker after the checkpoint of step 2 while rank 0's is busy (stopped
    here: it sees no failure, as when it evaluates or writes): only rank 1's node counts a
    restart (TORCHELASTIC_RESTART_COUNT 1 there, 0 on rank 0's node, restarted for the new
    round), yet both join one generation, agree to resume from rank 0's newest checkpoint, and
    finish with the rows of an uninterrupted run."""
    out = tmp_path / "run"
    nodes, workers = two_nodes(launch, hue_pack, out)
    os.kill(workers[0], signal.SIGSTOP)
    kill_with_its_workers(workers[1])
    killed_once_its_agent_stops_it(workers[0], nodes)
    assert_resumed_to_the_rows(nodes, out, straight_ddp_rows)


@pytest.mark.slow
def test_a_silent_rank_is_named_within_the_collective_timeout_and_the_restart_resumes(
    hue_pack, tmp_path, launch, straight_ddp_rows
):
    """SIGSTOP rank 1's worker after the checkpoint of step 2: rank 0 stops within
    --collective-timeout-s naming the collective and rank 1; its node restarts (count 1), the
    other restarts for the new round (count 0) once the stopped worker is gone, and the run
    ends with the uninterrupted rows."""
    out = tmp_path / "run"
    nodes, workers = two_nodes(launch, hue_pack, out, "--collective-timeout-s", "10")
    os.kill(workers[1], signal.SIGSTOP)
    stopped = time.monotonic()
    pattern = re.compile(r"rank 0: (the [^\n]*) failed \([^\n]*\): rank 1 died or did not answer")
    named = wait_until(
        lambda: next(filter(None, (pattern.search(n.text("stderr")) for n in nodes)), None),
        60,
        "error naming rank 1",
        nodes,
    )
    assert time.monotonic() - stopped < 10 + 5 + 20  # timeout, roll call, a slow step (loaded box)
    assert named.group(1) in ("the gradient all-reduce of a step", "the stop vote at a log point")
    killed_once_its_agent_stops_it(workers[1], nodes)
    assert_resumed_to_the_rows(nodes, out, straight_ddp_rows)


def assert_resumed_to_the_rows(nodes, out, rows) -> None:
    """Both nodes end with exit 0, a rank said it resumed, and the run's rows (timing aside) are
    `rows`, the uninterrupted run's."""
    codes = [node.finish(WAIT_S) for node in nodes]
    output = "".join(n.text() + n.text("stderr") for n in nodes)
    assert codes == [0, 0], output
    assert "resuming" in output, output
    assert without_timing(read_metrics(out)) == rows
