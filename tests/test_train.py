"""Training end to end on tiny synthetic packs: learning, files, resume, eval, DDP, NaN, bad input.

One compiled run (module fixture, ~1 min of torch.compile on 2 cores) serves the learning, files
and eval tests; everything else runs --no-compile with small batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import signal
import sys

import pytest
import torch
from helpers import TINY_RUN, invoke, train_args, train_cli, without_timing

from fastalex.config import TrainConfig
from fastalex.plot import read_metrics

# hue_pack (conftest): 4 classes, 256 train / 128 val. Batch 32 -> 8 steps per epoch.
# 3 epochs from chance (25 %): measured val top-1 97.7 / 79.7 / 97.7 / 97.7 % for seeds 0-3
# (eager, CPU loader); 50 % is twice chance and well under the worst seed.
MIN_TOP1 = 50.0
METRIC_KEYS = {
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "epoch_s",
    "images_per_s",
}
SUMMARY_KEYS = {
    "top1",
    "top5",
    "best_top1",
    "epochs",
    "epoch_s",
    "images_per_s",
    "compile_s",
    "device",
    "loader",
    "amp",
    "compile",
    "arch",
    "image_size",
    "batch_size",
    "world_size",
    "git_sha",
    "versions",
}


@pytest.fixture(scope="module")
def compiled_run(hue_pack, tmp_path_factory):
    """3 epochs of alexnet64, compile on, CPU loader: the run directory."""
    out = tmp_path_factory.mktemp("compiled") / "run"
    train_cli(hue_pack, out, "--loader", "cpu", "--compile", "--epochs", 3)
    return out


@pytest.mark.slow
def test_compiled_training_learns_and_writes_run_files(compiled_run):
    summary = json.loads((compiled_run / "summary.json").read_text())
    assert summary["top1"] > MIN_TOP1, summary
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["compile"] is True and summary["loader"] == "cpu"
    assert summary["amp"] == summary["decisions"]["amp"]["chose"]  # --amp auto, as decided
    assert summary["epochs"] == 3 and len(summary["epoch_s"]) == 3 and summary["compile_s"] > 0
    rows = read_metrics(compiled_run)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(METRIC_KEYS <= row.keys() for row in rows)
    assert all(row["val_samples"] == 128 and row["train_samples"] == 256 for row in rows)
    assert summary["top1"] == rows[-1]["val_top1"]
    assert summary["best_top1"] == max(row["val_top1"] for row in rows)
    config = json.loads((compiled_run / "config.json").read_text())
    assert config.pop("decisions") == summary["decisions"]
    assert config == dataclasses.asdict(TrainConfig(**config)) and config["compile"] is True
    names = {p.name for p in (compiled_run / "checkpoints").iterdir()}  # the newest 2 kept
    assert names == {"last.pt", "best.pt", "step-00000016.pt", "step-00000024.pt"}


@pytest.mark.slow
def test_eval_reproduces_the_runs_final_top1(compiled_run, hue_pack, tmp_path):
    report = tmp_path / "eval.json"
    result = invoke(
        "eval",
        compiled_run / "checkpoints" / "last.pt",
        hue_pack,
        "--device",
        "cpu",
        "--loader",
        "cpu",
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((compiled_run / "summary.json").read_text())
    scores = json.loads(report.read_text())
    assert scores["top1"] == pytest.approx(summary["top1"], abs=1e-9)
    assert scores["top5"] == pytest.approx(summary["top5"], abs=1e-9)
    assert f"top-1 {summary['top1']:.2f} %" in result.output


@pytest.mark.slow
@pytest.mark.dali
def test_dali_cpu_training_learns(hue_pack, tmp_path):
    pytest.importorskip("nvidia.dali")
    train_cli(hue_pack, tmp_path / "run", "--loader", "dali", "--no-compile", "--epochs", 3)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loader"] == "dali"
    assert summary["top1"] > MIN_TOP1, summary


@pytest.mark.slow
@pytest.mark.dali
def test_dali_resumed_inside_a_later_epoch_gives_the_metrics_of_an_uninterrupted_run(
    hue_pack, tmp_path
):
    """DALI (CPU-only mode) stopped 4 steps into epoch 2 and resumed: its epoch order is its own
    pipeline's, rebuilt per epoch from (seed, epoch, rank), so the resumed run skips the batches
    the stopped one trained on and every row equals the uninterrupted run's."""
    pytest.importorskip("nvidia.dali")
    common = ("--loader", "dali", "--amp", "off", "--no-compile", "--epochs", 3)
    train_cli(hue_pack, tmp_path / "straight", *common)
    parts = tmp_path / "parts"
    train_cli(hue_pack, parts, *common, "--max-steps", 12)  # 8 steps per epoch: inside epoch 2
    train_cli(hue_pack, parts, *common, "--resume")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(parts)
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert without_timing(resumed) == without_timing(straight)


