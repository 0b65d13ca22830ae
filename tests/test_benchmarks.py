"""The benchmarks cannot rot: throughput.py runs end to end in --quick mode, render_results.py turns
recorded rows into RESULTS.md tables, plot_runs draws a PNG, and the reference pipeline behaves as
torchvision's transforms do."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastalex.errors import UserError

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ROW_KEYS = {"group", "name", "image_size", "device", "images_per_s", "min", "max", "repeats", "note"}
MACHINE_KEYS = {"cpu", "cores", "gpu", "driver", "torch", "cuda", "dali", "git_sha", "git_dirty",
                "date_utc"}


def load_script(name: str):
    """A benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.slow
def test_quick_throughput_reports_every_group_and_explains_skips(tmp_path):
    out = tmp_path / "out.json"
    record = BENCHMARKS / "results" / "throughput.jsonl"
    before = record.read_bytes() if record.exists() else None
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "throughput.py"), "--quick", "--device", "cpu",
         "--json", str(out), "--no-record"],
        capture_output=True, text=True, timeout=240,
    )
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

    assert {("loader", "reference")} | {("loader", b) for b in BACKENDS} <= names
    assert {("model", n) for n in ("eager-fp32", "channels-last", "amp", "compiled")} <= names
    assert {("e2e", "reference"), ("e2e", "fastalex"), ("pack", "pack")} <= names
    for row in rows:
        assert ROW_KEYS <= row.keys(), row
        assert row["device"] == "cpu"
        if row["images_per_s"] is None:  # skipped: never silently, never estimated
            assert row["note"].startswith(("skipped: ", "failed: ")) and len(row["note"]) > 12, row
            assert row["min"] is None and row["max"] is None
        else:
            assert row["repeats"] >= 3
            assert 0 < row["min"] <= row["images_per_s"] <= row["max"], row
    assert not [row for row in rows if row["status"] == "failed"], rows
    reference = next(r for r in rows if (r["group"], r["name"]) == ("loader", "reference"))
    assert reference["images_per_s"] and "torchvision" in reference["note"]
    assert next(r for r in rows if r["group"] == "pack")["images_per_s"] > 0
    amp = next(r for r in rows if (r["group"], r["name"]) == ("model", "amp"))
    assert "bf16" in amp["note"]  # measured with bf16 where the CPU has it, else skipped saying so
    compiled = next(r for r in rows if (r["group"], r["name"]) == ("model", "compiled"))
    assert compiled["images_per_s"] is None and "--quick" in compiled["note"]
    after = record.read_bytes() if record.exists() else None
    assert after == before  # --no-record appends nothing


def fake_row(run_id, gpu, date, group, name, size, rate, **extra):
    machine = {"cpu": "Fake CPU", "cores": 16, "gpu": gpu, "driver": "550.1", "torch": "2.11.0",
               "cuda": "12.8", "dali": "2.4.0", "git_sha": "abcdef1234", "git_dirty": False,
               "date_utc": date}
    return {"run_id": run_id, "unit": "images/s", "machine": machine,
            "settings": {"source": "SYNTHETIC stand-in"}, "group": group, "name": name,
            "image_size": size, "device": "cuda", "images_per_s": rate,
            "min": rate and rate * 0.9, "max": rate and rate * 1.1, "repeats": 5 if rate else 0,
            "status": "ok" if rate else "skipped",
            "note": "" if rate else "skipped: DALI not installed",
            **extra}


