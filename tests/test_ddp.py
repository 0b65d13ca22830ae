"""Two-process DDP on the CPU (torchrun, gloo): the multi-GPU paths a user takes, run in CI.

Each test launches `torchrun --nproc_per_node 2` through conftest's `launch`, which kills the
whole process group (ranks and their loader workers) when a test times out or fails. hue_pack: 256
train / 128 val images, global batch 64 (32 per rank) -> 4 steps per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import free_port, rank_pids, torchrun_command, without_timing

import fastalex
from fastalex.cli import main
from fastalex.plot import read_metrics

TIMEOUT_S = 240  # one torchrun of a few epochs takes ~20-40 s on the 2-core box


def torchrun(launch, pack, out, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return launch(torchrun_command(pack, out, *args), env=env)


def run_to_end(launch, pack, out, *args) -> str:
    job = torchrun(launch, pack, out, *args)
    stdout, stderr = job.communicate(TIMEOUT_S)
    assert job.returncode == 0, stdout + stderr
    return stdout


def agree_on_two_ranks(rank: int, store_path: str, views: list, results) -> None:
    """Spawned rank: join a 2-process gloo group and call `agree` with this rank's view."""
    import torch.distributed as dist

    from fastalex.distributed import agree
    from fastalex.runtime import Placement, Runtime

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    runtime = Runtime(Placement(torch.device("cpu"), rank, 2), None, False, False)
    results[rank] = [tuple(agree(runtime, *view)) for view in views[rank]]
    dist.destroy_process_group()


@pytest.mark.slow  # trains or starts processes
def test_ranks_agree_on_stopping_and_on_the_earliest_bad_step(tmp_path):
    """One rank signalled, one rank's non-finite loss or one rank's checkpoint clock due: both
    ranks take the same decision."""
    import torch.multiprocessing as mp

    views = [
        [(False, None, False), (False, 7, True), (False, None, False), (True, 5, False)],
        [(True, None, False), (False, 3, False), (False, None, False), (False, None, True)],
    ]  # rank 0's own views, then rank 1's
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(agree_on_two_ranks, (str(tmp_path / "store"), views, results), nprocs=2)
        decided = dict(results)
    expected = [(True, None, False), (False, 3, True), (False, None, False), (True, 5, True)]
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


