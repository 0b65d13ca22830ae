#!/usr/bin/env python3
"""Batch-size sweep: for each --batch-sizes entry, with the learning rate scaled as the trainer
scales it (--lr is per 256 images; the optimizer runs lr * batch / 256 * processes), the steady
images/s of the real train step and loader, the peak memory (CUDA max allocated, or this process's
peak RSS on a CPU: a high-water mark, so sizes run in ascending order), and with --epochs N the val
top-1 of an N-epoch run of `fastalex train`. A size that runs out of memory is a row that says so.

    python tools/batch_sweep.py data/shards --batch-sizes 32,64,128,256,512
    python tools/batch_sweep.py data/shards --batch-sizes 64,256 --epochs 2 --out sweep

Writes a table (stdout), OUT.json (one row per size) and OUT.png, and marks the largest size that
fit. Reading the result: docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import click
from _common import Tool, build_trainer, train_config, train_options

WARMUP_STEPS = 3  # compile and first allocations, as the trainer's own warm-up (fastalex.train)


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure(cfg, steps: int) -> dict:
    """images/s over `steps` steps after the warm-up, and the peak memory, of one batch size."""
    import torch

    from fastalex.runtime import synchronize
    from fastalex.step import peak_lr

    trainer = build_trainer(cfg)
    device = trainer.runtime.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        batches = trainer.batches()
        for index in range(WARMUP_STEPS + steps):
            if index == WARMUP_STEPS:
                synchronize(device)
                started = time.perf_counter()
            trainer.step(*next(batches))
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        trainer.loader.close()
    return {
        "lr": peak_lr(cfg),
        "images_per_s": steps * cfg.batch_size / seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "device": device.type,
    }


def sweep_row(cfg, steps: int, epochs: int, log) -> dict:
    import torch

    row = {"batch_size": cfg.batch_size, "fits": True}
    try:
        row.update(measure(cfg, steps))
        if epochs:
            from fastalex.train import train

            with tempfile.TemporaryDirectory() as run_dir:
                run = dataclasses.replace(cfg, epochs=epochs, out=str(Path(run_dir) / "run"))
                result = train(run, log=lambda line: None, progress=False)
            row["val_top1"] = result.summary["top1"]
    except torch.OutOfMemoryError as e:
        row.update(fits=False, error=str(e).splitlines()[0])
        torch.cuda.empty_cache()
    log(format_row(row))
    return row


def format_row(row: dict) -> str:
    if not row["fits"]:
        return f"{row['batch_size']:>6}  out of memory"
    top1 = f"{row['val_top1']:8.2f}" if "val_top1" in row else f"{'':>8}"
    return (
        f"{row['batch_size']:>6} {row['lr']:>9.4f} {row['images_per_s']:>10.0f} "
        f"{row['peak_memory_mb']:>10.0f} {top1}"
    )


def draw(rows: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = [r for r in rows if r["fits"]]
    figure, speed = plt.subplots(figsize=(7, 4))
    sizes = [r["batch_size"] for r in fit]
    speed.plot(sizes, [r["images_per_s"] for r in fit], "o-", label="images/s")
    speed.set_xscale("log", base=2)
    speed.set_xlabel("batch size")
    speed.set_ylabel("images/s")
    speed.set_ylim(bottom=0)
    memory = speed.twinx()
    memory.plot(sizes, [r["peak_memory_mb"] for r in fit], "s--", color="tab:red", label="peak MB")
    memory.set_ylabel("peak memory (MB)")
    memory.set_ylim(bottom=0)
    speed.set_title(title, fontsize="medium")
    figure.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


def parse_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 32,64,128") from None
    if not sizes or sizes[0] < 1:
        raise click.BadParameter("batch sizes must be >= 1")
    return sizes


@click.command(cls=Tool, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", type=click.Path(path_type=Path))
@click.option(
    "--batch-sizes",
    default="32,64,128,256,512",
    show_default=True,
    callback=parse_sizes,
    help="Comma-separated batch sizes, run in ascending order.",
)
@click.option(
    "--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Timed steps."
)
@click.option(
    "--epochs",
    "sweep_epochs",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also train this many epochs per size and report val top-1; 0 = speed only.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("batch_sweep"),
    show_default=True,
    help="Writes OUT.json and OUT.png.",
)
@train_options(skip=("batch_size", "epochs"))
@click.pass_context
def main(ctx, shards, batch_sizes, steps, sweep_epochs, out, **options) -> None:
    """Images/s, peak memory (and val top-1) of each batch size on the pack at SHARDS."""
    click.echo(f"{'batch':>6} {'lr':>9} {'images/s':>10} {'peak MB':>10} {'top-1 %':>8}")
    rows = []
    for size in batch_sizes:
        cfg = train_config(ctx, shards, options, batch_size=size)
        rows.append(sweep_row(cfg, steps, sweep_epochs, click.echo))
    fit = [r["batch_size"] for r in rows if r["fits"]]
    largest = max(fit) if fit else None
    for row in rows:
        row["largest_fit"] = row["batch_size"] == largest
    title = f"{cfg.arch} at {cfg.image_size} px, {rows[0].get('device', '?')}, {steps} steps"
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    json_path.write_text(
        json.dumps({"rows": rows, "config": dataclasses.asdict(cfg)}, indent=1) + "\n"
    )
    if fit:
        draw(rows, png_path, title)
    click.echo(
        (f"largest batch that fit: {largest}" if fit else "no batch size fit")
        + f"; wrote {json_path}"
        + (f" and {png_path}" if fit else "")
    )


if __name__ == "__main__":
    main()