@pytest.mark.slow
def test_a_resume_keeps_the_loader_amp_and_compile_its_run_chose(
    hue_pack, tmp_path, monkeypatch, native_bf16
):
    """Stopped inside epoch 1 with everything `auto` (resident: the splits fit), resumed where
    they no longer fit (auto would now pick cpu): the resume keeps resident, amp and compile as
    recorded, says so once, and records them as kept; the epoch continues exactly."""
    native_bf16(False)  # amp by rule, never probed
    out = tmp_path / "run"
    auto = ("--device", "cpu", "--batch-size", 32, "--loader-workers", 1)  # amp, compile, loader
    first = invoke("train", hue_pack, "--out", out, *auto, "--max-steps", 4)
    assert first.exit_code == 0, first.output
    assert json.loads((out / "config.json").read_text())["loader"] == "resident", first.output
    monkeypatch.setattr("fastalex.auto.resident_budget_bytes", lambda *args, **kwargs: 0)
    resumed = invoke("train", hue_pack, "--out", out, *auto, "--max-steps", 8, "--resume")
    assert resumed.exit_code == 0, resumed.output
    kept = [line for line in resumed.output.splitlines() if "not decided again" in line]
    assert kept == [
        "resuming with the checkpoint's amp off, compile off, loader resident, not decided "
        "again; give --amp/--compile/--loader to choose"
    ], resumed.output
    decisions = json.loads((out / "summary.json").read_text())["decisions"]
    assert {name: (d["chose"], d["by"]) for name, d in decisions.items()} == {
        "amp": ("off", "resumed"),
        "compile": (False, "resumed"),
        "loader": ("resident", "resumed"),
    }
    assert "first by rule" in decisions["loader"]["reason"]
    assert decisions["loader"]["resident_need_gib"] > 0  # the first decision's figures kept
    assert [row["steps"] for row in read_metrics(out)] == [8]


