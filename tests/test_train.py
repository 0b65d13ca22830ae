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
from click.testing import CliRunner

from fastalex.cli import main
from fastalex.config import TrainConfig
from fastalex.plot import read_metrics

# hue_pack (conftest): 4 classes, 256 train / 128 val. Batch 32 -> 8 steps per epoch.
TINY = ("--device", "cpu", "--batch-size", "32", "--loader-workers", "1")
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
TIMING_KEYS = {
    "epoch_s",
    "train_s",
    "eval_s",
    "images_per_s",
    "loader_wait_s",
    "loader_wait_pct",
    "timed_s",
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def train_cli(pack, out, *args):
    result = invoke("train", pack, "--out", out, *TINY, *args)
    assert result.exit_code == 0, result.output
    return result


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


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
    result = invoke(
        "train", hue_pack, "--out", out, *TINY, *common, "--epochs", 2, "--resume", "--lr", "1e30"
    )
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
            *TINY,
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


def test_train_options_match_train_config_fields():
    command = main.commands["train"]
    names = [p.name for p in command.params if p.name != "help"]
    record_only = {"config_file", "overrides"}  # set from --config, not options of their own
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - record_only
    # --config and --cache-dir (where a SHARDS URL is staged) say where things are, not settings
    assert sorted(names) == sorted(fields | {"config_path", "cache_dir"})
    assert len(names) == len(set(names))


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


def test_lr_schedules():
    from fastalex.train import lr_factor, peak_lr

    reference = TrainConfig(
        recipe="reference", lr=0.02, batch_size=128, lr_schedule="step", epochs=30
    )
    assert peak_lr(reference) == pytest.approx(0.01)
    assert [lr_factor(reference, 10, s) for s in (0, 69, 70, 139, 140)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    fast = TrainConfig(epochs=4, warmup_epochs=1)
    factors = [lr_factor(fast, 10, s) for s in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 30)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_bad_input_exits_2_with_one_line(synth_pack, hue_pack, tmp_path):
    run = tmp_path / "run"
    train_cli(hue_pack, run, "--loader", "cpu", "--no-compile", "--max-steps", 1)
    checkpoint = run / "checkpoints" / "last.pt"
    cases = [
        ("train", tmp_path / "no-pack", *TINY),
        ("train", synth_pack, *TINY, "--epochs", 0),
        ("train", synth_pack, "--device", "cpu", "--batch-size", 100000),
        ("train", synth_pack, *TINY, "--resume"),  # no --out
        ("train", hue_pack, *TINY, "--out", run),  # holds a run, no --resume
        (
            "train",
            hue_pack,
            *TINY,
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


def test_model_info_prints_the_table():
    result = invoke("model-info", "--classes", 200)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("alexnet64: 200 classes, 64x64 px input")
    assert "total" in result.output and "GFLOP" in result.output


def test_plot_draws_the_runs_curves(compiled_run, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke("plot", compiled_run, compiled_run, "--out", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the step, the schedule and eval, unit by unit (eager, small tensors) ------------------------


def eager_cpu_runtime():
    from fastalex.train import resolve_runtime

    return resolve_runtime(TrainConfig(device="cpu", compile=False, amp="off"))


class FirstRow(torch.nn.Module):
    """A stand-in model whose logits are the top row of the first channel, (N, W): it tells left
    from right and top from bottom."""

    def forward(self, images):
        return images[:, 0, 0, :]


def test_evaluate_counts_top5_among_the_five_best_of_ten_classes():
    from fastalex.loaders import Batch
    from fastalex.train import evaluate

    logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    order = logits.argsort(dim=1, descending=True)
    ranks = torch.arange(40) % 10  # each label is the (rank + 1)-th best class: ranks 0..9, 4 each
    labels = order[torch.arange(40), ranks]
    images = logits[:, None, None, :].expand(40, 3, 1, 10)  # FirstRow reads the logits back
    batches = [Batch(images[i : i + 16], labels[i : i + 16]) for i in range(0, 40, 16)]
    result = evaluate(FirstRow(), batches, eager_cpu_runtime(), flip_tta=False)
    assert result["samples"] == 40
    assert result["top1"] == pytest.approx(100 * 4 / 40)  # rank 0
    assert result["top5"] == pytest.approx(100 * 20 / 40)  # ranks 0-4
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_flip_tta_averages_the_logits_of_the_image_and_its_left_right_mirror():
    from fastalex.loaders import Batch
    from fastalex.train import evaluate

    images = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 6
    top_row = images[:, 0, 0, :]  # (N, 6); its left-right mirror is top_row.flip(1)
    expected = (top_row + top_row.flip(1)) / 2
    result = evaluate(FirstRow(), [Batch(images, labels)], eager_cpu_runtime(), flip_tta=True)
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(expected, labels).item(), rel=1e-6
    )
    assert result["top1"] == pytest.approx(
        100 * (expected.argmax(1) == labels).float().mean().item()
    )
    plain = evaluate(FirstRow(), [Batch(images, labels)], eager_cpu_runtime(), flip_tta=False)
    assert plain["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(top_row, labels).item(), rel=1e-6
    )


def smoothed_cross_entropy(logits, labels, smoothing):
    """Label-smoothed cross-entropy from its definition: targets (1 - e) one-hot + e / classes."""
    classes = logits.shape[1]
    targets = torch.full_like(logits, smoothing / classes)
    targets[torch.arange(len(labels)), labels] += 1 - smoothing
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def test_train_step_descends_the_label_smoothed_loss_of_the_recipe():
    from fastalex.train import make_train_step

    cfg = TrainConfig(device="cpu", compile=False, amp="off")
    assert cfg.recipe == "fast" and cfg.label_smoothing > 0  # the fast recipe smooths labels
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    reference.load_state_dict(model.state_dict())
    images, labels = torch.randn(8, 3, 2, 2), torch.arange(8) % 5
    loss = smoothed_cross_entropy(reference(images), labels, cfg.label_smoothing)
    loss.backward()
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = make_train_step(model, optimizer, scaler, cfg, eager_cpu_runtime())
    loss_sum, correct = step(images, labels)
    assert loss_sum.item() == pytest.approx(8 * loss.item(), rel=1e-5)
    assert correct.item() == (reference(images).argmax(1) == labels).sum().item()
    for param, before in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.detach(), before.detach() - lr * before.grad)


def test_peak_lr_scales_with_the_global_batch_whatever_the_process_count():
    from fastalex.train import peak_lr

    cfg = TrainConfig(lr=0.02, batch_size=128)  # per 256 images; 128 across all processes
    assert [peak_lr(dataclasses.replace(cfg, batch_size=b)) for b in (128, 256, 1024)] == (
        pytest.approx([0.01, 0.02, 0.08])
    )


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
