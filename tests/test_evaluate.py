"""`fastalex eval` (evaluate.py): the model built from the checkpoint's card, so eval scores what
predict predicts whatever mean/std the card carries, and the runtime decided for this machine,
never replayed from the run; the command's output and --json."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import Decided, spy_on_runtime

from fastalex.cli import main

OTHER_NORMALISATION = {"mean": [0.6, 0.35, 0.5], "std": [0.15, 0.35, 0.25]}  # not config.py's


def predict_top1_and_loss(checkpoint, val_files) -> tuple[float, float]:
    """predict's top-1 (percent) and mean loss over the val files, in eval's batches."""
    from fastalex.predict import load_model, read_image

    model = load_model(checkpoint, "cpu")
    paths, labels = val_files
    pixels = [read_image(str(p)) for p in paths]
    logits = torch.cat([model.predict(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
    labels = torch.from_numpy(labels)
    top1 = 100 * (logits.argmax(1) == labels).double().mean().item()
    return top1, torch.nn.functional.cross_entropy(logits, labels).item()


@pytest.mark.slow
def test_eval_uses_the_cards_mean_and_std_as_predict_does(
    checkpoint, edited_checkpoint, hue_pack, val_files
):
    from fastalex.evaluate import evaluate_checkpoint

    other = edited_checkpoint(normalisation=OTHER_NORMALISATION)
    evaluated = evaluate_checkpoint(other, str(hue_pack), "cpu", "cpu", 1)
    top1, loss = predict_top1_and_loss(other, val_files)
    assert evaluated["samples"] == len(val_files[1])
    assert evaluated["top1"] == pytest.approx(top1, abs=1e-9)
    assert evaluated["loss"] == pytest.approx(loss, rel=1e-5)
    as_trained = evaluate_checkpoint(checkpoint, str(hue_pack), "cpu", "cpu", 1)
    assert as_trained["loss"] != pytest.approx(loss, rel=1e-3)  # the card's mean/std did count


@pytest.mark.slow
def test_a_bf16_run_evaluates_by_this_machines_rule(
    edited_checkpoint, hue_pack, fake_gpu, monkeypatch
):
    """A checkpoint whose run chose bf16 (a CPU probe does) evaluates in float32 on a CPU, which
    runs no probe, and would evaluate in fp16 on a GPU without native bf16, not stop there."""
    import fastalex.evaluate
    from fastalex.evaluate import evaluate_checkpoint

    bf16 = edited_checkpoint(config={"amp": "bf16", "compile": True})
    decided = spy_on_runtime(monkeypatch, fastalex.evaluate, stop=False)
    result = evaluate_checkpoint(bf16, str(hue_pack), "cpu", "cpu", 1)
    assert (decided[0].amp, decided[0].compile) == ("off", False)
    assert result["samples"] == 128 and 0 <= result["top1"] <= 100

    decided = spy_on_runtime(monkeypatch, fastalex.evaluate, stop=True)
    fake_gpu((7, 0), "Tesla V100")
    with pytest.raises(Decided):
        evaluate_checkpoint(bf16, str(hue_pack), "cuda", "cpu", 1)
    assert decided[-1].device.type == "cuda" and decided[-1].amp == "fp16"


@pytest.mark.slow
def test_eval_prints_and_writes_top1_and_top5(checkpoint, hue_pack, tmp_path):
    args = [str(checkpoint), str(hue_pack), "--device", "cpu", "--loader", "cpu"]
    result = CliRunner().invoke(main, ["eval", *args, "--json", str(tmp_path / "top.json")])
    assert result.exit_code == 0, result.output
    assert "(alexnet64, after epoch 1): val top-1" in result.output
    written = json.loads((tmp_path / "top.json").read_text())
    assert set(written) == {"top1", "top5", "loss", "samples"} and written["samples"] == 128
    assert f"val top-1 {written['top1']:.2f} %" in result.output
