"""The e2e group: a loader feeding real training steps, the two stacks timed side by side.

Rows: ``reference`` (the blog's loader from reference.py, eager fp32 NCHW steps, the reference
recipe's batch) and ``fastalex`` (build_loader's default backend and the default stack; compile off
in --quick), the same arch at each size. Steps come from fastalex.train (bench_model.build_step),
never a copy of its loop. Each row adds the epoch time implied for Tiny ImageNet's 100,000 training
images, and ``wait_pct``: the share of its timed windows the step waited on the loader, measured
around each ``next()`` by the trainer's own accounting (fastalex.metrics.LoaderWait: host time on
the CPU; on CUDA the gap a pair of events brackets on the GPU's timeline, so a host that blocks
while queued steps keep the GPU busy counts nothing, and no per-step sync slows the row it
measures). The events are read after each window's closing synchronize.
"""

from __future__ import annotations

import dataclasses

from bench_data import Data, base_config, need
from bench_model import EPOCH_IMAGES, MODEL_ROWS, build_step, describe_runtime, forget_compiled
from harness import Subject, endless, plural


def rows(args, data: Data, size: int, device) -> dict:
    """name -> builder of the row's Subject, in table order."""
    return {
        name: lambda name=name: e2e_row(args, data, name, size, device)
        for name in ("reference", "fastalex")
    }


def e2e_row(args, data: Data, name: str, size: int, device) -> Subject:
    from reference import ReferenceLoader

    from fastalex.config import RECIPES
    from fastalex.loaders import Placement, build_loader
    from fastalex.metrics import LoaderWait
    from fastalex.shards import read_manifest

    shards = need(data, "shards")
    num_classes = read_manifest(shards).num_classes
    recipe = RECIPES["reference" if name == "reference" else "fast"]
    batch_size = args.e2e_batch_size or recipe.batch_size
    if name == "reference":
        cfg = base_config(
            args, data, size, recipe="reference", batch_size=batch_size, **MODEL_ROWS["eager-fp32"]
        )
    else:
        cfg = base_config(args, data, size, batch_size=batch_size, compile=not args.quick)
    step, runtime = build_step(
        cfg, num_classes, EPOCH_IMAGES // batch_size, baseline=name == "reference"
    )
    if name == "reference":
        loader = ReferenceLoader(need(data, "tree") / "train", size, batch_size, device)
        note = (
            "blog loader (reference.py) + eager fp32 NCHW steps of fastalex's model (the blog's "
            "layer sizes at 227 px), the blog's batch"
        )
    else:
        loader = build_loader(cfg, "train", Placement(device))
        note = f"loader {loader.backend} + default stack"
        if not cfg.compile:
            note += " (compile off in --quick)"
    stream = endless(loader)
    wait = LoaderWait(device)

    def advance() -> int:
        with wait:
            images, labels = next(stream)
        # The step's contract: images in the runtime's memory format (a no-op when they match).
        step(images.contiguous(memory_format=runtime.memory_format), labels)
        return len(labels)

    def close() -> None:
        stream.close()
        loader.close()
        if cfg.compile:
            forget_compiled()

    def finish(row: dict) -> None:
        row["epoch_s_100k"] = EPOCH_IMAGES / row["images_per_s"]

    return Subject(
        advance=advance,
        close=close,
        waited_s=wait.seconds,
        compiles=cfg.compile,
        finish=finish,
        info={
            "batch_size": batch_size,
            "config": dataclasses.asdict(cfg),
            "note": f"{note}, {cfg.arch}, batch {batch_size}, >= {plural(args.steps, 'step')} "
            f"per window; {describe_runtime(runtime)}",
        },
    )
