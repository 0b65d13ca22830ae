"""The benchmarks cannot rot: throughput.py runs end to end in --quick mode, its harness interleaves
rows and judges spreads as documented (on given numbers and a fake clock: no timing is asserted),
render_results.py turns recorded rows into RESULTS.md tables, plot_runs draws a PNG, the reference
pipeline behaves as torchvision's transforms do, and the FFCV and SPDL rows' loaders keep fastalex's
batch contract where ffcv / spdl are installed (and their rows skip, saying why, where not)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script
from PIL import Image

from fastalex.errors import UserError

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ROW_KEYS = {
    "group",
    "name",
    "image_size",
    "device",
    "images_per_s",
    "min",
    "max",
    "spread_pct",
    "repeats",
    "note",
}
MACHINE_KEYS = {
    "cpu",
    "cores",
    "gpu",
    "driver",
    "torch",
    "cuda",
    "dali",
    "git_sha",
    "git_dirty",
    "date_utc",
}


@pytest.mark.slow
def test_quick_throughput_reports_every_group_and_explains_skips(tmp_path, launch):
    out = tmp_path / "out.json"
    record = BENCHMARKS / "results" / "throughput.jsonl"
    before = record.read_bytes() if record.exists() else None
    # In its own process group: on a timeout its loader workers and pack pool die with it.
    throughput = launch(
        [
            sys.executable,
            BENCHMARKS / "throughput.py",
            "--quick",
            "--device",
            "cpu",
            "--json",
            out,
            "--no-record",
        ]
    )
    stdout, stderr = throughput.communicate(timeout=240)
    done = subprocess.CompletedProcess(throughput.command, throughput.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SYNTHETIC stand-in" in done.stdout + done.stderr  # it says it made up its data
    assert "images/s" in done.stdout and "reference" in done.stdout
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert MACHINE_KEYS <= result["machine"].keys()
    assert result["machine"]["cores"] >= 1
    rows = result["rows"]
    assert {row["group"] for row in rows} == {"loader", "model", "e2e", "pack"}
    names = {(row["group"], row["name"]) for row in rows}
    from fastalex.loaders import BACKENDS

    assert {("loader", "reference"), ("loader", "ffcv")} | {
        ("loader", b) for b in BACKENDS
    } <= names
    assert {("model", n) for n in ("eager-fp32", "channels-last", "amp", "compiled")} <= names
    assert {("e2e", "reference"), ("e2e", "fastalex"), ("pack", "pack")} <= names
    fixed = {
        f"{a}-{c}-{b}" for a in ("fp32", "bf16") for c in ("eager", "compiled") for b in BACKENDS
    }
    assert {("e2e", "defaults")} | {("e2e", n) for n in fixed if "dali" not in n} <= names
    defaults = next(r for r in rows if (r["group"], r["name"]) == ("e2e", "defaults"))
    assert defaults["images_per_s"] and set(defaults["decisions"]) == {"amp", "compile", "loader"}
    for row in rows:
        assert ROW_KEYS <= row.keys(), row
        assert row["device"] == "cpu"
        if row["images_per_s"] is None:  # skipped: never silently, never estimated
            assert row["note"].startswith(("skipped: ", "failed: ")) and len(row["note"]) > 12, row
            assert row["min"] is None and row["max"] is None
        else:
            assert row["repeats"] >= 3 and len(row["rates"]) == row["repeats"]
            assert 0 < row["min"] <= row["images_per_s"] <= row["max"], row
            assert row["spread_pct"] >= 0
    assert not [row for row in rows if row["status"] == "failed"], rows
    reference = next(r for r in rows if (r["group"], r["name"]) == ("loader", "reference"))
    assert reference["images_per_s"] and "torchvision" in reference["note"]
    assert next(r for r in rows if r["group"] == "pack")["images_per_s"] > 0
    amp = next(r for r in rows if (r["group"], r["name"]) == ("model", "amp"))
    assert "bf16" in amp["note"]  # measured with bf16 where the CPU has it, else skipped saying so
    compiled = next(r for r in rows if (r["group"], r["name"]) == ("model", "compiled"))
    assert compiled["images_per_s"] is None and "--quick" in compiled["note"]
    for row in (r for r in rows if r["group"] == "e2e" and r["images_per_s"] is not None):
        assert 0 <= row["wait_pct"] <= 100, row  # how long the step waited on its loader
    ffcv = next(r for r in rows if (r["group"], r["name"]) == ("loader", "ffcv"))
    assert ffcv["images_per_s"] or "ffcv" in ffcv["note"]  # measured, or skipped saying why
    spdl = next(r for r in rows if (r["group"], r["name"]) == ("loader", "spdl"))
    if spdl_importable():
        assert spdl["images_per_s"] > 0 and "SPDL" in spdl["note"], spdl
    else:
        assert spdl["status"] == "skipped" and "spdl" in spdl["note"], spdl
    assert "spread" in done.stdout  # the table quotes each row's spread
    after = record.read_bytes() if record.exists() else None
    assert after == before  # --no-record appends nothing


def fake_row(run_id, gpu, date, group, name, size, rate, **extra):
    machine = {
        "cpu": "Fake CPU",
        "cores": 16,
        "gpu": gpu,
        "driver": "550.1",
        "torch": "2.11.0",
        "cuda": "12.8",
        "dali": "2.4.0",
        "git_sha": "abcdef1234",
        "git_dirty": False,
        "date_utc": date,
    }
    return {
        "run_id": run_id,
        "unit": "images/s",
        "machine": machine,
        "settings": {"source": "SYNTHETIC stand-in"},
        "group": group,
        "name": name,
        "image_size": size,
        "device": "cuda",
        "images_per_s": rate,
        "min": rate and rate * 0.9,
        "max": rate and rate * 1.1,
        "repeats": 5 if rate else 0,
        "status": "ok" if rate else "skipped",
        "note": "" if rate else "skipped: DALI not installed",
        **extra,
    }


def test_render_results_makes_one_table_per_machine_and_quotes_the_blog(tmp_path):
    render = load_script("render_results")
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        fake_row("old", "NVIDIA H100", "2025-01-01T00:00:00Z", "loader", "reference", 64, 111.0),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "loader", "reference", 64, 1234.0),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "loader", "dali", 64, None),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "model", "compiled", 227, 20000.0),
        fake_row(
            "new",
            "NVIDIA H100",
            "2025-02-01T00:00:00Z",
            "e2e",
            "fastalex",
            64,
            50000.0,
            epoch_s_100k=2.0,
        ),
        fake_row("cpu", None, "2025-01-15T00:00:00Z", "pack", "pack", None, 900.0),
    ]
    lines = [json.dumps(r) + "\n" for r in rows] + ["not json\n"]
    (results / "throughput.jsonl").write_text("".join(lines))
    run = tmp_path / "runs" / "fast-16"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps(
            {  # as train.py writes it: percent, per-epoch times
                "recipe": "fast",
                "arch": "alexnet64",
                "image_size": 64,
                "epochs": 16,
                "device": "cuda:0 (NVIDIA H100)",
                "epoch_s": [30.0, 12.0, 12.5, 13.0],
                "images_per_s": 8000.0,
                "top1": 43.21,
                "top5": 67.89,
            }
        )
    )
    out = tmp_path / "RESULTS.md"
    assert render.main([str(run), "--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "generated by benchmarks/render_results.py — do not edit" in text
    assert "### NVIDIA H100" in text and "### CPU only" in text  # one table per machine
    assert "1,234 (1,111–1,357, spread 20 %)" in text and "| 111 (" not in text  # latest run only
    assert "20,000" in text and "227 px" in text and "2 s/epoch" in text
    assert "DALI not installed" in text  # skipped rows keep their reason
    assert (
        "| fast-16 | not recorded | fast | alexnet64 | 64 | cuda:0 (NVIDIA H100) | 16 | 12.5 "
        "| 8,000 | not recorded | 43.21 | 67.89 |"
    ) in text  # epoch time: the median after
    # the first epoch; a summary from before the loader wait was recorded says so
    blog = next(line for line in text.splitlines() if "31.75" in line)
    assert (
        "quoted, not measured here" in blog and "58.76" in blog and "~860" in blog and "T4" in blog
    )
    assert "1,234 (1,111–1,357, spread 20 %) |" in text  # the reference row: no speed-up


def test_render_results_bolds_only_significant_ratios_and_shows_the_loader_wait(tmp_path):
    render = load_script("render_results")
    date = "2025-02-01T00:00:00Z"
    rows = [
        fake_row("r", "NVIDIA H100", date, "e2e", "reference", 64, 1000.0),  # 900-1100
        fake_row("r", "NVIDIA H100", date, "e2e", "fastalex", 64, 3000.0, wait_pct=7.4),
        fake_row("r", "NVIDIA H100", date, "loader", "reference", 64, 1000.0),
        fake_row("r", "NVIDIA H100", date, "loader", "cpu", 64, 1150.0),  # 1035-1265: overlaps
    ]
    (tmp_path / "throughput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "RESULTS.md"
    assert render.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "3,000 (2,700–3,300, spread 20 %), wait 7 %, **3.0×**" in text
    assert "1,150 (1,035–1,265, spread 20 %), 1.1× (n.s.)" in text and "**1.1×**" not in text
    assert "(n.s.) when they overlap" in text  # the footnote says what the mark means


def test_render_results_without_results_says_so(tmp_path):
    render = load_script("render_results")
    out = tmp_path / "RESULTS.md"
    assert render.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert "No throughput results recorded yet" in out.read_text()
    assert "quoted, not measured here" in out.read_text()


def write_run(run: Path, epochs: int, top1: float) -> Path:
    run.mkdir(parents=True)
    lines = [
        {
            "epoch": e,
            "lr": 0.1 / e,
            "train_loss": 5 / e,
            "train_top1": top1 * e / epochs,
            "val_loss": 5.2 / e,
            "val_top1": top1 * e / epochs,
            "val_top5": min(1, 2 * top1 * e / epochs),
            "epoch_s": 10.0,
            "images_per_s": 9000.0 + e,
        }
        for e in range(1, epochs + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.mark.slow  # trains or starts processes
def test_plot_runs_overlays_runs_into_a_png(tmp_path):
    from fastalex.plot import plot_runs

    runs = [write_run(tmp_path / "a", 4, 0.3), write_run(tmp_path / "b", 6, 0.4)]
    (runs[1] / "metrics.jsonl").write_text(
        (runs[1] / "metrics.jsonl").read_text() + json.dumps({"epoch": 7, "train_loss": 0.5}) + "\n"
    )  # a line with missing keys is drawn where it has values
    png = plot_runs(runs, tmp_path / "plots" / "curves.png")
    assert png == tmp_path / "plots" / "curves.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


@pytest.mark.slow  # trains or starts processes
def test_plot_throughput_axis_starts_at_zero(tmp_path):
    from fastalex.plot import draw_runs, read_metrics

    run = write_run(tmp_path / "a", 4, 0.3)  # 9001..9004 images/s: zoomed, a wobble looks huge
    figure = draw_runs([("a", read_metrics(run))])
    bottom, top = figure.axes[2].get_ylim()
    assert figure.axes[2].get_title() == "throughput" and bottom == 0 and top > 9004
    import matplotlib.pyplot

    matplotlib.pyplot.close(figure)


def test_plotting_works_after_the_quickstart_install():
    """`pip install -e .` (the Quickstart's) brings matplotlib: fastalex plot and tools/ need it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((BENCHMARKS.parent / "pyproject.toml").read_text())
    assert any(dep.startswith("matplotlib") for dep in pyproject["project"]["dependencies"])


def test_plot_runs_names_a_directory_without_metrics(tmp_path):
    from fastalex.plot import plot_runs

    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "out.png")


