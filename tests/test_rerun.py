"""--tensorboard scalars read back with TensorBoard's own reader, and train --config: a run's
settings re-run, the command line's options over them, both recorded."""

from __future__ import annotations

import json

import pytest
from helpers import invoke, train_cli


@pytest.fixture(scope="module")
def board_run(hue_pack, tmp_path_factory):
    """One epoch (8 steps) of alexnet64 on the hue pack with --tensorboard."""
    out = tmp_path_factory.mktemp("board") / "run"
    train_cli(hue_pack, out, "--no-compile", "--epochs", 1, "--lr", 0.05, "--tensorboard")
    return out


def test_tensorboard_scalars_read_back(board_run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    board = event_accumulator.EventAccumulator(str(board_run / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    epoch_tags = {"val_loss", "val_top1", "val_top5", "train_loss", "train_top1", "lr"}
    epoch_tags |= {"images_per_s", "loader_wait_s"}
    assert {f"epoch/{t}" for t in epoch_tags} <= tags
    assert {"train/loss", "train/images_per_s", "lr"} <= tags
    row = json.loads((board_run / "metrics.jsonl").read_text().splitlines()[0])
    (val_top1,) = board.Scalars("epoch/val_top1")
    assert val_top1.step == 1 and val_top1.value == pytest.approx(row["val_top1"], rel=1e-6)
    assert board.Scalars("train/loss")[-1].step == 8  # the last log point: step 8 of 8


@pytest.mark.slow  # trains or starts processes
def test_config_reruns_the_settings_with_overrides_recorded(board_run, hue_pack, tmp_path):
    out = tmp_path / "again"
    config = board_run / "config.json"
    result = invoke("train", hue_pack, "--config", config, "--out", out, "--max-steps", 2)
    assert result.exit_code == 0, result.output
    first, second = (json.loads(p.read_text()) for p in (config, out / "config.json"))
    assert second["config_file"] == str(config.resolve())
    assert second["overrides"] == ["max_steps", "out"]
    changed = {k for k in first if first[k] != second[k] and k != "decisions"}
    assert changed == {"out", "max_steps", "config_file", "overrides"}
    # the first run's `auto` choices come back as explicit settings, the same choices
    chose = {name: d["chose"] for name, d in first["decisions"].items()}
    assert {name: d["chose"] for name, d in second["decisions"].items()} == chose
    assert {d["by"] for d in second["decisions"].values()} == {"explicit"}
    assert second["lr"] == 0.05 and second["tensorboard"] is True and second["compile"] is False


def test_config_with_recipe_or_a_foreign_file_is_one_line(board_run, hue_pack, tmp_path):
    config = board_run / "config.json"
    result = invoke("train", hue_pack, "--config", config, "--recipe", "reference")
    assert result.exit_code == 2 and "one of --config and --recipe" in result.output
    (tmp_path / "other.json").write_text('{"learning_rate": 1}')
    result = invoke("train", hue_pack, "--config", tmp_path / "other.json")
    assert result.exit_code == 2 and "unknown ['learning_rate']" in result.output