def test_render_results_makes_one_table_per_machine_and_quotes_the_blog(tmp_path):
    render = load_script("render_results")
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        fake_row("old", "NVIDIA H100", "2025-01-01T00:00:00Z", "loader", "reference", 64, 111.0),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "loader", "reference", 64, 1234.0),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "loader", "dali", 64, None),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "model", "compiled", 227, 20000.0),
        fake_row("new", "NVIDIA H100", "2025-02-01T00:00:00Z", "e2e", "fastalex", 64, 50000.0,
                 epoch_s_100k=2.0),
        fake_row("cpu", None, "2025-01-15T00:00:00Z", "pack", "pack", None, 900.0),
    ]
    lines = [json.dumps(r) + "\n" for r in rows] + ["not json\n"]
    (results / "throughput.jsonl").write_text("".join(lines))
    run = tmp_path / "runs" / "fast-16"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({  # as train.py writes it: percent, per-epoch times
        "recipe": "fast", "arch": "alexnet64", "image_size": 64, "epochs": 16,
        "device": "cuda:0 (NVIDIA H100)", "epoch_s": [30.0, 12.0, 12.5, 13.0], "images_per_s": 8000.0,
        "top1": 43.21, "top5": 67.89,
    }))
    out = tmp_path / "RESULTS.md"
    assert render.main([str(run), "--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "generated by benchmarks/render_results.py — do not edit" in text
    assert "### NVIDIA H100" in text and "### CPU only" in text  # one table per machine
    assert "1,234 (1,111–1,357)" in text and "| 111 (" not in text  # the latest run only
    assert "20,000" in text and "227 px" in text and "2 s/epoch" in text
    assert "DALI not installed" in text  # skipped rows keep their reason
    assert ("| fast-16 | not recorded | fast | alexnet64 | 64 | cuda:0 (NVIDIA H100) | 16 | 12.5 "
            "| 8,000 | 43.21 | 67.89 |") in text  # epoch time: the median after the first epoch
    blog = next(line for line in text.splitlines() if "31.75" in line)
    assert "quoted, not measured here" in blog and "58.76" in blog and "~860" in blog and "T4" in blog
    assert "1,234 (1,111–1,357) |" in text  # the reference row itself carries no speed-up


def test_render_results_without_results_says_so(tmp_path):
    render = load_script("render_results")
    out = tmp_path / "RESULTS.md"
    assert render.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert "No throughput results recorded yet" in out.read_text()
    assert "quoted, not measured here" in out.read_text()


def write_run(run: Path, epochs: int, top1: float) -> Path:
    run.mkdir(parents=True)
    lines = [
        {"epoch": e, "lr": 0.1 / e, "train_loss": 5 / e, "train_top1": top1 * e / epochs,
         "val_loss": 5.2 / e, "val_top1": top1 * e / epochs, "val_top5": min(1, 2 * top1 * e / epochs),
         "epoch_s": 10.0, "images_per_s": 9000.0 + e}
        for e in range(1, epochs + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_plot_runs_overlays_runs_into_a_png(tmp_path):
    from fastalex.plot import plot_runs

    runs = [write_run(tmp_path / "a", 4, 0.3), write_run(tmp_path / "b", 6, 0.4)]
    (runs[1] / "metrics.jsonl").write_text(
        (runs[1] / "metrics.jsonl").read_text() + json.dumps({"epoch": 7, "train_loss": 0.5}) + "\n"
    )  # a line with missing keys is drawn where it has values
    png = plot_runs(runs, tmp_path / "plots" / "curves.png")
    assert png == tmp_path / "plots" / "curves.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


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


def test_reference_loader_reads_an_image_folder_in_class_order(synth_tree):
    reference = load_script("reference")
    loader = reference.ReferenceLoader(synth_tree / "train", 64, batch_size=16, device="cpu", workers=0)
    dataset = loader.dataset
    assert dataset.classes == sorted(dataset.classes) and len(dataset) == 240 and len(loader) == 15
    assert [label for _, label in dataset.samples] == sorted(label for _, label in dataset.samples)
    batch = next(iter(loader))
    assert batch.images.shape == (16, 3, 64, 64) and batch.labels.dtype == torch.int64


def test_unpacked_pack_is_a_source_tree_with_the_same_samples(synth_pack, tmp_path):
    throughput = load_script("throughput")
    from fastalex.shards import read_manifest
    from fastalex.tinyimagenet import open_source, read_layout

    tree = throughput.unpack_shards(synth_pack, tmp_path / "tree")
    layout = read_layout(open_source(tree))
    manifest = read_manifest(synth_pack)
    assert [wnid for wnid, _ in layout.classes] == [wnid for wnid, _ in manifest.classes]
    assert len(layout.train) == manifest.splits["train"].samples == 240
    assert len(layout.val) == manifest.splits["val"].samples == 60
    assert sorted(np.bincount([label for _, label in layout.train])) == [40] * 6


def test_training_table_marks_a_synthetic_run_as_such():
    render = load_script("render_results")
    data = {"synthetic": True, "classes": 10, "train_images": 1000, "val_images": 200, "source": "/x/s"}
    assert render.describe_data(data).startswith("**synthetic stand-in**, 10 classes")
    assert render.describe_data(dict(data, synthetic=False)).startswith("s, 10 classes")