def test_reference_crop_box_follows_torchvision_rules():
    reference = load_script("reference")
    torch.manual_seed(0)
    areas = []
    for _ in range(500):
        top, left, h, w = reference.random_resized_crop_box(64, 64)
        assert 0 <= top <= 64 - h and 0 <= left <= 64 - w and h >= 1 and w >= 1
        areas.append(h * w / 64**2)
    assert min(areas) < 0.2 and max(areas) > 0.9  # scale (0.08, 1)
    # No draw fits a 1-px-tall strip: the fallback is the centre crop clamped to ratio 4/3.
    assert reference.random_resized_crop_box(100, 1) == (0, 49, 1, 1)


def test_reference_transform_output_and_the_noop_resize(tmp_path):
    reference = load_script("reference")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    assert reference.resize_shorter(image, 64) is image  # torchvision returns it untouched
    assert reference.resize_shorter(image, 227).size == (227, 227)
    assert reference.resize_shorter(Image.new("RGB", (64, 32)), 227).size == (454, 227)
    for size in (64, 227):
        torch.manual_seed(1)
        tensor = reference.ReferenceTrainTransform(size)(image)
        assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
        assert tensor.is_contiguous()
        low = (0 - max(reference.IMAGENET_MEAN)) / min(reference.IMAGENET_STD)
        high = (1 - min(reference.IMAGENET_MEAN)) / min(reference.IMAGENET_STD)
        assert low - 1e-5 <= tensor.min() and tensor.max() <= high + 1e-5
    # A crop of the whole image, no flip: exactly ToTensor + Normalize of the pixels.
    gray = Image.new("RGB", (64, 64), (128, 64, 32))
    tensor = reference.ReferenceTrainTransform(64)(gray)
    mean, std = torch.tensor(reference.IMAGENET_MEAN), torch.tensor(reference.IMAGENET_STD)
    expected = (torch.tensor([128, 64, 32]) / 255 - mean) / std
    assert torch.allclose(tensor[:, 10, 10], expected, atol=1e-6)


