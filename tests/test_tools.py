"""tools/: each script runs on the CPU, answers --help, and does its job on a tiny pack through the
trainer's and loaders' own code (a few steps, --no-compile)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_CPU

TOOLS = Path(__file__).resolve().parent.parent / "tools"
SCRIPTS = ("show_batches", "lr_find", "profile_step", "batch_sweep")
CPU = (*TINY_CPU, "--batch-size", "16")


@pytest.fixture
def tool(monkeypatch):
    """tool(name) -> the script's module, imported as `python tools/<name>.py` would run it."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return importlib.import_module


def invoke(module, *args):
    return CliRunner().invoke(module.main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow  # trains or starts processes
@pytest.mark.parametrize("name", SCRIPTS)
def test_each_tool_runs_as_a_script_and_has_help(name, launch):
    script = launch([sys.executable, TOOLS / f"{name}.py", "--help"], cwd=TOOLS.parent)
    stdout, stderr = script.communicate(timeout=120)
    assert script.returncode == 0, stdout + stderr
    assert stdout.startswith(f"Usage: {name}.py [OPTIONS] SHARDS") and "--batch-size" in stdout


@pytest.mark.slow  # trains or starts processes
def test_show_batches_draws_every_loader_and_val(tool, hue_pack, tmp_path):
    result = invoke(
        tool("show_batches"), hue_pack, "--out", tmp_path / "grid.png", "--images", 4, *CPU
    )
    assert result.exit_code == 0, result.output
    shown = result.output.strip().splitlines()[-1]
    assert shown.startswith(f"wrote {tmp_path / 'grid.png'}: ")
    assert "train: cpu" in shown and "train: resident" in shown and shown.endswith("val: cpu")
    assert "train: dali" in shown or "dali: not shown: " in result.output  # or says why not
    png = (tmp_path / "grid.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


@pytest.mark.slow  # trains or starts processes
def test_show_batches_shows_uint8_pixels_and_the_stats_the_model_sees(tool, tmp_path):
    """A batch of one colour: drawn in that colour, labelled with its mean after the model's own
    normalisation ((pixel / 255 - mean) / std per channel) and a std of 0."""
    import numpy as np
    from PIL import Image

    from fastalex.config import IMAGE_MEAN, IMAGE_STD

    show_batches = tool("show_batches")
    colour = (200, 100, 30)
    images = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    images = images.contiguous(memory_format=torch.channels_last)  # as a loader hands it over
    label = show_batches.row_label("train: cpu", images)
    means = " ".join(f"{(c / 255 - m) / s:+.2f}" for c, m, s in zip(colour, IMAGE_MEAN, IMAGE_STD))
    assert label == f"train: cpu\nmean {means}\nstd 0.00 0.00 0.00"
    out = tmp_path / "one.png"
    rows = [("train: cpu", images, torch.zeros(2, dtype=torch.int64))]
    show_batches.draw(rows, [], [("n0", "thing")], 2, "one colour", out)
    drawn = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    assert (drawn == colour).all(axis=1).sum() > 2 * 100  # both images' pixels, that colour


def test_show_batches_refuses_an_unknown_loader_in_one_line(tool, hue_pack, tmp_path):
    result = CliRunner().invoke(tool("show_batches").main, [str(hue_pack), "--loaders", "cpu,ffcv"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: --loaders: choose from")


@pytest.mark.slow  # trains or starts processes
def test_lr_find_sweeps_exponentially_and_suggests_an_lr(tool, hue_pack, tmp_path):
    result = invoke(
        tool("lr_find"),
        hue_pack,
        "--steps",
        12,
        "--min-lr",
        1e-3,
        "--max-lr",
        1.0,
        "--out",
        tmp_path / "lr.png",
        "--json",
        tmp_path / "lr.json",
        "--loader",
        "cpu",
        *CPU,
    )
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "lr.json").read_text())
    lrs = [row["lr"] for row in found["rows"]]
    assert lrs[0] == pytest.approx(1e-3) and 2 <= len(lrs) <= 12
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([1000 ** (1 / 11)] * len(ratios))  # one factor per step
    assert found["suggested_lr"] == pytest.approx(found["lowest"] / 10)
    assert f"suggested --lr {found['suggested_lr']:.3g}" in result.output
    assert found["config"]["batch_size"] == 16 and found["config"]["recipe"] == "fast"
    assert (tmp_path / "lr.png").read_bytes().startswith(b"\x89PNG")


def test_lr_find_sets_the_optimizer_lr_per_step_and_finds_the_valley(tool):
    """On a known loss curve (lowest at lr 1e-2): each step runs at lr * batch / 256, the sweep
    stops once the loss has quadrupled, and the suggestion is the valley's lr / 10."""
    import types

    from fastalex.config import TrainConfig

    lr_find = tool("lr_find")
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=torch.tensor(0.5))  # a tensor LR, as compiled
    seen = []

    def step(images, labels):
        lr = float(optimizer.param_groups[0]["lr"])
        seen.append(lr)
        per_256 = lr * 256 / 64
        return torch.tensor(4 * (math.log10(per_256) + 2) ** 2 + 1.0) * len(labels), None

    def batches():
        while True:
            yield torch.zeros(64, 3, 8, 8, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64)

    trainer = types.SimpleNamespace(
        cfg=TrainConfig(batch_size=64),
        step=step,
        batches=batches,
        training=types.SimpleNamespace(optimizer=optimizer),
    )
    rows = lr_find.sweep(trainer, 1e-5, 1e3, 81, log=lambda line: None)
    assert seen == pytest.approx([row["lr"] * 64 / 256 for row in rows])
    assert len(rows) < 81  # stopped: the loss rose past DIVERGED_FACTOR x its lowest
    found = lr_find.suggest(rows)
    assert found["lowest"] == pytest.approx(1e-2, rel=0.3)  # within a step of the sweep
    assert found["lr"] == pytest.approx(found["lowest"] / 10)


def test_profile_step_splits_a_step_into_phases_and_writes_a_trace(tool, hue_pack, tmp_path):
    result = invoke(
        tool("profile_step"),
        hue_pack,
        "--steps",
        2,
        "--warmup",
        1,
        "--trace",
        tmp_path / "trace.json",
        "--json",
        tmp_path / "table.json",
        "--loader",
        "cpu",
        *CPU,
    )
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "table.json").read_text())
    host = {phase: row["host_ms"] for phase, row in table.items() if phase != "host syncs"}
    assert host["forward"] > 0 and host["backward"] > 0 and host["optimizer"] > 0
    assert host["loader wait"] > 0
    parts = sum(host[p] for p in ("loader wait", "forward", "backward", "optimizer", "other"))
    assert parts == pytest.approx(host["step"], rel=1e-6)
    assert table["host syncs"]["per_step"] == 0  # the trainer's step reads nothing back
    for phase in ("loader wait", "forward", "backward", "optimizer", "other", "host syncs"):
        assert phase in result.output
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"fastalex::step", "fastalex::forward", "fastalex::loader_wait"} <= names


