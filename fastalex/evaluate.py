"""`fastalex eval`: val top-1/top-5 of a checkpoint on a pack, with the eval transform and flip-TTA
setting its run trained with.

The model and the config come the one way back from a checkpoint (checkpoint.py): the model built
from its card, so with its mean/std, as predict builds it; the config for inference on this
machine, so with this device's AMP rule, never the run's. The pack must hold the classes the
checkpoint was trained on. Imports checkpoint.py, the loader contract (`fastalex.loaders`),
auto.py (`--loader auto`), runtime.py, the shard manifest and step.py's val loop (`evaluate`);
never a loader backend or argv."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastalex.auto import loader_for
from fastalex.checkpoint import (
    Progress,
    check_checkpoint,
    inference_config,
    load_checkpoint,
    model_from_card,
)
from fastalex.loaders import build_loader
from fastalex.runtime import configure_backends, resolve_runtime
from fastalex.shards import read_manifest
from fastalex.step import evaluate


def evaluate_checkpoint(
    path: Path, shards: str, device: str = "auto", loader: str = "auto", loader_workers: int = 0
) -> dict:
    """Val top-1/top-5 of a checkpoint, with the eval transform and TTA setting it trained with.

    Returns {"top1", "top5", "loss", "samples", "epoch", "arch"}.
    """
    path = Path(path)
    state = load_checkpoint(path)
    cfg = inference_config(
        state,
        path,
        shards=str(shards),
        device=device,
        loader=loader,
        loader_workers=loader_workers,
    )
    runtime = resolve_runtime(cfg)
    manifest = read_manifest(Path(shards))
    check_checkpoint(state, path, cfg.arch, cfg.image_size, manifest, str(shards))
    configure_backends(runtime)
    model = model_from_card(state, path)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    placement = runtime.placement
    cfg = dataclasses.replace(cfg, loader=loader_for(cfg, placement, manifest))
    val_loader = build_loader(cfg, "val", placement)
    try:
        result = evaluate(model, val_loader, runtime, cfg.flip_tta)
    finally:
        val_loader.close()
    return {**result, "epoch": Progress.from_state_dict(state).epoch, "arch": cfg.arch}
