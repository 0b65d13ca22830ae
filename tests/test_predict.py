"""predict: the val transform of a checkpoint's own run, files/dirs/globs with bad files in the
mix, header bombs refused undecoded, the precision this machine's rule picks whatever the run's
machine chose, and docs/using-the-model.md's commands (export's tests: test_export.py).

Tolerances:
- predict's input against the val loader's, per uint8 pixel: PIXEL_TOL, one grey level
  (measured 0). Both decode the same JPEG bytes with libjpeg-turbo (predict through Pillow, the
  loader through simplejpeg: wheels may bundle other builds) and resize with the same crop_resize
  (eager here, inductor-compiled in the loader: equal but for a rare rounding tie).
- Top-1 and loss against `fastalex eval`: exact and 1e-5 relative. Predict runs the batches eval
  runs (the run's batch size, the val order), under the runtime eval decides on this machine
  (float32 on a CPU), so the logits are the same computation; measured bit-identical.
- float32 logits of one computation done two ways (batch size, canvas): LOGIT_TOL = 1e-4 relative
  to the largest logit. The uint8 inputs are equal (but for a rare rounding tie), so what is left
  is float32 summation order (oneDNN picks kernels by batch size) through eight layers; measured
  <= 1e-6.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import Decided, spy_on_runtime
from PIL import Image

from fastalex.cli import main

USING = Path(__file__).resolve().parent.parent / "docs" / "using-the-model.md"
PIXEL_TOL = 1  # grey levels
LOGIT_TOL = 1e-4


def cli(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def val_loader_batches(checkpoint, hue_pack):
    """(images, labels) of the whole val split as the cpu loader hands them to evaluate."""
    from fastalex.checkpoint import inference_config, load_checkpoint
    from fastalex.loaders import Placement, build_loader

    cfg = inference_config(
        load_checkpoint(checkpoint),
        checkpoint,
        shards=str(hue_pack),
        device="cpu",
        loader="cpu",
        loader_workers=1,
    )
    loader = build_loader(cfg, "val", Placement(torch.device("cpu")))
    try:
        batches = list(loader)
    finally:
        loader.close()
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_predict_sees_the_val_transform_and_matches_eval(checkpoint, hue_pack, val_files):
    from fastalex.checkpoint import load_checkpoint
    from fastalex.evaluate import evaluate_checkpoint
    from fastalex.predict import load_model, read_image

    model = load_model(checkpoint, "cpu")
    paths, labels = val_files
    batches = range(0, len(paths), load_checkpoint(checkpoint)["config"]["batch_size"])
    pixels = [read_image(str(p)) for p in paths]
    images = torch.cat([model.preprocess(pixels[i : i + 32]) for i in batches])
    loader_images, loader_labels = val_loader_batches(checkpoint, hue_pack)
    assert loader_labels.tolist() == labels.tolist()
    assert images.shape == loader_images.shape == (128, 3, 64, 64)
    assert images.dtype == loader_images.dtype == torch.uint8
    assert (images.int() - loader_images.int()).abs().max() <= PIXEL_TOL

    logits = torch.cat([model.predict(pixels[i : i + 32]) for i in batches])  # eval's batches
    evaluated = evaluate_checkpoint(checkpoint, str(hue_pack), "cpu", "cpu", 1)
    assert evaluated["samples"] == len(labels)
    assert 100 * (logits.argmax(1).numpy() == labels).mean() == evaluated["top1"]
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    assert loss == pytest.approx(evaluated["loss"], rel=1e-5)


def predicted_paths(stdout: str) -> list[str]:
    """The image paths of predict's text output: the lines that are not indented class lines."""
    return [line for line in stdout.splitlines() if line and not line.startswith(" ")]


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_predict_names_each_bad_file_and_predicts_the_rest(
    checkpoint, val_files, tmp_path, bomb_jpeg
):
    paths, _ = val_files
    photos = tmp_path / "photos"
    (photos / "nested" / "deeper").mkdir(parents=True)
    for i in range(3):
        shutil.copy(paths[i], photos / f"val{i}.jpg")
    Image.open(paths[3]).convert("RGBA").save(photos / "nested" / "alpha.PNG")
    Image.open(paths[4]).resize((150, 90)).save(photos / "nested" / "deeper" / "wide.webp")
    data = paths[5].read_bytes()
    (photos / "broken.jpg").write_bytes(data[: len(data) // 2])  # truncated in the pixel data
    (photos / "bomb.jpg").write_bytes(bomb_jpeg())
    (photos / "notes.txt").write_text("no image extension: a directory does not offer it\n")
    more = tmp_path / "more"
    more.mkdir()
    for i in (6, 7):
        shutil.copy(paths[i], more / f"more{i}.jpg")
    Image.open(paths[8]).convert("L").save(more / "grey.png")  # not matched by *.jpg
    result = cli(
        "predict",
        checkpoint,
        photos,
        more / "*.jpg",
        paths[9],
        photos / "val0.jpg",
        tmp_path / "missing.jpg",
        "--top",
        2,
    )
    assert result.exit_code == 1, result.output
    skipped = result.stderr.strip().splitlines()
    assert len(skipped) == 3, result.stderr
    reasons = {line.split(": ", 1)[0]: line for line in skipped}
    assert "does not decode" in reasons[f"skipped {photos / 'broken.jpg'}"]
    assert "60000x60000 pixels" in reasons[f"skipped {photos / 'bomb.jpg'}"]
    assert "no such file" in reasons[f"skipped {tmp_path / 'missing.jpg'}"]
    expected = [
        photos / "nested" / "alpha.PNG",
        photos / "nested" / "deeper" / "wide.webp",
        photos / "val0.jpg",
        photos / "val1.jpg",
        photos / "val2.jpg",
        more / "more6.jpg",
        more / "more7.jpg",
        paths[9],
    ]  # val0.jpg once
    assert predicted_paths(result.stdout) == [str(p) for p in expected]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * len(expected)  # the path and its top 2
    assert all(
        re.fullmatch(r"  [ \d]{3}\.\d\d %  n\d{8}", line)  # the pack has no class names
        for line in lines
        if line.startswith(" ")
    )


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_a_header_bomb_is_refused_before_any_pixel_is_decoded(
    checkpoint, tmp_path, monkeypatch, bomb_jpeg
):
    import simplejpeg

    from fastalex.predict import predict_paths

    (tmp_path / "bomb.jpg").write_bytes(bomb_jpeg())

    def no_decoding(*args, **kwargs):
        raise AssertionError("a pixel was decoded")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "draft", no_decoding)
    out, err = [], []
    assert (
        predict_paths(checkpoint, [str(tmp_path)], device="cpu", write=out.append, warn=err.append)
        == 1
    )
    assert out == [] and len(err) == 1 and "over the limit" in err[0] and "not decoded" in err[0]


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_json_and_csv_carry_ids_names_and_probabilities(checkpoint, val_files):
    import csv

    from fastalex.checkpoint import load_checkpoint, model_card

    classes = model_card(load_checkpoint(checkpoint), checkpoint)["classes"]
    files = [str(p) for p in val_files[0][:5]]
    as_json = cli("predict", checkpoint, *files, "--json", "--top", 3)
    assert as_json.exit_code == 0, as_json.output
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["path"] for r in records] == files
    for record in records:
        top = record["top"]
        assert [t["rank"] for t in top] == [1, 2, 3]
        assert all([t["class"], t["name"]] == classes[t["index"]] for t in top)
        probabilities = [t["probability"] for t in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1 + 1e-6
    as_csv = cli("predict", checkpoint, *files, "--csv", "--top", 3)
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == 15 and list(rows[0]) == [
        "path",
        "rank",
        "index",
        "class",
        "name",
        "probability",
    ]
    for row, (record, top) in zip(rows, ((r, t) for r in records for t in r["top"])):
        assert (row["path"], int(row["index"]), row["name"]) == (
            record["path"],
            top["index"],
            top["name"],
        )
        assert float(row["probability"]) == pytest.approx(top["probability"], abs=1e-6)


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_images_of_any_size_predict_in_one_batch_as_they_would_alone(checkpoint, val_files):
    from fastalex.predict import load_model

    model = load_model(checkpoint, "cpu")  # float32 on a CPU: differences are not bf16 rounding
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (90, 150), (40, 30), (700, 300), (64, 64), (13, 97)]
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    together = model.predict(pixels)
    alone = torch.cat([model.predict([image]) for image in pixels])
    assert together.shape == (len(sizes), 4)
    assert (together - alone).abs().max() <= LOGIT_TOL * alone.abs().max()