def test_reference_e2e_step_runs_the_model_less_its_normalisation():
    """The reference e2e row feeds the blog's normalised floats to NormalisedInput: on floats the
    model's own constants normalised it gives the logits the model gives on the pixels (the same
    network, its first op done by the loader), and it does skip that op."""
    bench_model = load_script("bench_model")
    from fastalex.model import build_model, normalise_pixels

    torch.manual_seed(0)
    model = build_model("alexnet64", 10, 64).eval()
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    reference = bench_model.NormalisedInput(model)
    with torch.no_grad():
        logits = model(pixels)
        assert torch.allclose(reference(normalise_pixels(model, pixels)), logits, atol=1e-6)
        assert not torch.allclose(reference(pixels.float()), logits, atol=1e-3)
    with pytest.raises(bench_model.Skip, match="AlexNet arch"):
        bench_model.NormalisedInput(build_model("alexnet-tv", 10, 64))


def test_reference_loader_reads_an_image_folder_in_class_order(synth_tree):
    reference = load_script("reference")
    loader = reference.ReferenceLoader(
        synth_tree / "train", 64, batch_size=16, device="cpu", workers=0
    )
    dataset = loader.dataset
    assert dataset.classes == sorted(dataset.classes) and len(dataset) == 240 and len(loader) == 15
    assert [label for _, label in dataset.samples] == sorted(label for _, label in dataset.samples)
    batch = next(iter(loader))
    assert batch.images.shape == (16, 3, 64, 64) and batch.labels.dtype == torch.int64


