"""The run folder: where a run's records go and what they hold.

RUN/config.json (the settings, with the `auto` decisions), RUN/metrics.jsonl (one line per epoch),
RUN/summary.json (the outcome, the machine, the versions) and RUN/checkpoints/ (checkpoint.py's
CheckpointDir). Each record is built in one place here; a failed write (a full disk) is one line
naming the free space. Imports the config, checkpoint, machine, metrics and runtime; never torch's
training pieces or a loader. Reasons: docs/training.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from fastalex.checkpoint import (
    CheckpointDir,
    Progress,
    check_checkpoint,
    disk_error,
    load_checkpoint,
)
from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.machine import describe_machine, git_sha, versions
from fastalex.metrics import median, percent
from fastalex.runtime import Runtime, describe_device
from fastalex.step import peak_lr

KEPT_ON_RESUME = {"amp": "auto", "compile": None, "loader": "auto"}  # each field's `auto` value
LOADER_BOUND_PCT = 20.0  # an epoch whose device waited longer than this on the loader is reported
SAVE_COST_PCT = 2.0  # periodic checkpoints costing more than this share of their interval: noted


def default_run_dir() -> Path:
    """runs/<UTC time>_<commit>: a new folder for each run that names none."""
    sha = git_sha().replace("+dirty", "")
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}_{sha}"


def write_file(path: Path, writer: Callable, *args) -> None:
    """writer(path, *args); a failed write (a full disk) is one line naming the free space."""
    try:
        writer(path, *args)
    except OSError as e:
        raise disk_error(path, e) from None


def config_record(cfg: TrainConfig, decisions: dict) -> dict:
    """config.json's content: every setting, and what each `auto` decided and why."""
    return {**asdict(cfg), "decisions": decisions}


def summary_record(
    cfg: TrainConfig,
    rt: Runtime,
    progress: Progress,
    *,
    warmup_s: float | None,
    data: dict,
    loader: str,
    decisions: dict,
) -> dict:
    """summary.json's content: the outcome (last and best top-1/top-5), the speed (median
    images/s of the epochs after the first, loader wait, compile), what ran and where."""
    history = progress.history
    last = history[-1] if history else {}
    rates = [r["images_per_s"] for r in history[1:] if r["images_per_s"]]
    rates = rates or [r["images_per_s"] for r in history[:1] if r["images_per_s"]]
    waited_s = sum(r.get("loader_wait_s", 0.0) for r in history)
    return {
        "top1": last.get("val_top1"),
        "top5": last.get("val_top5"),
        "best_top1": progress.best_top1 if history else None,
        "epochs": len(history),
        "steps": progress.global_step,
        "epoch_s": [r["epoch_s"] for r in history],
        "images_per_s": median(rates) if rates else None,
        "loader_wait_s": waited_s,
        "loader_wait_pct": percent(waited_s, sum(r.get("timed_s", 0.0) for r in history)),
        "compile_s": progress.compile_s,
        "warmup_s": warmup_s,
        "val_samples": last.get("val_samples"),
        "data": data,
        "device": describe_device(rt),
        "loader": loader,
        "amp": rt.amp,
        "compile": rt.compile,
        "decisions": decisions,  # each `auto`: what it chose, why, the figures
        "machine": describe_machine(rt.device),
        "channels_last": rt.channels_last,
        "arch": cfg.arch,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "world_size": rt.world_size,
        "peak_lr": peak_lr(cfg),
        "recipe": cfg.recipe,
        "git_sha": git_sha(),
        "versions": versions(rt.device),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def resume_point(
    cfg: TrainConfig,
    checkpoints: CheckpointDir,
    restart_count: int,
    manifest,
    rt: Runtime,
    log: Callable[[str], None],
    collective: Callable[[str], AbstractContextManager],
) -> tuple[dict | None, Path | None]:
    """(state, path) of the checkpoint this run continues (--resume, or a torchrun restart), or
    (None, None) for a fresh run; UserError for an --out that holds another run or a finished
    one. Rank 0 picks the newest valid checkpoint (warning about damaged ones) and every rank
    loads the one it picked (`collective` wraps the broadcast)."""
    run_dir = checkpoints.path.parent
    if not (cfg.resume or restart_count):
        if (run_dir / "metrics.jsonl").exists() or checkpoints.last.exists():
            raise UserError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
        return None, None
    chosen = [None]
    if rt.rank == 0:
        checkpoints.sweep()
        chosen = [checkpoints.newest_valid(log)]
    if rt.world_size > 1:
        with collective("choosing the checkpoint to resume"):
            dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        if cfg.resume:
            raise UserError(f"{checkpoints.path}: no checkpoint to resume from")
        log(f"restart {restart_count}: no checkpoint yet, starting {run_dir} anew")
        return None, None
    path = Path(chosen[0])
    state = load_checkpoint(path)
    check_checkpoint(state, path, cfg.arch, cfg.image_size, manifest, cfg.shards)
    epoch = state["epoch"]
    if epoch >= cfg.epochs:
        raise UserError(
            f"{run_dir} has finished {epoch} of {cfg.epochs} epochs; raise --epochs to train longer"
        )
    return state, path


def kept_decisions(
    cfg: TrainConfig, state: dict | None, run_dir: Path, log: Callable[[str], None]
) -> dict:
    """The decisions a resumed run keeps (auto.decide's `recorded`): each of amp, compile and
    loader left to `auto` (not given on the command line) takes what the checkpoint's run chose,
    "by" "resumed", with the reason config.json recorded for it; one log line says so. Deciding
    again could switch the backend inside an epoch (another machine, less free memory) and break
    exactly-once. An option given explicitly wins (the trainer then cuts an epoch its loader
    cannot continue)."""
    if not state:
        return {}
    saved = state.get("config") or {}
    try:
        earlier = json.loads((run_dir / "config.json").read_text()).get("decisions") or {}
    except (OSError, ValueError, AttributeError):
        earlier = {}
    kept = {}
    for name, auto in KEPT_ON_RESUME.items():
        chose = saved.get(name, auto)
        if getattr(cfg, name) != auto or chose == auto:
            continue
        first = earlier.get(name) if isinstance(earlier.get(name), dict) else {}
        first = first if first.get("chose") == chose else {}  # same choice: its figures, reason
        reason = "the run's checkpoint chose it"
        if first.get("by") == "resumed":
            reason = first.get("reason", reason)
        elif first:
            reason += f" (first by {first.get('by')}: {first.get('reason')})"
        kept[name] = {**first, "chose": chose, "by": "resumed", "reason": reason}
    if kept:
        shown = ", ".join(
            f"{name} {({True: 'on', False: 'off'}).get(d['chose'], d['chose'])}"
            for name, d in kept.items()
        )
        flags = "/".join(f"--{name}" for name in kept)
        log(f"resuming with the checkpoint's {shown}, not decided again; give {flags} to choose")
    return kept


def epoch_row(epoch: int, sums, val: dict, eval_s: float, lr: float) -> dict:
    """metrics.jsonl's line for `epoch` (0-based): the global train sums, the val result, times."""
    return {
        "epoch": epoch + 1,
        "steps": sums.steps,
        "lr": lr,
        "train_loss": sums.loss_sum / sums.samples,
        "train_top1": percent(sums.correct, sums.samples),
        "train_samples": sums.samples,
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_samples": val["samples"],
        "epoch_s": sums.train_s + eval_s,
        "train_s": sums.train_s,
        "eval_s": eval_s,
        "timed_s": sums.timed_s,  # train_s less the warm-up steps: images/s, loader wait
        "images_per_s": sums.timed_samples / sums.timed_s if sums.timed_samples else None,
        "loader_wait_s": sums.loader_wait_s,
        "loader_wait_pct": percent(sums.loader_wait_s, sums.timed_s),
    }


def epoch_line(row: dict, epochs: int) -> str:
    """The log's line for a metrics row."""
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} "
        f"top-1 {row['train_top1']:.2f} % | val loss {row['val_loss']:.4f} "
        f"top-1 {row['val_top1']:.2f} % top-5 {row['val_top5']:.2f} % "
        f"({row['val_samples']} images) | {row['epoch_s']:.1f} s, "
        + (f"{row['images_per_s']:.0f} img/s" if row["images_per_s"] else "warm-up only")
        + f", waited on the loader {row['loader_wait_s']:.1f} s "
        f"({row['loader_wait_pct']:.0f} %)"
    )


