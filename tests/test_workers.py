"""Decode workers never outlive the process that owns them: killed by SIGKILL, it leaves no worker,
no forkserver, no resource tracker and nothing in shared memory named for its run.
(Which start method they take is tested beside the loaders, in test_loaders.py.)"""

from __future__ import annotations

import os
import secrets
import signal
import sys

import pytest
from conftest import descendants, process_starts, still_running

from fastalex.loaders.shm import shm_dir, sweep_stale_segments

pytest.importorskip("simplejpeg", reason="the cpu loader's decode workers decode with simplejpeg")

# The owner: a rank alone in its gloo group (so its workers start by forkserver), decoding.
OWNER = """
import sys, time, torch, torch.distributed as dist
from fastalex.config import TrainConfig
from fastalex.loaders import Placement, build_loader
shards, out, store = sys.argv[1:4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
cfg = TrainConfig(
    shards=shards, out=out, loader="cpu", decode="processes", loader_workers=2, batch_size=20
)
loader = build_loader(cfg, "train", Placement(torch.device("cpu")))
batches = iter(loader)
next(batches)
print("decoding", flush=True)
time.sleep(300)
"""
END_WITHIN_S = 10  # the watch reacts at once; this is for a loaded machine


@pytest.mark.slow
def test_a_sigkilled_owner_leaves_no_worker_and_nothing_in_shared_memory(
    coded_pack, tmp_path, launch
):
    run = f"owner_{secrets.token_hex(4)}"
    job = launch(
        [sys.executable, "-c", OWNER, coded_pack.path, tmp_path / run, tmp_path / "store"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = job.process.stdout.readline()
    if line != "decoding\n":
        _, stderr = job.communicate(60)
        pytest.fail(f"the owner did not start decoding: {line!r}\n{stderr[-4000:]}")
    below = process_starts(descendants(job.process.pid))
    made = sorted(path.name for path in shm_dir().glob(f"*fastalex-{run}-*"))
    assert len(below) >= 3, still_running(
        below
    )  # the forkserver, two workers (and the resource tracker)
    assert any(name.startswith("fastalex-") for name in made), made  # the ring
    assert any(name.startswith("sem.fastalex-") for name in made), made  # the queues' locks
    os.kill(job.process.pid, signal.SIGKILL)
    try:
        left = still_running(below, within_s=END_WITHIN_S)
        assert not left, f"still running {END_WITHIN_S} s after their owner was killed: {left}"
        remaining = sorted(path.name for path in shm_dir().glob(f"*fastalex-{run}-*"))
        assert not remaining, remaining
    finally:  # on failure: what the test found running, and what it left once killed
        for pid in still_running(below):
            os.kill(pid, signal.SIGKILL)
        still_running(below, within_s=END_WITHIN_S)
        sweep_stale_segments()