def test_unpacked_pack_is_a_source_tree_with_the_same_samples(synth_pack, tmp_path):
    bench_data = load_script("bench_data")
    from fastalex.shards import read_manifest
    from fastalex.sources.tinyimagenet import open_source, read_layout

    tree = bench_data.unpack_shards(synth_pack, tmp_path / "tree")
    layout = read_layout(open_source(tree))
    manifest = read_manifest(synth_pack)
    assert [wnid for wnid, _ in layout.classes] == [wnid for wnid, _ in manifest.classes]
    assert len(layout.train) == manifest.splits["train"].samples == 240
    assert len(layout.val) == manifest.splits["val"].samples == 60
    assert sorted(np.bincount([label for _, label in layout.train])) == [40] * 6


def test_only_busy_loop_runs_feed_the_busy_loop_ratios(tmp_path):
    render = load_script("render_results")
    row = {"run_id": "r", "machine": {}, "group": "loader", "name": "cpu"}
    (tmp_path / "loader-64-beside-a-busy-loop.jsonl").write_text(json.dumps(row) + "\n")
    other = dict(row, run_id="other")
    (tmp_path / "loader-64-beside-spdl-idle-threads.jsonl").write_text(json.dumps(other) + "\n")
    assert [r["run_id"] for r in render.read_rows(tmp_path, render.BUSY_LOOP_RUNS)] == ["r"]
    assert len(render.read_rows(tmp_path)) == 2


def test_training_table_marks_a_synthetic_run_as_such():
    render = load_script("render_results")
    data = {
        "synthetic": True,
        "classes": 10,
        "train_images": 1000,
        "val_images": 200,
        "source": "/x/s",
    }
    assert render.describe_data(data).startswith("**synthetic stand-in**, 10 classes")
    assert render.describe_data(dict(data, synthetic=False)).startswith("s, 10 classes")


def test_training_table_shows_how_long_each_run_waited_on_its_loader():
    render = load_script("render_results")
    summaries = [("new", {"loader_wait_s": 12.34, "loader_wait_pct": 23.6}), ("old", {})]
    table = render.training_table(summaries)
    assert "waited on the loader" in table[0]
    assert "| 12.3 s (24 %) |" in table[2] and "| not recorded |" in table[3]


# --- the harness: interleaving, spread and significance, on given numbers and a fake clock -------


def test_schedule_rotates_the_order_and_runs_every_row_once_per_round():
    harness = load_script("harness")
    rounds = harness.schedule(["a", "b", "c"], 7)
    assert rounds[:4] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(sorted(order) == ["a", "b", "c"] for order in rounds)
    six = harness.schedule(["a", "b", "c"], 6)  # over n rounds each row holds each place once
    assert all(sorted(order[place] for order in six[:3]) == ["a", "b", "c"] for place in range(3))
    assert harness.schedule(["only"], 3) == [["only"]] * 3
    assert harness.schedule([], 3) == []


def test_summary_gives_median_min_max_and_spread_of_given_rates():
    spread = load_script("spread")
    row = spread.summarize([10.0, 12.0, 11.0, 40.0, 11.5])
    assert (row["images_per_s"], row["min"], row["max"]) == (11.5, 10.0, 40.0)
    assert row["spread_pct"] == pytest.approx(100 * 30 / 11.5)
    assert row["repeats"] == 5 and row["rates"] == [10.0, 12.0, 11.0, 40.0, 11.5]
    assert spread.summarize([20.0, 20.0])["spread_pct"] == 0
    with pytest.raises(ValueError):
        spread.summarize([])
    # Rows recorded before spread_pct existed: computed from their min, max and median.
    assert spread.row_spread({"images_per_s": 50.0, "min": 45.0, "max": 55.0}) == pytest.approx(20)
    assert spread.row_spread({"images_per_s": None, "min": None, "max": None}) is None


def test_a_ratio_is_significant_only_when_the_ranges_are_apart():
    spread = load_script("spread")
    base = {"min": 100.0, "max": 110.0}
    assert spread.significant({"min": 111.0, "max": 130.0}, base) is True
    assert spread.significant({"min": 80.0, "max": 99.0}, base) is True
    assert spread.significant({"min": 105.0, "max": 130.0}, base) is False  # overlap
    assert spread.significant({"min": 110.0, "max": 130.0}, base) is False  # touching
    assert spread.significant({"min": 90.0, "max": 120.0}, base) is False  # one holds the other
    assert spread.significant({"min": None, "max": None}, base) is None