@pytest.mark.slow  # trains or starts processes
def test_batch_sweep_writes_a_row_per_size_with_the_scaled_lr(
    tool, hue_pack, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the first run writes its default OUT here
    out = tmp_path / "sweep"
    args = ["--device", "cpu", "--loader-workers", "1", "--no-compile", "--lr", 0.08]
    result = invoke(tool("batch_sweep"), hue_pack, "--batch-sizes", "32,16", "--steps", 2, *args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "batch_sweep.json").is_file()
    result = invoke(
        tool("batch_sweep"),
        hue_pack,
        "--batch-sizes",
        "32,16",
        "--steps",
        2,
        "--epochs",
        1,
        "--out",
        out,
        *args,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.with_name("sweep.json").read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [16, 32]
    assert [r["lr"] for r in rows] == [
        pytest.approx(0.08 * 16 / 256),
        pytest.approx(0.08 * 32 / 256),
    ]
    for row in rows:
        assert row["fits"] and row["images_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert 0 <= row["val_top1"] <= 100
    assert [r["largest_fit"] for r in rows] == [False, True]
    assert out.with_name("sweep.png").stat().st_size > 0
    assert "largest batch that fit: 32" in result.output


def test_the_readme_describes_every_tool():
    readme = (TOOLS.parent / "README.md").read_text()
    section = readme.split("## tools/", 1)[1].split("\n## ", 1)[0]
    scripts = sorted(p.stem for p in TOOLS.glob("*.py") if not p.name.startswith("_"))
    assert scripts == sorted(SCRIPTS)
    for name in scripts:
        assert f"python tools/{name}.py data/shards" in section and f"`{name}.py`" in section
