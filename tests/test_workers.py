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

# The owner: a rank alone in its gloo group (so its workers start by forkserver), decoding, then
# ending as argv[4] says once told to (a line on stdin): "killed" waits to be SIGKILLed.
OWNER = """
import sys, time, torch, torch.distributed as dist
from fastalex.config import TrainConfig
from fastalex.loaders import Placement, build_loader
shards, out, store, ending = sys.argv[1:5]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
cfg = TrainConfig(
    shards=shards, out=out, loader="cpu", decode="processes", loader_workers=2, batch_size=20
)
loader = build_loader(cfg, "train", Placement(torch.device("cpu")))
batches = iter(loader)
next(batches)
print("decoding", flush=True)
sys.stdin.readline()
if ending == "raised":
    raise RuntimeError("the owner's error")
if ending == "killed":
    time.sleep(300)
"""  # "returned": the end of the script, the loader never closed
END_WITHIN_S = 10  # the watch reacts at once; this is for a loaded machine


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["killed", "raised", "returned"])
def test_an_owners_decode_workers_and_shared_memory_end_with_it(
    coded_pack, tmp_path, launch, ending
):
    """Its forkserver, its two workers and its resource tracker end within moments of the owner,
    however it ends, and shared memory keeps nothing named for its run (ring and semaphores)."""
    import subprocess

    run = f"owner_{secrets.token_hex(4)}"
    job = launch(
        [sys.executable, "-c", OWNER, coded_pack.path, tmp_path / run, tmp_path / "store", ending],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE,
    )
    line = job.process.stdout.readline()
    if line != "decoding\n":
        _, stderr = job.communicate(60)
        pytest.fail(f"the owner did not start decoding: {line!r}\n{stderr[-4000:]}")
    below = process_starts(descendants(job.process.pid))
    made = sorted(path.name for path in shm_dir().glob(f"*fastalex-{run}-*"))
    assert len(below) >= 3, still_running(below)  # forkserver, 2 workers (a resource tracker)
    assert any(name.startswith("fastalex-") for name in made), made  # the ring
    assert any(name.startswith("sem.fastalex-") for name in made), made  # the queues' locks
    if ending == "killed":
        os.kill(job.process.pid, signal.SIGKILL)
    else:
        job.process.stdin.write("end\n")
        job.process.stdin.flush()
    try:
        left = still_running(below, within_s=END_WITHIN_S)
        assert not left, f"still running {END_WITHIN_S} s after their owner {ending}: {left}"
        remaining = sorted(path.name for path in shm_dir().glob(f"*fastalex-{run}-*"))
        assert not remaining, remaining
    finally:  # on failure: what the test found running, and what it left once killed
        for pid in still_running(below):
            os.kill(pid, signal.SIGKILL)
        still_running(below, within_s=END_WITHIN_S)
        sweep_stale_segments()