def test_read_image_is_upright_rgb_with_alpha_on_white(tmp_path):
    from fastalex.predict import read_image

    rgba = Image.new("RGBA", (40, 20), (10, 20, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left quarter transparent
    rgba.save(tmp_path / "alpha.png")
    pixels = read_image(str(tmp_path / "alpha.png"))
    assert pixels.shape == (20, 40, 3) and pixels.dtype == np.uint8
    assert (pixels[:, :10] == 255).all() and (pixels[:, 10:] == (10, 20, 30)).all()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), "red").save(tmp_path / "side.jpg", exif=exif)
    assert read_image(str(tmp_path / "side.jpg")).shape == (40, 20, 3)
    Image.new("L", (900, 600), 128).save(tmp_path / "big.png")
    assert read_image(str(tmp_path / "big.png")).shape == (341, 512, 3)  # pack's max_side
    assert read_image(str(tmp_path / "big.png"), max_side=0).shape == (600, 900, 3)


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_user_errors_are_one_line_and_exit_2(checkpoint, val_files, tmp_path):
    old = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del old["normalisation"], old["classes"]
    torch.save(old, tmp_path / "old.pt")
    image = val_files[0][0]
    for args, message in (
        (("predict", tmp_path / "old.pt", image), "lacks classes, normalisation"),
        (("predict", tmp_path / "none.pt", image), "no checkpoint there"),
        (("predict", checkpoint, image, "--json", "--csv"), "one of --json and --csv"),
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.slow
def test_a_bf16_run_predicts_by_this_machines_rule(
    edited_checkpoint, val_files, fake_gpu, monkeypatch
):
    """A checkpoint whose run chose bf16 (a CPU probe does) predicts in float32 on a CPU, which
    runs no probe, and would predict in fp16 on a GPU without native bf16, not stop there."""
    import fastalex.predict
    from fastalex.predict import load_model, read_image

    bf16 = edited_checkpoint(config={"amp": "bf16", "compile": True})
    model = load_model(bf16, "cpu")
    assert (model.runtime.amp, model.runtime.compile) == ("off", False)
    logits = model.predict([read_image(str(p)) for p in val_files[0][:4]])
    assert logits.dtype == torch.float32 and logits.shape == (4, 4)

    decided = spy_on_runtime(monkeypatch, fastalex.predict, stop=True)
    fake_gpu((7, 0), "Tesla V100")
    with pytest.raises(Decided):
        load_model(bf16, "cuda")
    assert decided[0].device.type == "cuda" and decided[0].amp == "fp16"


# --- docs/using-the-model.md ------------------------------------------------------------------


def readme_blocks(language: str) -> list[str]:
    section = USING.read_text().split("\n## ", 1)[0]  # the page up to its "Evaluating" section
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_docs_using_the_model_commands_run(
    checkpoint, val_files, tmp_path, monkeypatch, without_fastalex
):
    commands = [
        line.split("  #", 1)[0].strip()
        for block in readme_blocks("bash")
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands and all(c.startswith("fastalex ") for c in commands)
    assert any(" predict " in c for c in commands) and any(" export " in c for c in commands)
    (tmp_path / "runs/fast/checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "runs/fast/checkpoints/best.pt")
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    paths = val_files[0]
    shutil.copy(paths[0], tmp_path / "photos" / "cat.jpg")
    Image.open(paths[1]).save(tmp_path / "photos" / "dog.png")
    Image.open(paths[2]).resize((300, 200)).save(tmp_path / "photos" / "trip" / "beach.jpg")
    monkeypatch.chdir(tmp_path)
    onnx = all(__import__("importlib").util.find_spec(m) for m in ("onnxscript", "onnxruntime"))
    for command in commands:
        if "onnx" in command and not onnx:
            continue
        command, _, redirect = command.partition(" > ")
        result = CliRunner().invoke(main, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
        if redirect:
            Path(redirect.strip()).write_text(result.stdout)
    for block in readme_blocks("python"):
        if "onnxruntime" in block and not onnx:
            continue
        stdout = without_fastalex(block, cwd=tmp_path)
        assert "%" in stdout, stdout
