"""export: programs that agree with the eager model (float32, what export computes in) and load
with torch (or onnxruntime) alone, with fastalex hidden from that Python but nothing else of its
sys.path; the sidecar's contract, and export's one-line errors.

Tolerances:
- float32 logits of one computation done two ways (eager and the exported graph, batch sizes):
  LOGIT_TOL = 1e-4 relative to the largest logit. The uint8 inputs are equal (but for a rare
  rounding tie), so what is left is float32 summation order (oneDNN picks kernels by batch size)
  through eight layers; measured <= 1e-6.
- ONNX Runtime against eager float32: its own convolution kernels, ONNX_TOL = 1e-3 relative.
- PIL's BILINEAR resize (the sidecar's advice) against crop_resize, per grey level: <= 1 (both
  round to uint8, PIL with fixed-point weights; before crop_resize rounded, measured <= 0.98)
  except in the outermost output pixels of a downscaled image, where PIL renormalises the filter
  and crop_resize replicates the edge (up to ~13 levels on noise), as the sidecar says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fastalex.cli import main

LOGIT_TOL = 1e-4
ONNX_TOL = 1e-3


def cli(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def val_pixels(val_files):
    """The first 40 val images, decoded: (40, 64, 64, 3) uint8, the model's size."""
    from fastalex.predict import read_image

    return np.stack([read_image(str(p)) for p in val_files[0][:40]])


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"  # the suffix is added
    result = cli("export", checkpoint, out)
    assert result.exit_code == 0, result.output
    assert "(N, 64, 64, 3) in, logits (N, 4) out, flip TTA inside" in result.output
    return out.with_name("model.pt2")


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_exported_program_agrees_with_the_eager_model(checkpoint, exported, val_pixels):
    from fastalex.checkpoint import load_checkpoint, model_card
    from fastalex.predict import load_model

    eager = load_model(checkpoint, "cpu").predict(list(val_pixels))  # (40, 4), TTA
    program = torch.export.load(exported).module()
    for batch in (1, 7, 40):  # the batch dimension is dynamic
        logits = program(torch.from_numpy(val_pixels[:batch]))
        assert logits.dtype == torch.float32 and logits.shape == (batch, 4)
        assert (logits - eager[:batch]).abs().max() <= LOGIT_TOL * eager.abs().max()
    card = model_card(load_checkpoint(checkpoint), checkpoint)
    sidecar = json.loads(exported.with_name("model.pt2.json").read_text())
    assert sidecar["program"] == "model.pt2" and sidecar["program_format"] == "torch.export"
    assert sidecar["input"]["shape"] == ["N", 64, 64, 3] and sidecar["input"]["dtype"] == "uint8"
    assert [[c["id"], c["name"]] for c in sidecar["classes"]] == card["classes"]
    assert sidecar["preprocessing"]["mean"] == card["mean"] and sidecar["flip_tta"] is True


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_nchw_export_without_tta_is_the_single_pass_model(checkpoint, val_pixels, tmp_path):
    from fastalex.predict import load_model

    result = cli("export", checkpoint, tmp_path / "plain.pt2", "--layout", "nchw", "--no-flip-tta")
    assert result.exit_code == 0, result.output
    model = load_model(checkpoint, "cpu")
    model.card = {**model.card, "flip_tta": False}
    eager = model.predict(list(val_pixels))
    program = torch.export.load(tmp_path / "plain.pt2").module()
    logits = program(torch.from_numpy(val_pixels).permute(0, 3, 1, 2).contiguous())
    assert (logits - eager).abs().max() <= LOGIT_TOL * eager.abs().max()
    assert json.loads((tmp_path / "plain.pt2.json").read_text())["flip_tta"] is False


@pytest.mark.slow
def test_the_exported_program_loads_with_torch_alone(
    exported, val_pixels, checkpoint, tmp_path, without_fastalex
):
    from fastalex.predict import load_model

    np.save(tmp_path / "pixels.npy", val_pixels)
    without_fastalex(
        (
            "import numpy as np, torch; "
            "program = torch.export.load(sys.argv[1]).module(); "
            "pixels = torch.from_numpy(np.load(sys.argv[2])); "
            "np.save(sys.argv[3], program(pixels).detach().numpy()); "
            "assert sys.modules['fastalex'] is None"
        ),
        exported,
        tmp_path / "pixels.npy",
        tmp_path / "logits.npy",
        cwd=tmp_path,
    )
    eager = load_model(checkpoint, "cpu").predict(list(val_pixels)).numpy()
    logits = np.load(tmp_path / "logits.npy")
    assert np.abs(logits - eager).max() <= LOGIT_TOL * np.abs(eager).max()


