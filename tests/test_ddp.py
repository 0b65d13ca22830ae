"""Two-process DDP on the CPU (torchrun, gloo): the multi-GPU paths a user takes, run in CI.

Each test launches `torchrun --nproc_per_node 2` through conftest's `launch`, which kills the
whole process group (ranks and their loader workers) when a test times out or fails. hue_pack: 256
train / 128 val images, batch 32 per rank -> 4 steps per epoch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fastalex.cli import main
from fastalex.plot import read_metrics

TINY = ("--device", "cpu", "--batch-size", "32", "--loader-workers", "1", "--no-compile")
TIMING_KEYS = {
    "epoch_s",
    "train_s",
    "eval_s",
    "images_per_s",
    "loader_wait_s",
    "loader_wait_pct",
    "timed_s",
}
TIMEOUT_S = 240  # one torchrun of a few epochs takes ~20-40 s on the 2-core box


def torchrun(launch, pack, out, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fastalex",
            "train",
            pack,
            "--out",
            out,
            *TINY,
            *args,
        ],
        env=env,
    )


def run_to_end(launch, pack, out, *args) -> str:
    job = torchrun(launch, pack, out, *args)
    stdout, stderr = job.communicate(TIMEOUT_S)
    assert job.returncode == 0, stdout + stderr
    return stdout


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def agree_on_two_ranks(rank: int, store_path: str, views: list, results) -> None:
    """Spawned rank: join a 2-process gloo group and call `agree` with this rank's view."""
    import torch.distributed as dist

    from fastalex.runtime import Runtime
    from fastalex.train import agree

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    runtime = Runtime(torch.device("cpu"), None, False, False, rank, 2)
    results[rank] = [agree(runtime, *view) for view in views[rank]]
    dist.destroy_process_group()


def test_ranks_agree_on_stopping_and_on_the_earliest_bad_step(tmp_path):
    """One rank signalled or one rank's non-finite loss: both ranks take the same decision."""
    import torch.multiprocessing as mp

    views = [
        [(False, None), (False, 7), (False, None), (True, 5)],  # rank 0's own views
        [(True, None), (False, 3), (False, None), (False, None)],
    ]  # rank 1's
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(agree_on_two_ranks, (str(tmp_path / "store"), views, results), nprocs=2)
        decided = dict(results)
    expected = [(True, None), (False, 3), (False, None), (True, 5)]
    assert decided[0] == decided[1] == expected


@pytest.mark.slow
def test_ddp_resumed_mid_epoch_gives_the_uninterrupted_rows(hue_pack, tmp_path, launch):
    """Train and val rows of a 2-rank run stopped at step 3 of 4 and resumed equal those of an
    uninterrupted run: the partial epoch's totals are summed over both ranks exactly once."""
    common = ("--loader", "cpu", "--epochs", "2")
    run_to_end(launch, hue_pack, tmp_path / "straight", *common)
    run_to_end(launch, hue_pack, tmp_path / "parts", *common, "--max-steps", "3")
    run_to_end(launch, hue_pack, tmp_path / "parts", *common, "--resume")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "parts")
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert all(row["train_samples"] == 256 and row["val_samples"] == 128 for row in resumed)
    assert without_timing(resumed) == without_timing(straight)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started (children carrying RANK in their env)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            env = dict(
                item.split("=", 1)
                for item in (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
def test_sigint_to_one_rank_stops_every_rank_at_the_same_step(hue_pack, tmp_path, launch):
    out = tmp_path / "run"
    job = torchrun(launch, hue_pack, out, "--loader", "cpu", "--epochs", "8")
    for line in job.process.stdout:  # rank 0's first epoch line: epoch 2 is under way
        if line.startswith("epoch 1/8:"):
            break
    pids = rank_pids(job.process.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGINT)
    signalled = time.monotonic()
    stdout, stderr = job.communicate(60)
    assert time.monotonic() - signalled < 30
    # torchrun prints its own ChildFailedError report for the ranks' exit status 130; no
    # traceback comes from a rank (no fastalex frame, no KeyboardInterrupt)
    assert job.returncode != 0 and "exitcode  : 130" in stderr, stderr
    assert not re.search(r'File ".*fastalex/', stderr) and "KeyboardInterrupt" not in stderr
    assert re.search(r"stopped at (the end of epoch \d|epoch \d, step \d)", stdout), stdout
    assert "--resume" in stdout
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["global_step"] == checkpoint["epoch"] * 4 + checkpoint["step_in_epoch"]
    assert checkpoint["epoch"] < 8
    run_to_end(launch, hue_pack, out, "--loader", "cpu", "--epochs", "8", "--resume")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 8 and summary["steps"] == 32 and summary["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "dali", "resident"])
def test_ddp_val_metrics_equal_a_single_process_eval(hue_pack, tmp_path, launch, backend):
    """Each loader under 2 ranks: the run's all-reduced val row equals `fastalex eval` of its
    checkpoint in one process (each val image counted once, none twice), and only rank 0 writes."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "ddp"
    stdout = run_to_end(launch, hue_pack, out, "--loader", backend, "--epochs", "1")
    assert stdout.count("epoch 1/1:") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["checkpoints", "config.json", "metrics.jsonl", "summary.json", "last.pt", "best.pt"]
    )
    (row,) = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["loader"] == backend
    assert row["train_samples"] == 256 and row["steps"] == 4 and row["val_samples"] == 128
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(out / "checkpoints" / "last.pt"),
            str(hue_pack),
            "--device",
            "cpu",
            "--loader",
            "cpu",
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    single = json.loads(report.read_text())
    assert single["samples"] == row["val_samples"]
    assert single["top1"] == row["val_top1"] and single["top5"] == row["val_top5"]
    # per-batch float32 loss sums differ with the batch boundaries of 1 vs 2 ranks
    assert single["loss"] == pytest.approx(row["val_loss"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_nccl_two_gpus_share_the_data_and_rank0_writes(hue_pack, tmp_path, launch):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "ddp"
    job = launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fastalex",
            "train",
            hue_pack,
            "--out",
            out,
            "--device",
            "cuda",
            "--batch-size",
            "32",
            "--loader",
            "cpu",
            "--epochs",
            "1",
        ]
    )
    stdout, stderr = job.communicate(TIMEOUT_S)
    assert job.returncode == 0, stdout + stderr
    (row,) = read_metrics(out)
    assert row["train_samples"] == 256 and row["val_samples"] == 128
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
