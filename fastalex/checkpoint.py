"""Checkpoints: the run's `Progress` record, building and reading the checkpoint dict, writing it
atomically into a rotated folder, finding the newest valid one, and the one way back from it: the
config of a record (`config_from_record`, also RUN/config.json's) and the model of its card
(`model_from_card`), which train --config, eval, predict and export all go through.

A checkpoint is ``torch.save`` of the dict `checkpoint_state` builds (loadable with
``weights_only=True``): format, config, classes, normalisation, model/optimizer/scaler state and
``Progress.state_dict()``'s keys. Files: RUN/checkpoints/step-<global step>.pt (newest K kept),
last.pt and best.pt as hard links to one of them. Partial-epoch sums are global, never per rank.

Imports torch, the config, the model (to build a card's), metrics' `EpochSums` and the shard
manifest's types; never a loader or the trainer. Reasons: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastalex.config import IMAGE_MEAN, IMAGE_STD, TrainConfig
from fastalex.errors import UserError
from fastalex.metrics import EpochSums
from fastalex.model import build_model
from fastalex.shards import Manifest

CHECKPOINT_FORMAT = 1
CARD_FIELDS = ("arch", "image_size", "flip_tta")  # from the saved config
STEP_FILE = re.compile(r"step-(\d+)\.pt")
RECORD_ONLY = ("decisions",)  # what config.json records beside the settings (train.py)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint carries besides the weights and optimizer."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0
    global_step: int = 0
    cursor: int = 0  # global samples of the epoch consumed, any number of processes
    world_size: int = 1  # processes that wrote it
    partial: EpochSums | None = None  # the epoch's global sums so far; None at a boundary
    rng: list[dict] = field(default_factory=list)  # every rank's torch/CUDA RNG state
    history: list[dict] = field(default_factory=list)  # the rows the weights have seen
    best_top1: float = -math.inf
    compile_s: float | None = None

    def state_dict(self) -> dict:
        state = asdict(self)
        state["partial"] = None if self.partial is None else self.partial.state_dict()
        state["metrics"] = self.history[-1] if self.history else None
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> Progress:
        """From a checkpoint; older ones lack cursor and world_size (single-process runs)."""
        known = {name: state[name] for name in cls.__dataclass_fields__ if name in state}
        known["partial"] = (
            None if state.get("partial") is None else EpochSums.from_state_dict(state["partial"])
        )
        progress = cls(**known)
        if "cursor" not in state and progress.step_in_epoch:
            progress.cursor = progress.step_in_epoch * state["config"]["batch_size"]
        return progress


def checkpoint_state(
    cfg: TrainConfig,
    classes: list,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    progress: Progress,
) -> dict:
    """The checkpoint dict: the one place it is built."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(cfg),
        "classes": classes,
        "normalisation": normalisation(),
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        **progress.state_dict(),
    }