class FakeClock:
    """A clock that moves only when a fake row works: run_group's arithmetic on known times."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_subject(harness, clock, calls, name, seconds=0.25, images=10, fail_at=None, **fields):
    def advance():
        calls.append(name)
        if fail_at is not None and calls.count(name) == fail_at:
            raise RuntimeError(f"{name} broke")
        clock.now += seconds
        return images

    return harness.Subject(advance=advance, info={"note": f"fake {name}"}, **fields)


def test_run_group_interleaves_rows_in_rotating_windows_and_summarises_them():
    harness = load_script("harness")
    clock, calls, resets, closed = FakeClock(), [], [], []
    waited = [0.0]

    def waiting(advance):  # 0.1 s of each 0.25 s call blocked on the loader
        def wrapped():
            waited[0] += 0.1
            return advance()

        return wrapped

    def build(name, **fields):
        subject = fake_subject(
            harness, clock, calls, name, close=lambda: closed.append(name), **fields
        )
        if name == "b":
            subject.advance = waiting(subject.advance)
            subject.waited_s = lambda: waited[0]
            subject.reset = lambda: resets.append(name)
        return subject

    timing = harness.Timing(
        repeats=4, warmup=2, window_calls=1, window_s=1.0, lead_in=1, lead_in_s=0.5
    )
    rows = harness.run_group(
        "loader",
        64,
        torch.device("cpu"),
        {n: (lambda n=n: build(n)) for n in ("a", "b", "c")},
        timing,
        clock=clock,
    )
    assert [r["name"] for r in rows] == ["a", "b", "c"] and sorted(closed) == ["a", "b", "c"]
    # Each row is warmed up (2 calls) as it is built; then per window 2 lead-in calls (0.5 s of
    # 0.25 s calls) and 4 timed ones (1 s): in rounds whose order rotates.
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    runs = [calls[i] for i in range(6, len(calls), 6)]
    assert all(calls[i : i + 6] == [calls[i]] * 6 for i in range(6, len(calls), 6))
    assert runs == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert resets == ["b"] * 4  # before each of b's windows, untimed
    for row in rows:
        assert row["status"] == "ok" and row["repeats"] == 4
        assert row["note"] == f"fake {row['name']}"
        assert row["window_calls"] == [4] * 4 and row["window_seconds"] == [1.0] * 4
        assert row["images_per_s"] == row["min"] == row["max"] == 40.0 and row["spread_pct"] == 0
        assert row["warmup_s"] == 0.5 and row["setup_s"] == 0.0
    assert rows[1]["wait_pct"] == pytest.approx(40.0)  # 0.4 s of each 1 s window
    assert "wait_pct" not in rows[0]  # only rows that report waiting


def test_run_group_keeps_going_past_rows_that_skip_or_fail_and_says_why():
    harness = load_script("harness")
    clock, calls, closed = FakeClock(), [], []

    def skip():
        raise harness.Skip("no DALI here")

    def missing():
        raise ImportError("No module named 'ffcv'")

    builders = {
        "skips": skip,
        "missing": missing,
        "breaks": lambda: fake_subject(
            harness, clock, calls, "breaks", fail_at=5, close=lambda: closed.append("breaks")
        ),
        "works": lambda: fake_subject(harness, clock, calls, "works", compiles=True),
    }
    timing = harness.Timing(repeats=3, warmup=1, window_calls=2, window_s=0.0)
    rows = {
        r["name"]: r
        for r in harness.run_group("model", 64, torch.device("cpu"), builders, timing, clock=clock)
    }
    assert (rows["skips"]["status"], rows["skips"]["note"]) == ("skipped", "skipped: no DALI here")
    assert rows["missing"]["status"] == "skipped"
    assert "not importable here" in rows["missing"]["note"]
    assert rows["breaks"]["status"] == "failed"
    assert rows["breaks"]["note"] == "failed: RuntimeError: breaks broke"
    assert closed == ["breaks"] and calls.count("breaks") == 5  # out of the rotation once broken
    for name in ("skips", "missing", "breaks"):
        assert rows[name]["images_per_s"] is None and rows[name]["repeats"] == 0
    assert rows["works"]["status"] == "ok" and rows["works"]["repeats"] == 3
    assert rows["works"]["window_calls"] == [2, 2, 2] and rows["works"]["compile_s"] == 0.25


def test_settle_waits_for_an_idle_machine_and_no_longer_than_its_limit():
    harness = load_script("harness")
    now = [0.0]

    def clock():
        return now[0]

    def samples(*shares):
        left = list(shares)

        def busy():
            now[0] += 0.1
            return left.pop(0) if left else 1.0

        return busy

    now[0] = 0.0
    assert harness.settle(5.0, samples(0.9, 0.6, 0.05), clock) and now[0] == pytest.approx(0.3)
    now[0] = 0.0
    assert not harness.settle(1.0, samples(), clock) and 1.0 <= now[0] <= 1.2  # one sample over
    assert harness.settle(1.0, lambda: None, clock)  # no /proc/stat: nothing to wait for
    assert harness.settle(0.0, samples(), clock)  # settling off
    share = harness.cpu_busy_share(0.05)
    assert share is None or 0.0 <= share <= 1.0


def test_a_row_that_pauses_is_paused_after_each_window_and_never_inside_one():
    harness = load_script("harness")
    events = []
    subject = harness.Subject(
        advance=lambda: events.append("call") or 1, pause=lambda: events.append("pause")
    )
    timing = harness.Timing(repeats=2, warmup=0, window_calls=3, window_s=0.0, lead_in=1)
    for _ in range(2):
        assert harness.timed(subject, torch.device("cpu"), timing, time.perf_counter)[:2] == (3, 3)
    assert events == (["call"] * 4 + ["pause"]) * 2  # lead-in + window, then the pause


def test_quick_settings_time_loader_rows_with_a_lead_in_and_model_rows_without():
    throughput = load_script("throughput")
    args = throughput.parse_args(["--quick", "--device", "cpu"])
    assert args.repeats == 3 and args.window_s == 0
    loader, model = throughput.timing_for(args, "loader"), throughput.timing_for(args, "model")
    assert loader.lead_in == 1 and model.lead_in == 0 and model.lead_in_s == 0
    full = throughput.parse_args(["--device", "cpu", "--only", "loader", "--repeats", "9"])
    assert full.repeats == 9 and full.window_s == 1.0
    assert throughput.timing_for(full, "loader").lead_in_s == 0.5
    assert throughput.timing_for(full, "loader").settle_s == 10.0
    assert throughput.timing_for(args, "loader").settle_s == 0  # --quick does not wait
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cpu", "--repeats", "2"])


def test_table_marks_a_ratio_whose_ranges_overlap_as_not_significant():
    report = load_script("report")

    def row(name, median, low, high, **extra):
        return {
            "group": "loader",
            "name": name,
            "image_size": 64,
            "images_per_s": median,
            "min": low,
            "max": high,
            "status": "ok",
            "note": "",
            **extra,
        }

    rows = [
        row("reference", 100.0, 95.0, 105.0),
        row("cpu", 300.0, 290.0, 320.0),
        row("dali", 104.0, 100.0, 130.0, wait_pct=12.0),
    ]
    table = report.format_table(rows)
    cpu_line = next(line for line in table.splitlines() if line.startswith("loader  cpu"))
    dali_line = next(line for line in table.splitlines() if line.startswith("loader  dali"))
    assert "3.00" in cpu_line and "n.s." not in cpu_line and "10.0%" in cpu_line
    assert "1.04 n.s." in dali_line and "28.8%" in dali_line and "12%" in dali_line
    ratios = report.format_ratios(rows)
    assert "cpu is 3.00x reference (ranges apart)" in ratios
    assert "dali is 1.04x reference (NOT SIGNIFICANT" in ratios


def test_ffcv_row_loader_keeps_the_batch_contract(synth_pack, tmp_path):
    pytest.importorskip("ffcv")  # the optional peer row: README, Benchmarks, says how to get it
    ffcv_loader = load_script("ffcv_loader")
    from fastalex.config import TrainConfig

    path = ffcv_loader.beton_path(synth_pack, "train", tmp_path)
    assert path.parent == synth_pack.parent / f"{synth_pack.name}.ffcv"  # cached beside the pack
    assert ffcv_loader.write_beton(synth_pack, "train", path, workers=2) == path
    written = path.stat().st_mtime_ns
    assert ffcv_loader.write_beton(synth_pack, "train", path, workers=2) == path  # reused
    assert path.stat().st_mtime_ns == written and not list(path.parent.glob("*.part"))
    cfg = TrainConfig(
        shards=str(synth_pack), image_size=48, batch_size=16, loader="cpu", device="cpu"
    )
    loader = ffcv_loader.FfcvLoader(cfg, path, torch.device("cpu"), workers=2)
    try:
        assert loader.backend == "ffcv" and len(loader) == 240 // 16
        batches = list(loader)
        assert len(batches) == len(loader)
        images, labels = batches[0]
        # What fastalex's loaders hand over: uint8 pixels, channels_last; the model normalises.
        assert images.shape == (16, 3, 48, 48) and images.dtype == torch.uint8
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (16,)
        seen = torch.cat([batch.labels for batch in batches])
        assert seen.min() >= 0 and seen.max() < 6
        assert images.float().std() > 10  # pixels of images, not a constant
        assert loader.hands_over.startswith("uint8 pixels")
    finally:
        loader.close()


@pytest.mark.slow  # trains or starts processes
def test_loader_memory_reports_the_bounded_canvas_of_a_mixed_size_pack(mixed_pack, launch):
    """benchmarks/loader_memory.py runs (two steps' worth: one epoch of a tiny pack) and says
    which canvas the loader decoded the 2000 x 1000 photo onto."""
    job = launch(
        [
            sys.executable,
            BENCHMARKS / "loader_memory.py",
            "--data",
            mixed_pack,
            "--loader",
            "cpu",
            "--batch-size",
            "8",
            "--epochs",
            "1",
        ]
    )
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stdout + stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["loader"] == "cpu" and max(report["largest_image_px"]) >= 2000
    assert report["canvas_px"] == [128, 128] and "128 x 128 canvases" in report["summary"]
    assert report["peak_rss_mib"] > 0 and report["images_per_s_last_epoch"] > 0


def test_rows_measured_on_different_data_never_share_a_table():
    render = load_script("render_results")
    machine = {"cpu": "Xeon", "cores": 2, "date_utc": "2026-12-01T00:00:00Z"}

    def row(run_id, data, rate):
        return {
            "run_id": run_id,
            "machine": machine,
            "group": "loader",
            "name": "cpu",
            "image_size": 64,
            "images_per_s": rate,
            "settings": {"data": data},
        }

    latest = render.latest_runs([row("a", "/packs/tiny", 100.0), row("b", "/packs/photos", 5.0)])
    assert sorted(data for _, data in latest) == ["/packs/photos", "/packs/tiny"]
    text = render.render([row("a", "/packs/tiny", 100.0), row("b", "/packs/photos", 5.0)], [])
    assert "data /packs/tiny" in text and "data /packs/photos" in text


def test_results_say_how_far_medians_and_ratios_move():
    """Three idle runs give each row's range around their mean; a run beside a busy loop is
    set against the latest idle one, ratio by ratio."""
    render = load_script("render_results")

    def run(run_id, date, reference, cpu):
        machine = {"cpu": "Xeon", "cores": 2, "date_utc": date}
        return [
            {
                "run_id": run_id,
                "machine": machine,
                "group": "loader",
                "name": name,
                "image_size": 64,
                "images_per_s": rate,
                "settings": {"data": "/p"},
            }
            for name, rate in (("reference", reference), ("cpu", cpu))
        ]

    idle = run("a", "1", 100.0, 900.0) + run("b", "2", 100.0, 1000.0) + run("c", "3", 100.0, 1100.0)
    busy = run("d", "4", 50.0, 1000.0)
    text = "\n".join(render.trust_section(idle, busy))
    assert "- cpu: 900, 1,000, 1,100 (-10 % to +10 %)" in text
    assert "- cpu: 11.00× idle, 20.00× busy (1.82 of the idle ratio)" in text
    assert render.trust_section(idle[:4], []) == []  # two runs: nothing to say


# --- the spdl peer row ---------------------------------------------------------------------------


def spdl_importable() -> bool:
    """Whether spdl_loader imports here: spdl installed and its FFmpeg libraries found. Any other
    ImportError (spdl_loader's own imports from fastalex) fails the test instead of skipping it."""
    if importlib.util.find_spec("spdl") is None:
        return False
    try:
        load_script("spdl_loader")
    except ImportError as e:
        if "FFmpeg" not in str(e):
            raise
        return False
    return True


def spdl_loader_or_skip():
    if not spdl_importable():
        pytest.skip("spdl (and FFmpeg's libraries) not installed: see benchmarks/spdl_loader.py")
    return load_script("spdl_loader")


def spdl_config(pack, **fields):
    from fastalex.config import TrainConfig

    return TrainConfig(shards=str(pack), loader="cpu", device="cpu", **fields)


def test_spdl_row_loader_keeps_the_batch_contract(coded_pack):
    """Every batch uint8 pixels channels_last (N, 3, S, S), as fastalex's loaders hand theirs
    over, with its images' labels; each sample at most once per epoch, full batches only, a new
    order each epoch."""
    spdl_loader = spdl_loader_or_skip()
    cfg = spdl_config(coded_pack.path, image_size=48, batch_size=32)
    loader = spdl_loader.SpdlLoader(cfg, torch.device("cpu"), workers=2)
    try:
        assert loader.backend == "spdl" and len(loader) == 280 // 32
        epochs = []
        for _ in range(2):
            ids = []
            for images, labels in loader:
                assert images.shape == (32, 3, 48, 48) and images.dtype == torch.uint8
                assert images.is_contiguous(memory_format=torch.channels_last)
                assert labels.dtype == torch.int64 and labels.shape == (32,)
                found = coded_pack.decode(images)  # flat colours: any crop keeps the id
                np.testing.assert_array_equal(labels.numpy(), found % coded_pack.classes)
                ids.append(found)
            epochs.append(np.concatenate(ids))
        for ids in epochs:
            assert len(ids) == len(loader) * 32 and len(set(ids)) == len(ids)
            assert set(ids) <= set(coded_pack.ids["train"])
        # Random order, a new one each epoch: the first batch is drawn from the whole split.
        position = {image_id: i for i, image_id in enumerate(coded_pack.ids["train"])}
        assert all(max(position[i] for i in ids[:32]) > 64 for ids in epochs)
        assert len(set(epochs[0][:32]) & set(epochs[1][:32])) < 16  # ~32 * 32 / 280 = 3.7
        loader.pause()  # the benchmark's, after each window: threads stopped, restarted on iter
        assert loader.pipeline is None
        images, labels = next(iter(loader))
        assert images.shape == (32, 3, 48, 48) and loader.pipeline is not None
    finally:
        loader.close()


def test_spdl_row_crops_resizes_and_flips_as_the_config_says(ramp_pack):
    """On images whose red rises 3 levels a pixel along x, each output row's red span gives the
    crop's width (S output px from w input px) and its sign the flip: about half flipped, widths
    spread over the config's area and aspect ranges: never narrower than its smallest area at
    its narrowest aspect, never wider than the image."""
    spdl_loader = spdl_loader_or_skip()
    size = 32
    cfg = spdl_config(ramp_pack.path, image_size=size, batch_size=32)
    loader = spdl_loader.SpdlLoader(cfg, torch.device("cpu"), workers=1)
    try:
        images = torch.cat([batch.images for batch in loader])
    finally:
        loader.close()
    red = images[:, 0, size // 2].double()  # (N, S) pixels, 0..255
    step = (red[:, -2] - red[:, 1]) / (size - 3)  # levels per output px, interior columns
    widths = step.abs() * size / ramp_pack.slope  # input px the crop spans
    flipped = (step < 0).double().mean().item()
    assert 0.3 < flipped < 0.7
    narrowest = 64 * math.sqrt(cfg.crop_scale_min * cfg.crop_ratio_min)  # 32.7 px at 0.35, 3/4
    assert widths.max() <= 64 * 1.05 and widths.min() >= narrowest * 0.95  # JPEG's few levels
    assert widths.max() - widths.min() > 25  # random sizes, not one fixed crop


def test_spdl_row_is_skipped_saying_why_without_spdl(monkeypatch):
    bench_loader = load_script("bench_loader")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "spdl_loader", raising=False)
    for name in ("spdl", "spdl.io", "spdl.pipeline"):
        monkeypatch.setitem(sys.modules, name, None)  # `import spdl...` raises ImportError
    args = type("Args", (), {"batch_size": 4, "batches": 0})()
    with pytest.raises(bench_loader.Skip, match="spdl is not importable here .*spdl_loader.py"):
        bench_loader.spdl_row(args, None, 64, torch.device("cpu"))


def test_spdl_without_ffmpeg_libraries_is_an_import_error(monkeypatch):
    """spdl.io loads FFmpeg lazily: spdl_loader's import loads it, so a machine without the
    libraries skips the row instead of failing it part-way."""
    spdl_io = pytest.importorskip("spdl.io")

    def no_ffmpeg(*args, **kwargs):
        raise RuntimeError("Failed to import libspdl. libavutil.so.57: cannot open shared object")

    monkeypatch.setattr(spdl_io, "demux_config", no_ffmpeg)
    with pytest.raises(ImportError, match="no FFmpeg 4-9 shared libraries.*libavutil.so.57"):
        load_script("spdl_loader")


def test_render_results_appends_the_notes_on_peer_rows(tmp_path):
    """results/notes/*.md (the spdl row's install and differences) land in RESULTS.md verbatim,
    after the throughput tables, so re-rendering keeps them."""
    render = load_script("render_results")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.md").write_text("## Second note\n\nbbb\n")
    (tmp_path / "notes" / "a.md").write_text("## The spdl row\n\napt-get install libavutil57\n")
    out = tmp_path / "RESULTS.md"
    assert render.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.index("## The spdl row\n\napt-get install libavutil57") < text.index("bbb")
    assert text.index("bbb") < text.index("## Training runs")
    shipped = (BENCHMARKS / "results" / "notes" / "spdl.md").read_text().strip()
    assert shipped in (BENCHMARKS / "RESULTS.md").read_text()  # RESULTS.md was re-rendered


@pytest.mark.slow  # starts a process
def test_pack_scale_reports_images_per_s_memory_and_bytes_read_per_source_byte(tmp_path):
    pytest.importorskip("pyarrow")
    results = tmp_path / "pack_scale.jsonl"
    command = [sys.executable, BENCHMARKS / "pack_scale.py", "--images", "10000", "--classes", "4"]
    command += ["--shard-size", "1000", "--row-group", "100", "--workdir", tmp_path / "work"]
    done = subprocess.run(
        [str(part) for part in command + ["--results", results]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(results.read_text())
    assert row["images"] == 10000 and row["images_per_s"] > 0 and row["peak_rss_mib"] > 0
    assert 1.0 < row["read_per_source_byte"] <= 1.2, row  # each row group read once
    assert row["machine"]["cpu"]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_rows_are_skipped_where_the_cpu_only_emulates_bf16(synth_pack, native_bf16, native):
    """On a CPU without native bf16 the e2e group's bf16 rows and the model group's amp row skip
    with the reason (an emulated bf16 window takes minutes there); with it they are built."""
    native_bf16(native)
    throughput = load_script("throughput")
    bench_e2e, bench_model, harness = (
        load_script(n) for n in ("bench_e2e", "bench_model", "harness")
    )
    args = throughput.parse_args(["--quick", "--device", "cpu"])
    data = load_script("bench_data").Data(shards=synth_pack)
    cpu = torch.device("cpu")
    builders = [bench_e2e.rows(args, data, 64, cpu)["bf16-eager-cpu"]]
    builders.append(lambda: bench_model.model_row(args, "amp", 64, cpu))
    for build in builders:
        if native:
            subject = build()
            getattr(subject, "close", lambda: None)()
        else:
            with pytest.raises(bench_model.Skip, match="no native bf16"):  # the scripts' Skip
                build()
