"""Checkpoints: exact resume in fp16 on the CPU, resuming under another AMP setting, the partial
epoch's global totals, the model card inference reads, and the one way back from a checkpoint:
the config of a record, the inference config (this machine's AMP rule) and the card's model;
the fallback past damaged files and the rotation after it."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from helpers import invoke, train_args, train_cli, without_timing

from fastalex.checkpoint import (
    config_from_record,
    inference_config,
    load_checkpoint,
    model_card,
    model_from_card,
)
from fastalex.config import IMAGE_MEAN, IMAGE_STD, TrainConfig
from fastalex.errors import UserError
from fastalex.metrics import EpochSums
from fastalex.plot import read_metrics

# fp16 convolutions' backward has no fast CPU kernel (~1.5 s per step of batch 8 at 32 px on the
# 2-core box, against ~0.02 s in fp32): the fp16 tests take few, small steps.
FP16 = ("--amp", "fp16", "--batch-size", "8", "--image-size", "32")


@pytest.mark.slow
def test_fp16_on_the_cpu_trains_and_resumes_exactly(hue_pack, tmp_path):
    """The CUDA fp16 path (autocast fp16, GradScaler, fused SGD taking the scale) on the CPU:
    stopped after 2 steps and resumed to 4, it gives the rows of a run straight to 4 steps."""
    train_cli(hue_pack, tmp_path / "straight", *FP16, "--max-steps", 4)
    train_cli(hue_pack, tmp_path / "parts", *FP16, "--max-steps", 2)
    state = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert state["scaler"]["scale"] > 0 and state["config"]["amp"] == "fp16"
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    train_cli(hue_pack, tmp_path / "parts", *FP16, "--max-steps", 4, "--resume")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "parts")
    assert len(resumed) == 1 and resumed[0]["steps"] == 4
    assert without_timing(resumed) == without_timing(straight)
    final = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert (
        final["scaler"]
        == load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["scaler"]
    )


@pytest.mark.slow  # trains or starts processes
def test_resuming_with_another_amp_setting_starts_a_fresh_loss_scale(hue_pack, tmp_path):
    out = tmp_path / "run"
    train_cli(hue_pack, out, *FP16, "--amp", "off", "--max-steps", 2)
    result = train_cli(hue_pack, out, *FP16, "--max-steps", 3, "--resume")
    assert "fresh loss scale" in result.output
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["global_step"] == 3 and state["scaler"]["scale"] > 0


def test_a_partial_epoch_carries_global_totals_and_reads_old_checkpoints():
    legacy = {
        "totals": {"loss_sum": 3.0, "correct": 2.0, "samples": 64, "steps": 2},
        "train_s": 1.5,
        "timed_s": 1.0,
        "timed_samples": 32,
    }
    carried = EpochSums.from_state_dict(legacy)
    assert (carried.loss_sum, carried.correct, carried.samples, carried.steps) == (3.0, 2.0, 64, 2)
    assert carried.loader_wait_s == 0.0 and EpochSums.from_state_dict(None) == EpochSums()
    assert EpochSums.from_state_dict(carried.state_dict()) == carried


@pytest.mark.slow  # trains or starts processes
def test_a_checkpoint_carries_what_inference_needs(hue_pack, tmp_path):
    out = tmp_path / "run"
    train_cli(hue_pack, out, "--max-steps", 1)
    path = out / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    card = model_card(state, path)
    assert (card["arch"], card["image_size"], card["flip_tta"]) == ("alexnet64", 64, True)
    assert card["mean"] == list(IMAGE_MEAN) and card["std"] == list(IMAGE_STD)
    assert len(card["classes"]) == 4 and all(len(c) == 2 for c in card["classes"])
    del state["normalisation"]
    with pytest.raises(UserError, match="lacks normalisation"):
        model_card(state, path)


def test_config_from_record_drops_decisions_lets_overrides_win_and_names_the_source():
    record = {
        **asdict(TrainConfig(lr=0.05, amp="bf16", batch_size=64)),
        "decisions": {"amp": {"chose": "bf16", "by": "probe"}},
    }
    cfg = config_from_record(record, "RUN/config.json", batch_size=32, shards="pack")
    assert (cfg.lr, cfg.amp, cfg.batch_size, cfg.shards) == (0.05, "bf16", 32, "pack")
    with pytest.raises(UserError, match=r"^RUN/config.json: .*unknown \['learning_rate'\]"):
        config_from_record({**record, "learning_rate": 1}, "RUN/config.json")
    with pytest.raises(UserError, match=r"^RUN/config.json: .*not an object"):
        config_from_record([1, 2], "RUN/config.json")
    with pytest.raises(UserError, match=r"^last.pt: .*batch_size"):
        config_from_record(record, "last.pt", batch_size=0)  # TrainConfig's ValueError


def card_state(**config) -> dict:
    """The parts of a checkpoint inference reads: config, classes, normalisation, weights."""
    from fastalex.model import build_model

    torch.manual_seed(0)
    cfg = TrainConfig(image_size=32, **config)
    return {
        "config": asdict(cfg),
        "classes": [["n01", "one"], ["n02", "two"], ["n03", ""]],
        "normalisation": {"mean": [0.6, 0.35, 0.5], "std": [0.15, 0.35, 0.25]},
        "model": build_model(cfg.arch, 3, cfg.image_size).state_dict(),
    }


def test_model_from_card_normalises_with_the_cards_mean_and_std():
    from fastalex.model import build_model

    state = card_state()
    model = model_from_card(state, "last.pt")
    assert not model.training
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    card = build_model("alexnet64", 3, 32, **state["normalisation"])
    card.load_state_dict(state["model"])
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(pixels), card.eval()(pixels))
    default = build_model("alexnet64", 3, 32)  # config.py's mean/std
    default.load_state_dict(state["model"])
    assert not torch.allclose(model(pixels), default.eval()(pixels))


def test_inference_decides_amp_for_this_machine_not_the_runs(fake_gpu):
    """A run whose CPU probe chose bf16: float32 on a CPU (auto runs no probe there), fp16 on a
    GPU without native bf16 (where replaying bf16 would stop with an error), bf16 from 8.0."""
    from fastalex.runtime import resolve_runtime

    state = card_state(amp="bf16", compile=True)
    cfg = inference_config(state, "last.pt", device="cpu")
    assert (cfg.amp, cfg.compile, cfg.resume) == ("auto", False, False)
    assert resolve_runtime(cfg).amp == "off" and not resolve_runtime(cfg).compile
    fake_gpu((7, 0), "Tesla V100")
    assert resolve_runtime(inference_config(state, "last.pt", device="cuda")).amp == "fp16"
    fake_gpu((8, 0), "A100")
    assert resolve_runtime(inference_config(state, "last.pt", device="auto")).amp == "bf16"


def test_fp16_step_with_an_inf_gradient_is_skipped_not_applied():
    """An overflowing fp16 gradient leaves weights and momentum as they were and halves the
    scale; the step still reports its finite loss, so the run does not call it divergence."""
    from fastalex.config import TrainConfig
    from fastalex.runtime import resolve_runtime
    from fastalex.step import build_training, make_train_step

    cfg = TrainConfig(device="cpu", amp="fp16", compile=False, batch_size=8, image_size=32)
    runtime = resolve_runtime(cfg)
    training = build_training(cfg, 4, runtime, steps_per_epoch=10)
    training.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # no overflow of its own
    step = make_train_step(training.model, training.optimizer, training.scaler, cfg, runtime)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    step(images, labels)  # momentum buffers exist from here on
    weights = [p.detach().clone() for p in training.module.parameters()]
    momentum = [
        training.optimizer.state[p]["momentum_buffer"].clone()
        for p in training.module.parameters()
        if p in training.optimizer.state
    ]
    scale = training.scaler.get_scale()
    first = next(training.module.parameters())
    hook = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss_sum, _ = step(images, labels)
    hook.remove()
    assert torch.isfinite(loss_sum)
    assert all(torch.equal(w, p) for w, p in zip(weights, training.module.parameters()))
    assert all(
        torch.equal(m, training.optimizer.state[p]["momentum_buffer"])
        for m, p in zip(
            momentum, [p for p in training.module.parameters() if p in training.optimizer.state]
        )
    )
    assert momentum and training.scaler.get_scale() == scale / 2
    step(images, labels)  # the next step applies again
    assert not torch.equal(weights[0], first)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "loader", ["cpu", pytest.param("dali", marks=pytest.mark.dali), "resident"]
)
def test_cuda_training_compiled_resumes_with_each_amp_and_loader(hue_pack, tmp_path, amp, loader):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    if amp == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no native bf16 on this GPU")
    out = tmp_path / "run"
    args = (
        "--device",
        "cuda",
        "--amp",
        amp,
        "--loader",
        loader,
        "--compile",
        "--batch-size",
        "32",
        "--loader-workers",
        "2",
        "--epochs",
        "2",
    )
    first = invoke("train", hue_pack, "--out", out, *args, "--max-steps", 3)
    assert first.exit_code == 0, first.output
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["config"]["amp"] == amp and bool(state["scaler"]) == (amp == "fp16")
    second = invoke("train", hue_pack, "--out", out, *args, "--resume")
    assert second.exit_code == 0, second.output
    summary = read_metrics(out)
    assert [row["epoch"] for row in summary] == [1, 2]
    assert all(row["train_samples"] == 256 for row in summary)


@pytest.mark.slow  # trains or starts processes
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_with_a_warning(hue_pack, tmp_path):
    """Checkpoints every 2 steps, the newest 2 kept; a byte flipped inside the newest (which
    torch.load would read without complaint) is caught by its CRC and the previous one used."""
    out = tmp_path / "run"
    train_cli(hue_pack, out, "--max-steps", 6, "--checkpoint-every", 2)
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000004.pt", "step-00000006.pt"]
    newest = folder / "step-00000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(data)
    result = train_cli(hue_pack, out, "--max-steps", 7, "--checkpoint-every", 2, "--resume")
    assert f"warning: {newest} is damaged" in result.output, result.output
    state = load_checkpoint(folder / "last.pt")
    assert state["global_step"] == 7 and state["step_in_epoch"] == 7
    assert state["partial"]["samples"] == 7 * 32  # 4 steps carried from step-4, 3 taken again


@pytest.mark.slow  # trains or starts processes
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(hue_pack, tmp_path, monkeypatch):
    """ENOSPC half-way through writing a checkpoint: one line naming the file and the free space,
    no temporary file left, and the previous checkpoint still loads."""
    import errno

    out = tmp_path / "run"
    train_cli(hue_pack, out, "--max-steps", 2)
    real_save = torch.save

    def save_onto_a_full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(1000)  # what got written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    result = invoke(*train_args(hue_pack, out, "--max-steps", 3, "--resume"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: could not write ") and "step-00000003.pt" in lines[-1]
    assert "No space left on device" in lines[-1] and "MiB free there" in lines[-1]
    folder = out / "checkpoints"
    assert not list(folder.glob("*.tmp"))
    assert load_checkpoint(folder / "last.pt")["global_step"] == 2


@pytest.mark.slow  # trains or starts processes
def test_a_torchrun_restart_resumes_by_itself_and_a_plain_rerun_asks_for_resume(hue_pack, tmp_path):
    """TORCHELASTIC_RESTART_COUNT > 0 (a process torchrun restarted): the run continues from its
    newest checkpoint without --resume; outside torchrun the same command is refused."""
    out = tmp_path / "run"
    train_cli(hue_pack, out, "--max-steps", 2)
    command = train_args(hue_pack, out, "--max-steps", 3)
    plain = invoke(*command)
    assert plain.exit_code == 2 and "--resume" in plain.output, plain.output
    restarted = invoke(*command, env={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.exit_code == 0, restarted.output
    assert "resuming" in restarted.output
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 3


def small_checkpoint(folder, step: int):
    """A zip written by torch.save under its step file's name: enough for the folder's logic."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    torch.save({"global_step": step, "weights": torch.arange(64)}, path)
    return path