def descendants(pid: int) -> list[int]:
    from helpers import descendants as below

    return below(pid)


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
    package = Path(fastalex.__file__).parent  # not any path through a checkout named fastalex/
    assert f'File "{package}/' not in stderr and "KeyboardInterrupt" not in stderr
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
        [
            "checkpoints",
            "config.json",
            "metrics.jsonl",
            "summary.json",
            "last.pt",
            "best.pt",
            "step-00000004.pt",
        ]
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
            "64",
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


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_restarts_and_gives_the_uninterrupted_rows(
    hue_pack, tmp_path, launch, straight_ddp_rows
):
    """SIGKILL rank 1 after the checkpoint of step 2 (no chance to save): torchrun restarts both
    ranks, which resume by themselves from the newest checkpoint and finish the run. Nothing the
    killed rank started (its forkserver, decode workers, resource tracker) outlives the run by
    more than moments, and shared memory holds nothing named for the run once it has ended."""
    from helpers import process_starts, still_running

    from fastalex.loaders.shm import shm_dir, sweep_stale_segments

    run = f"killed_{secrets.token_hex(4)}"  # the run's label in shared-memory names
    out = tmp_path / run
    command = torchrun_command(
        hue_pack,
        out,
        "--loader",
        "cpu",
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
        launcher=("--standalone", "--nproc_per_node", "2", "--max-restarts", "1"),
    )
    job = launch(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in job.process.stdout:
        if line.startswith("checkpoint step-00000002.pt"):
            break
    pids = rank_pids(job.process.pid)
    assert sorted(pids) == [0, 1], pids
    started = process_starts(descendants(pids[1]))
    assert len(started) >= 3, started  # a forkserver, its decode worker, a resource tracker
    os.kill(pids[1], signal.SIGKILL)
    stdout, stderr = read_while_running(job, TIMEOUT_S)  # what it left may hold the pipes
    try:
        left = still_running(started, within_s=END_WITHIN_S)
        assert not left, f"the killed rank's processes still run after the run's end: {left}"
    finally:  # on failure: kill them, let the readers finish, leave no shared memory
        for pid in still_running(started):
            os.kill(pid, signal.SIGKILL)
        still_running(started, within_s=END_WITHIN_S)
        output = stdout.result(END_WITHIN_S), stderr.result(END_WITHIN_S)
        remaining = sorted(path.name for path in shm_dir().glob(f"*fastalex-{run}-*"))
        sweep_stale_segments()
    assert job.returncode == 0, "".join(output)
    assert "resuming" in output[0], output[0]
    assert without_timing(read_metrics(out)) == straight_ddp_rows
    assert not remaining, remaining


END_WITHIN_S = 10  # for what a killed rank started to end (moments; this is a loaded machine)


def read_while_running(launched, timeout: float):
    """Futures of a launched command's rest of stdout and stderr, read by threads, once the
    command itself has exited: a process it left behind holding the pipes cannot block the test.
    Fails the test (killing the command's group) if it runs past `timeout`."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    reads = [pool.submit(pipe.read) for pipe in (launched.process.stdout, launched.process.stderr)]
    pool.shutdown(wait=False)
    try:
        launched.process.wait(timeout)
    except subprocess.TimeoutExpired:
        launched.kill_group()
        pytest.fail(f"{' '.join(launched.command)} ran past {timeout} s; killed its group")
    return reads


@pytest.mark.slow
def test_two_launchers_of_one_process_equal_one_launcher_of_two(
    hue_pack, tmp_path, launch, straight_ddp_rows
):
    """Multi-node on localhost: `torchrun --nnodes 2 --nproc_per_node 1` once per node."""
    port = free_port()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [
        launch(
            torchrun_command(
                hue_pack,
                out,
                "--loader",
                "cpu",
                "--epochs",
                "2",
                launcher=(
                    "--nnodes",
                    "2",
                    "--nproc_per_node",
                    "1",
                    "--node_rank",
                    str(node),
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(port),
                ),
            ),
            env=env,
        )
        for node in (0, 1)
    ]
    for job in jobs:
        stdout, stderr = job.communicate(TIMEOUT_S)
        assert job.returncode == 0, stdout + stderr
    assert without_timing(read_metrics(out)) == straight_ddp_rows


class ContractLoader:
    """The train-loader contract over sample ids 0..N-1, recording each batch's ids: epoch e's
    order is a permutation seeded by (seed, e); global step s covers positions [s*G, (s+1)*G),
    rank r its contiguous slice; the first pass starts at global position skip_samples. Val:
    each rank's share of the val ids, once. Pixels are a flat grey per label."""

    backend, summary = "contract", "contract test loader"
    resplits = True  # one global order and a cursor: any world size continues an epoch

    def __init__(self, record, cfg, split, placement, first_epoch=0, skip_samples=0):
        from fastalex.shards import read_manifest

        self.record, self.cfg, self.split, self.placement = record, cfg, split, placement
        self.epoch, self.skip = first_epoch, skip_samples
        self.total = read_manifest(Path(cfg.shards)).splits[split].samples
        self.global_batch = cfg.batch_size  # the config holds the global batch
        self.batch_size = placement.batch_share(cfg.batch_size)  # this rank's
        self.samples = len(self) * self.batch_size

    def __len__(self):
        if self.split == "train":
            return self.total // self.global_batch
        return -(-self.share(self.total)[1] // self.batch_size)

    def share(self, count):
        rank, world = self.placement.rank, self.placement.world_size
        start, stop = count * rank // world, count * (rank + 1) // world
        return start, stop - start

    def batch(self, ids):
        labels = torch.as_tensor(ids) % 4
        size = self.cfg.image_size
        images = (labels.float() / 4).view(-1, 1, 1, 1).expand(-1, 3, size, size)
        return images.contiguous(memory_format=torch.channels_last), labels

    def __iter__(self):
        if self.split == "val":
            start, count = self.share(self.total)
            ids = list(range(start, start + count))
            for at in range(0, count, self.batch_size):
                yield self.batch(ids[at : at + self.batch_size])
            return
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = torch.randperm(self.total, generator=torch.Generator().manual_seed(epoch)).tolist()
        first, self.skip = self.skip // self.global_batch, 0
        start, _ = self.share(self.global_batch)
        for step in range(first, len(self)):
            ids = order[step * self.global_batch + start :][: self.batch_size]
            with open(self.record, "a") as file:
                file.write(json.dumps({"epoch": epoch, "ids": ids}) + "\n")
            yield self.batch(ids)

    def close(self):
        pass


def train_on_contract_loader(rank, world_size, cfg, record, port) -> None:
    """A process of a run whose loaders are ContractLoaders (spawned, or the test's own)."""
    import fastalex.train

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    # a partial keeps ContractLoader's signature: the trainer sees that it takes skip_samples
    fastalex.train.build_loader = functools.partial(ContractLoader, f"{record}.{rank}")
    fastalex.train.train(cfg, rank, world_size, progress=False)


@pytest.mark.slow  # trains or starts processes
def test_a_run_stopped_on_two_processes_resumes_on_one_seeing_each_sample_once(
    hue_pack, tmp_path, monkeypatch
):
    """Stopped at step 2 of 4 on 2 processes (global batch 64), resumed on 1: the epoch's
    samples, recorded by id, are each seen exactly once, and the row counts all 256."""
    import torch.multiprocessing as mp

    from fastalex.config import TrainConfig

    port = free_port()
    cfg = TrainConfig(
        shards=str(hue_pack),
        out=str(tmp_path / "run"),
        device="cpu",
        amp="off",
        compile=False,
        batch_size=64,
        epochs=1,
        loader="cpu",
    )
    record = tmp_path / "ids"
    stopped = dataclasses.replace(cfg, max_steps=2)
    mp.spawn(train_on_contract_loader, (2, stopped, record, port), nprocs=2)
    monkeypatch.setattr("fastalex.train.build_loader", lambda *a, **k: None)  # restored after
    train_on_contract_loader(0, 1, dataclasses.replace(cfg, resume=True), record, port)
    seen = [
        i
        for path in sorted(tmp_path.glob("ids.*"))
        for line in path.read_text().splitlines()
        for i in json.loads(line)["ids"]
    ]
    assert sorted(seen) == list(range(256))
    (row,) = read_metrics(tmp_path / "run")
    assert row["train_samples"] == 256 and row["steps"] == 4
