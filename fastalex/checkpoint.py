"""Checkpoints: writing and reading them, checking them against a pack, the partial-epoch state a
run stopped mid-epoch carries, and the model card that inference reads.

Imports torch, the config and the shard manifest's types; never a loader, the model code or the
trainer (train.py and predict.py import this module, not the other way round).

A checkpoint (``torch.save`` of a dict, loadable with ``weights_only=True``) holds:

- ``format`` (CHECKPOINT_FORMAT), ``config`` (``asdict(TrainConfig)``), ``classes`` ([wnid, words]
  in label order), ``normalisation`` ({"mean", "std"}, 0..1 units): with ``config``'s arch, image
  size and flip_tta, everything `predict` and `export` need without the pack (`model_card`);
- ``model``, ``optimizer``, ``scaler`` state dicts; ``rng`` (every rank's torch/CUDA RNG state);
- where a resumed run starts: ``epoch`` (completed epochs), ``step_in_epoch``, ``global_step``,
  and ``partial`` (a `PartialEpoch` as a dict, or None at an epoch boundary);
- ``history`` (the metrics rows the weights have seen), ``best_top1``, ``compile_s``, ``metrics``.

The partial-epoch train totals are GLOBAL: summed over every rank before they are saved, and on
resume added once, after the next all-reduce, never fed back into a rank's own sums (where each of
k ranks would count them again). Loss sums are float64 sums of float32 per-step values, exact in
any order for a run's magnitudes, so a resumed epoch's train loss equals the uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastalex.config import IMAGE_MEAN, IMAGE_STD
from fastalex.errors import UserError
from fastalex.shards import Manifest

CHECKPOINT_FORMAT = 1
CARD_FIELDS = ("arch", "image_size", "flip_tta")  # from the saved config


@dataclass
class PartialEpoch:
    """What an epoch stopped part-way has done, summed over every rank: train loss sum, top-1
    hits, samples and steps (each rank's count, the same on all), and the time it took."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    steps: int = 0
    train_s: float = 0.0
    timed_s: float = 0.0  # train_s less the warm-up steps'
    timed_samples: int = 0  # samples of the timed steps, this rank's
    loader_wait_s: float = 0.0  # time the model waited on the loader

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> PartialEpoch:
        """From a checkpoint's ``partial`` (None: nothing carried). Checkpoints of fastalex 0.1
        nest the sums under "totals" (one process's: right for the single-process runs that
        could resume them)."""
        state = dict(state or {})
        state.update(state.pop("totals", {}))
        return cls(**state)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then rename: a killed run keeps the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `train` (on the CPU); UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it, no traceback
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a fastalex checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def normalisation() -> dict:
    """What the model normalises its pixels with (config.py), as a checkpoint records it."""
    return {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)}


def model_card(state: dict, path: Path) -> dict:
    """What inference needs from a checkpoint: {"arch", "image_size", "flip_tta", "mean", "std",
    "classes"} (classes as [wnid, words] in label order). UserError naming what an older
    checkpoint lacks."""
    config = state.get("config") or {}
    missing = [name for name in CARD_FIELDS if name not in config]
    missing += [name for name in ("classes", "normalisation") if not state.get(name)]
    if missing:
        raise UserError(
            f"{path}: this checkpoint lacks {', '.join(missing)}, which inference "
            "needs; it was written by an older fastalex: re-train, or evaluate it "
            "on its pack with `fastalex eval CHECKPOINT SHARDS`"
        )
    return {
        **{name: config[name] for name in CARD_FIELDS},
        **state["normalisation"],
        "classes": [list(c) for c in state["classes"]],
    }


def check_checkpoint(
    state: dict, path: Path, arch: str, image_size: int, manifest: Manifest, shards: str
) -> None:
    """UserError when the checkpoint's model cannot serve this arch, input size and class list."""
    saved = state["config"]
    if (saved["arch"], saved["image_size"]) != (arch, image_size):
        raise UserError(
            f"{path} holds {saved['arch']} at {saved['image_size']} px, not {arch} at "
            f"{image_size} px; pass --arch {saved['arch']} --image-size "
            f"{saved['image_size']}"
        )
    classes = [list(c) for c in manifest.classes]
    if len(state["classes"]) != len(classes):
        raise UserError(
            f"{path} was trained on {len(state['classes'])} classes; the pack "
            f"{shards} has {len(classes)}"
        )
    if state["classes"] != classes:
        raise UserError(
            f"{path} was trained on other classes (or another label order) than the pack {shards}"
        )


def restore_training(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: dict,
) -> str | None:
    """Weights, momentum buffers and loss scale from `state`; hyper-parameters stay the config's.

    Returns a note for the log when the loss scale could not carry over: a checkpoint trained
    without fp16 loss scaling (bf16 or fp32) resumed with --amp fp16 starts a fresh scale."""
    module.load_state_dict(state["model"])
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, fresh in zip(optimizer.param_groups, hyper):
        group.update(fresh)
    if scaler.is_enabled() and not state["scaler"]:
        return (
            "the checkpoint was trained without fp16 loss scaling; --amp fp16 starts a fresh "
            f"loss scale ({scaler.get_scale():g})"
        )
    scaler.load_state_dict(state["scaler"])  # a disabled scaler ignores a saved scale
    return None


def capture_rng(device: torch.device, world_size: int) -> list[dict]:
    """Every rank's torch (and CUDA) RNG state, gathered: index r is rank r's (a collective)."""
    import torch.distributed as dist

    mine = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    if world_size == 1:
        return [mine]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def restore_rng(states: list[dict], device: torch.device, rank: int, world_size: int) -> None:
    """This rank's RNG state from `states`; a run resumed with another world size keeps its fresh
    seeds."""
    if len(states) != world_size:
        return
    mine = states[rank]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
