"""The e2e group: a loader feeding real training steps, the two stacks timed side by side.

Rows: ``reference`` (the blog's loader from reference.py, its normalised float32 fed to eager fp32
NCHW steps of the model's layers without the model's own normalisation, the reference recipe's
batch), ``fastalex`` (build_loader's default backend and the default stack; compile off
in --quick), ``defaults`` (every `auto` settled by auto.decide, the code `fastalex train` runs,
its decisions in the row; --quick plans 2 steps, so nothing is probed) and the fixed
configurations it is judged against, fp32/bf16 x eager/compiled x cpu/resident (compiled ones
skipped in --quick); the same arch at each size.
Steps come from fastalex.train (bench_model.build_step), never a copy of its loop. Each row
adds the epoch time implied for Tiny ImageNet's 100,000 training images, and ``wait_pct``: the
share of its timed windows the step waited on the loader, measured around each ``next()`` by the
trainer's own accounting (fastalex.metrics.LoaderWait: host time on the CPU; on CUDA the gap a pair
of events brackets on the GPU's timeline, so a host that blocks while queued steps keep the GPU
busy counts nothing, and no per-step sync slows the row it measures). The events are read after
each window's closing synchronize.
"""

from __future__ import annotations

import dataclasses

from bench_data import Data, base_config, need
from bench_model import (
    EPOCH_IMAGES,
    MODEL_ROWS,
    build_step,
    describe_runtime,
    forget_compiled,
    skip_emulated_bf16,
)
from harness import Skip, Subject, endless, log, plural

# The fixed configurations the `defaults` row is judged against: name -> TrainConfig fields.
FIXED_ROWS = {
    f"{amp}-{'compiled' if compiled else 'eager'}-{loader}": dict(
        amp="off" if amp == "fp32" else amp, compile=compiled, loader=loader
    )
    for amp in ("fp32", "bf16")
    for compiled in (False, True)
    for loader in ("cpu", "resident")
}


def rows(args, data: Data, size: int, device) -> dict:
    """name -> builder of the row's Subject, in table order."""
    names = ("reference", "fastalex", "defaults", *FIXED_ROWS)
    return {name: lambda name=name: e2e_row(args, data, name, size, device) for name in names}


def decided_config(cfg, shards, log):
    """cfg with every `auto` settled by the code `fastalex train` runs (auto.decide), and the
    decisions."""
    from fastalex.auto import decide, decision_lines
    from fastalex.runtime import resolve_runtime
    from fastalex.shards import read_manifest

    cfg, _, decisions = decide(cfg, resolve_runtime(cfg), read_manifest(shards), log)
    for line in decision_lines(decisions):
        log(line)
    return cfg, decisions


def e2e_row(args, data: Data, name: str, size: int, device) -> Subject:
    from reference import ReferenceLoader

    from fastalex.auto import loader_for
    from fastalex.config import RECIPES
    from fastalex.loaders import Placement, build_loader
    from fastalex.metrics import LoaderWait
    from fastalex.shards import read_manifest

    shards = need(data, "shards")
    manifest = read_manifest(shards)
    num_classes = manifest.num_classes
    recipe = RECIPES["reference" if name == "reference" else "fast"]
    batch_size = args.e2e_batch_size or recipe.batch_size
    if name == "reference":
        cfg = base_config(
            args, data, size, recipe="reference", batch_size=batch_size, **MODEL_ROWS["eager-fp32"]
        )
    elif name == "fastalex":
        cfg = base_config(args, data, size, batch_size=batch_size, compile=not args.quick)
    elif name == "defaults":  # exactly what `fastalex train` would run here, probes and all
        # --quick plans a 2-step run: the decision code runs, by rule (no probe pays back there)
        quick = {"max_steps": 2} if args.quick else {}
        cfg = base_config(args, data, size, batch_size=batch_size, compile=None, **quick)
        cfg, decisions = decided_config(cfg, shards, lambda line: log(f"[e2e] defaults: {line}"))
    else:
        if args.quick and FIXED_ROWS[name]["compile"]:
            raise Skip("compile skipped in --quick (compiling the step takes 35-60 s on 2 cores)")
        if FIXED_ROWS[name]["amp"] == "bf16":
            skip_emulated_bf16(device)
        cfg = base_config(args, data, size, batch_size=batch_size, **FIXED_ROWS[name])
    reference = name == "reference"
    # The reference's loader hands over normalised float32: its step runs the model's layers
    # without the model's own first op (NormalisedInput), as the blog's model did.
    step, runtime = build_step(
        cfg, num_classes, EPOCH_IMAGES // batch_size, baseline=reference, normalised=reference
    )
    if reference:
        loader = ReferenceLoader(need(data, "tree") / "train", size, batch_size, device)
        note = (
            "blog loader (reference.py: float32, normalised) + eager fp32 NCHW steps of "
            "fastalex's model less its uint8 normalisation (the blog's layer sizes at 227 px), "
            "the blog's batch"
        )
    else:
        if cfg.loader == "auto":  # the row's `auto` loader, as a run decides it
            cfg = dataclasses.replace(cfg, loader=loader_for(cfg, Placement(device), manifest))
        loader = build_loader(cfg, "train", Placement(device))
        if name == "fastalex":
            stack = "default stack" + ("" if cfg.compile else " (compile off in --quick)")
        elif name == "defaults":
            stack = "what `fastalex train` picks here: " + "; ".join(
                f"{k} {d['chose']} ({d['by']}: {d['reason']})" for k, d in decisions.items()
            )
        else:
            stack = "a fixed configuration"
        note = f"loader {loader.backend} + {stack}"

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
        if name == "defaults":
            row["decisions"] = decisions

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