def loader_bound_note(row: dict, cfg: TrainConfig, device, backend: str) -> str | None:
    """The advice for an epoch whose device waited on the loader over LOADER_BOUND_PCT."""
    if not row["loader_wait_pct"] > LOADER_BOUND_PCT:
        return None
    remedies = [
        "--loader resident (if the decoded split fits in device memory)",
        f"more --loader-workers (now {cfg.loader_workers or 'the default'})",
    ]
    if device.type == "cuda" and backend != "dali":
        remedies.append("--loader dali (decodes on the GPU)")
    return (
        f"note: this run is loader-bound: the model waited on the loader "
        f"{row['loader_wait_pct']:.0f} % of epoch {row['epoch']}; try " + ", or ".join(remedies)
    )


def save_cost_note(seconds: float, cfg: TrainConfig) -> str | None:
    """The advice when a checkpoint takes over SAVE_COST_PCT of --checkpoint-every (by time)."""
    every_s = cfg.checkpoint_interval()[1]
    if not every_s or seconds < every_s * SAVE_COST_PCT / 100:
        return None
    return (
        f"note: a checkpoint takes {seconds:.1f} s, over {SAVE_COST_PCT:g} % of "
        f"--checkpoint-every {cfg.checkpoint_every}; lengthen it"
    )


def data_record(manifest) -> dict:
    """What the run trained on, for summary.json and RESULTS.md."""
    return {
        "source": manifest.source.get("path"),
        "classes": manifest.num_classes,
        "train_images": manifest.splits["train"].samples,
        "val_images": manifest.splits["val"].samples,
        "synthetic": all(words.startswith("synthetic") for _, words in manifest.classes),
    }


def start_line(cfg: TrainConfig, rt: Runtime, manifest, train_loader) -> str:
    """The log's line before the first step: the model, the data, the steps, where it runs."""
    steps = len(train_loader)
    return (
        f"{cfg.arch} at {cfg.image_size} px, {manifest.num_classes} classes, "
        f"{steps * cfg.batch_size} train / {manifest.splits['val'].samples} val images; "
        f"{steps} steps per epoch of {cfg.batch_size} "
        f"({rt.placement.batch_share(cfg.batch_size)} x {rt.world_size} processes); "
        f"{describe_device(rt)}, amp {rt.amp}, compile {'on' if rt.compile else 'off'}; "
        f"loader {train_loader.summary}"
    )


def diverged_error(cfg: TrainConfig, epoch: int, where: str, saved: Path | None) -> UserError:
    """The one-line error of a loss gone non-finite at `epoch` (0-based), `where` in it."""
    if saved is not None:
        kept = f"the last good checkpoint, {saved}, is kept"
    else:
        kept = "no checkpoint had been written yet"
    return UserError(
        f"training diverged: the loss is not finite (nan/inf) at epoch {epoch + 1}, {where}; "
        f"stopped, {kept}. Lower --lr (now {cfg.lr}) or lengthen --warmup-epochs"
    )