@pytest.mark.slow
def test_onnx_export_agrees_with_the_eager_model_in_onnxruntime(
    checkpoint, val_pixels, tmp_path, without_fastalex
):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastalex.predict import load_model

    result = cli("export", checkpoint, tmp_path / "model.onnx", "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "model.onnx.json").read_text())["program_format"] == "onnx"
    np.save(tmp_path / "pixels.npy", val_pixels)
    without_fastalex(
        (
            "sys.modules['torch'] = None; import numpy as np, onnxruntime; "
            "session = onnxruntime.InferenceSession("
            "sys.argv[1], providers=['CPUExecutionProvider']); "
            "pixels = np.load(sys.argv[2]); "
            "outs = [session.run(None, {'images': pixels[i:i + n]})[0] "
            "for i, n in ((0, 1), (1, 39))]; "
            "np.save(sys.argv[3], np.concatenate(outs))"
        ),
        tmp_path / "model.onnx",
        tmp_path / "pixels.npy",
        tmp_path / "logits.npy",
        cwd=tmp_path,
    )
    eager = load_model(checkpoint, "cpu").predict(list(val_pixels)).numpy()
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == eager.shape
    assert np.abs(logits - eager).max() <= ONNX_TOL * np.abs(eager).max()


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_pil_bilinear_resize_is_the_val_filter_the_sidecar_says(checkpoint):
    """The caller's half of the export contract: PIL's BILINEAR resize of any image gives the
    pixels predict's crop_resize computes, up to PIL's rounding to uint8, but for the outermost
    pixels of a downscaled image (the border rule the sidecar states)."""
    from fastalex.predict import load_model

    model = load_model(checkpoint, "cpu")
    rng = np.random.default_rng(1)
    for height, width in ((300, 200), (64, 64), (40, 90), (500, 499), (33, 64)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        resized = np.array(Image.fromarray(pixels).resize((64, 64), Image.Resampling.BILINEAR))
        ours = model.preprocess([pixels])[0].permute(1, 2, 0)  # (64, 64, 3) uint8
        gap = (ours.float() - torch.from_numpy(resized).float()).abs()
        assert gap[1:-1, 1:-1].max() <= 1.0, (height, width)
        if height <= 64 and width <= 64:  # upsampled: the border rules agree
            assert gap.max() <= 1.0, (height, width)


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_export_errors_are_one_line_and_exit_2(checkpoint, tmp_path):
    old = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del old["normalisation"], old["classes"]
    torch.save(old, tmp_path / "old.pt")
    for args, message in (
        (("export", tmp_path / "old.pt", tmp_path / "m.pt2"), "lacks classes, normalisation"),
        (("export", checkpoint, tmp_path / "m.onnx"), "--format onnx"),
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.slow
def test_hiding_fastalex_keeps_a_virtualenv_inside_a_checkout_named_fastalex(
    tmp_path, without_fastalex
):
    """`git clone` names the checkout fastalex/, and a .venv made inside it puts
    .../fastalex/.venv/lib/python3.X/site-packages on sys.path: hiding the package must leave
    that (numpy, torch) importable. This interpreter's virtualenv, reached through such a path."""
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix) or not Path(sys.executable).is_relative_to(venv):
        pytest.skip("not run from a virtualenv")
    checkout = tmp_path / "clone" / "fastalex"
    checkout.mkdir(parents=True)
    (checkout / ".venv").symlink_to(venv, target_is_directory=True)
    python = checkout / ".venv" / Path(sys.executable).relative_to(venv)
    stdout = without_fastalex(
        (
            "import numpy\n"
            "assert any('/fastalex/.venv/' in p for p in sys.path), sys.path\n"
            "try:\n"
            "    import fastalex\n"
            "except ImportError:\n"
            "    print('hidden')\n"
        ),
        cwd=tmp_path,
        python=python,
    )
    assert stdout.split() == ["hidden"]