def set_zip_flag(path, bit: int) -> None:
    """Set general-purpose flag `bit` of the first central-directory entry (what zipfile reads):
    bit 0 (encrypted) makes zipfile raise RuntimeError, bit 5 (patched) NotImplementedError."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        flags_at = archive.start_dir + 8
    data = bytearray(path.read_bytes())
    data[flags_at] |= 1 << bit
    path.write_bytes(data)


@pytest.mark.parametrize("bit", [0, 5])
def test_a_checkpoint_with_a_flipped_zip_flag_bit_falls_back_to_the_previous(tmp_path, bit):
    from fastalex.checkpoint import CheckpointDir

    folder = tmp_path / "checkpoints"
    older = small_checkpoint(folder, 4)
    newest = small_checkpoint(folder, 6)
    set_zip_flag(newest, bit)
    warnings = []
    assert CheckpointDir(folder).newest_valid(warnings.append) == older
    assert len(warnings) == 1 and f"{newest} is damaged" in warnings[0]


def test_rotation_after_a_fallback_keeps_the_new_file_and_drops_the_damaged_one(tmp_path):
    """--keep-checkpoints 1, the newest file damaged: the run resumes from the previous one and
    its next checkpoint (a lower step than the damaged file's) is the one kept."""
    from fastalex.checkpoint import CheckpointDir

    folder = tmp_path / "checkpoints"
    small_checkpoint(folder, 4)
    damaged = small_checkpoint(folder, 6)
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    checkpoints = CheckpointDir(folder, keep=1)
    assert checkpoints.newest_valid(lambda line: None).name == "step-00000004.pt"
    path, _, _ = checkpoints.save({"global_step": 5, "weights": torch.arange(64)})
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000005.pt"]
    assert path.exists() and torch.load(folder / "last.pt")["global_step"] == 5


def test_last_pt_is_used_when_every_step_file_is_damaged(tmp_path):
    from fastalex.checkpoint import CheckpointDir

    folder = tmp_path / "checkpoints"
    for step in (4, 6):
        data = bytearray(small_checkpoint(folder, step).read_bytes())
        (folder / f"step-{step:08d}.pt").write_bytes(data[: len(data) // 2])  # truncated
    torch.save({"global_step": 2, "weights": torch.arange(64)}, folder / "last.pt")
    warnings = []
    assert CheckpointDir(folder).newest_valid(warnings.append) == folder / "last.pt"
    assert len(warnings) == 2