def disk_error(path: Path, error: BaseException) -> UserError:
    """One line for a failed write: the path, the reason and the free space left there."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = os.strerror(error.errno) if getattr(error, "errno", None) else str(error)
    reason = (reason.strip().splitlines() or ["write failed"])[0][:120]
    return UserError(f"could not write {path}: {reason} ({free})")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, fsync, then rename onto `path`: a killed or failed write (a full disk) leaves
    the previous file whole; the temporary file is removed. UserError naming the free space."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports ENOSPC as RuntimeError
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or "write" in str(e):
            raise disk_error(path, e) from None
        raise


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content, atomically: a hard link (no bytes copied) where the
    filesystem has them, else a copy."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class CheckpointDir:
    """RUN/checkpoints: step-<global step>.pt files, the newest `keep` kept, last.pt linked to the
    newest and best.pt to the best."""

    def __init__(self, path: Path, keep: int = 2) -> None:
        self.path, self.keep = Path(path), keep
        self.damaged: set[Path] = set()  # files newest_valid found damaged: rotation drops them

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    def steps(self) -> list[tuple[int, Path]]:
        """(global step, file) of every step checkpoint, newest first."""
        if not self.path.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.path.iterdir() if (m := STEP_FILE.match(p.name))
        ]
        return sorted(found, reverse=True)

    def save(self, state: dict, best: bool = False) -> tuple[Path, float, int]:
        """Write step-<global step>.pt, link last.pt (and best.pt), then rotate: the file just
        written is kept, files found damaged are dropped, and of the others the newest `keep`
        - 1. After a fallback past a damaged newer file the step numbers are not the order of
        writing, so the new file is never the one rotation deletes. Returns (path, seconds,
        bytes)."""
        started = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / f"step-{state['global_step']:08d}.pt"
        write_atomically(path, lambda tmp: torch.save(state, tmp))
        self.damaged.discard(path)  # overwritten whole
        link_or_copy(path, self.last)
        if best:
            link_or_copy(path, self.path / "best.pt")
        others = [old for _, old in self.steps() if old != path]
        for old in [p for p in others if p in self.damaged] + [
            p for p in others if p not in self.damaged
        ][self.keep - 1 :]:
            old.unlink(missing_ok=True)
            self.damaged.discard(old)
        return path, time.perf_counter() - started, path.stat().st_size

    def sweep(self) -> None:
        """Remove temporary files a killed write left behind."""
        if self.path.is_dir():
            for tmp in self.path.glob("*.tmp"):
                tmp.unlink(missing_ok=True)

    def newest_valid(self, warn: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that reads whole (each zip member's CRC checked), warning about
        each one skipped (and remembering it: `save` drops it); last.pt when no step file reads
        (a run written before step files existed, or every step file damaged)."""
        candidates = [p for _, p in self.steps()]
        if self.last.exists() and not any(os.path.samefile(self.last, p) for p in candidates):
            candidates.append(self.last)  # unless a link to a step file already checked
        for path in candidates:
            problem = damage(path)
            if problem is None:
                return path
            self.damaged.add(path)
            warn(f"warning: {path} is damaged ({problem}); using the previous checkpoint")
        return None


def damage(path: Path) -> str | None:
    """Why `path` is not a whole checkpoint (truncated, a corrupted byte or flag), or None. Any
    exception while checking counts as damage: a flipped zip flag bit makes zipfile raise
    RuntimeError (encrypted) or NotImplementedError (patched, strong encryption), not
    BadZipFile."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member, checks its CRC-32
    except Exception as e:  # whatever the reason, this file cannot be trusted: use the previous
        return f"{type(e).__name__}: {e}"
    return None if bad is None else f"CRC mismatch in {bad}"


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
            "needs; it was written by an older fastalex: re-train it"
        )
    return {
        **{name: config[name] for name in CARD_FIELDS},
        **state["normalisation"],
        "classes": [list(c) for c in state["classes"]],
    }


def config_from_record(record: dict, where: str, **overrides) -> TrainConfig:
    """The TrainConfig of a settings record (RUN/config.json, a checkpoint's "config") with
    `overrides` over it; what the record keeps beside the settings ("decisions") is dropped.
    UserError naming `where` for a key no TrainConfig field has, or settings that do not
    validate."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a fastalex config (not an object)")
    unknown = sorted(set(record) - known - set(RECORD_ONLY))
    if unknown:
        raise UserError(f"{where}: not a fastalex config (unknown {unknown[:3]})")
    settings = {k: v for k, v in record.items() if k in known}
    try:
        return TrainConfig(**{**settings, **overrides})
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def inference_config(state: dict, path: Path, **overrides) -> TrainConfig:
    """A checkpoint's config as inference (eval, predict, export) runs it on this machine: amp
    "auto" and no compile, so `resolve_runtime`'s rule decides for this device (CUDA: bf16 at
    compute capability >= 8.0, else fp16; a CPU: float32, as no probe runs) instead of the
    amp the run's own machine chose; never a resume. `overrides` over that."""
    chosen = {"amp": "auto", "compile": False, "resume": False, **overrides}
    return config_from_record(state.get("config"), str(path), **chosen)


def model_from_card(state: dict, path: Path) -> torch.nn.Module:
    """The checkpoint's model, built from its card (arch, classes, image size, mean, std) with its
    weights loaded, on the CPU in eval mode. UserError for a checkpoint without a card."""
    card = model_card(state, Path(path))
    model = build_model(
        card["arch"], len(card["classes"]), card["image_size"], card["mean"], card["std"]
    )
    load_weights(model, state)
    return model.eval()


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


def load_weights(module: torch.nn.Module, state: dict) -> None:
    """The model weights of a checkpoint into `module`."""
    module.load_state_dict(state["model"])