@pytest.mark.slow
@pytest.mark.dali
def test_a_loader_given_on_resume_that_cannot_continue_the_epoch_ends_it_there(hue_pack, tmp_path):
    """--loader dali given on resuming a cpu run stopped inside epoch 1: dali cannot continue the
    cpu loader's order, so epoch 1 ends with its 4 steps (logged) and epoch 2 runs whole."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    common = ("--no-compile", "--amp", "off", "--epochs", 2)
    train_cli(hue_pack, out, *common, "--loader", "cpu", "--max-steps", 4)
    resumed = train_cli(hue_pack, out, *common, "--loader", "dali", "--resume")
    assert (
        "resumed inside epoch 1: the dali loader cannot continue the cpu loader's order, so "
        "epoch 1 ends after its 4 steps and the run goes on at epoch 2" in resumed.output
    ), resumed.output
    assert [(row["epoch"], row["steps"]) for row in read_metrics(out)] == [(1, 4), (2, 8)]
    assert json.loads((out / "summary.json").read_text())["loader"] == "dali"


@pytest.mark.slow  # trains or starts processes
def test_training_runs_on_the_resident_loader(hue_pack, tmp_path):
    """The trainer takes the resident loader as it takes any (its epochs are the cpu loader's:
    test_resident.py compares them batch by batch)."""
    train_cli(hue_pack, tmp_path / "run", "--loader", "resident", "--no-compile", "--max-steps", 2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loader"] == "resident" and summary["steps"] == 2, summary


@pytest.mark.slow
def test_resume_gives_the_metrics_of_an_uninterrupted_run(hue_pack, tmp_path):
    common = ("--loader", "cpu", "--no-compile", "--epochs", 2)
    train_cli(hue_pack, tmp_path / "straight", *common)
    parts = tmp_path / "parts"
    train_cli(hue_pack, parts, *common, "--max-steps", 5)  # stops inside epoch 1
    train_cli(hue_pack, parts, *common, "--max-steps", 8, "--resume")  # at the end of epoch 1
    train_cli(hue_pack, parts, *common, "--resume")
    straight = read_metrics(tmp_path / "straight")
    resumed = read_metrics(parts)
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert without_timing(resumed) == without_timing(straight)
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["top1"] == straight[-1]["val_top1"] and summary["steps"] == 16


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(hue_pack, tmp_path):
    out = tmp_path / "run"
    common = ("--loader", "cpu", "--no-compile")
    train_cli(hue_pack, out, *common, "--epochs", 1)
    last = out / "checkpoints" / "last.pt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    result = invoke(*train_args(hue_pack, out, *common, "--epochs", 2, "--resume", "--lr", "1e30"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    assert "diverged" in message and str(last.with_name("step-00000008.pt")) in message
    assert re.search(r"epoch 2, step \d of 8 \(global step \d+\)", message), message
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert len(read_metrics(out)) == 1


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_exits_130(hue_pack, tmp_path, launch):
    out = tmp_path / "run"
    job = launch(
        [
            sys.executable,
            "-m",
            "fastalex",
            "train",
            hue_pack,
            "--out",
            out,
            *TINY_RUN,
            "--loader",
            "cpu",
            "--no-compile",
            "--epochs",
            "3",
        ]
    )
    for line in job.process.stdout:  # the first epoch's line: a checkpoint exists, epoch 2 runs
        if line.startswith("epoch 1/3:"):
            break
    job.process.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(120)
    assert job.returncode == 130, stdout + stderr
    assert "SIGINT: stopped at" in stdout and "--resume" in stdout, stdout
    assert "Traceback" not in stderr
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 or (state["epoch"], state["step_in_epoch"]) == (2, 0)
    assert not (out / "summary.json").exists()


@pytest.mark.slow  # trains or starts processes
def test_cli_smoke_two_steps(synth_pack, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "train",
        synth_pack,
        "--loader",
        "cpu",
        "--device",
        "cpu",
        "--no-compile",
        "--max-steps",
        2,
        "--batch-size",
        32,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["epochs"] == 1 and summary["val_samples"] == 60
    assert (out / "checkpoints" / "last.pt").is_file()


def test_reference_recipe_fills_options_not_given(monkeypatch, synth_pack, tmp_path):
    seen = {}

    def fake_train(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        from fastalex.train import RunResult

        return RunResult(None, "done")

    monkeypatch.setattr("fastalex.train.train", fake_train)
    result = invoke("train", synth_pack, "--recipe", "reference", "--epochs", 2, "--lr", 0.5)
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.recipe, cfg.arch, cfg.image_size) == ("reference", "alexnet", 227)
    assert cfg.batch_size == 128
    assert (cfg.epochs, cfg.lr, cfg.lr_schedule, cfg.flip_tta) == (2, 0.5, "step", False)
    assert cfg.shards == str(synth_pack)


@pytest.mark.slow  # trains or starts processes
def test_bad_input_exits_2_with_one_line(synth_pack, hue_pack, tmp_path):
    run = tmp_path / "run"
    train_cli(hue_pack, run, "--loader", "cpu", "--no-compile", "--max-steps", 1)
    checkpoint = run / "checkpoints" / "last.pt"
    cases = [
        ("train", tmp_path / "no-pack", *TINY_RUN),
        ("train", synth_pack, *TINY_RUN, "--epochs", 0),
        ("train", synth_pack, "--device", "cpu", "--batch-size", 100000),
        ("train", synth_pack, *TINY_RUN, "--resume"),  # no --out
        ("train", hue_pack, *TINY_RUN, "--out", run),  # holds a run, no --resume
        (
            "train",
            hue_pack,
            *TINY_RUN,
            "--out",
            run,
            "--resume",
            "--arch",
            "alexnet",
            "--image-size",
            227,
        ),
        ("eval", checkpoint, synth_pack, "--device", "cpu"),  # 4-class checkpoint, 6-class pack
        ("eval", tmp_path / "missing.pt", synth_pack),
        ("eval", synth_pack / "manifest.json", synth_pack),  # not a checkpoint
    ]
    if not torch.cuda.is_available():
        cases.append(("train", synth_pack, "--device", "cuda", "--batch-size", 32))
    for args in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)


@pytest.mark.slow  # trains or starts processes
def test_a_slow_loader_is_reported_as_waiting_and_a_ready_one_is_not(
    hue_pack, tmp_path, monkeypatch
):
    """A train loader that takes 1 s per batch: the epoch's row, summary and log say the model
    waited at least the delays of the 8 - WARMUP_STEPS timed steps, and the run is called
    loader-bound; the same run without the delay waits far less and is not."""
    import time

    import fastalex.train

    real_build = fastalex.train.build_loader

    class Slow:
        def __init__(self, loader):
            self.loader = loader
            self.backend, self.samples, self.summary = loader.backend, loader.samples, "slow"

        def __iter__(self):
            for batch in self.loader:
                time.sleep(1.0)
                yield batch

        def __len__(self):
            return len(self.loader)

        def close(self):
            self.loader.close()

    def build_slow(cfg, split, *args, **kwargs):
        loader = real_build(cfg, split, *args, **kwargs)
        return Slow(loader) if split == "train" else loader

    ready = train_cli(
        hue_pack, tmp_path / "ready", "--loader", "cpu", "--no-compile", "--epochs", 1
    )
    monkeypatch.setattr(fastalex.train, "build_loader", build_slow)
    slow = train_cli(hue_pack, tmp_path / "slow", "--loader", "cpu", "--no-compile", "--epochs", 1)
    (slow_row,), (ready_row,) = read_metrics(tmp_path / "slow"), read_metrics(tmp_path / "ready")
    assert slow_row["loader_wait_s"] >= (8 - fastalex.train.WARMUP_STEPS) * 1.0
    assert slow_row["loader_wait_pct"] > 20 and "loader-bound" in slow.output
    assert ready_row["loader_wait_s"] < slow_row["loader_wait_s"] - 3
    assert "loader-bound" not in ready.output
    summary = json.loads((tmp_path / "slow" / "summary.json").read_text())
    assert summary["loader_wait_s"] == slow_row["loader_wait_s"]
    assert "waited on the loader" in slow.output
