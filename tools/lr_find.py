#!/usr/bin/env python3
"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3): train from the recipe's initial weights while the learning rate rises
exponentially from --min-lr to --max-lr over --steps steps, plot the smoothed loss against the
learning rate, and suggest a --lr for `fastalex train`.

    python tools/lr_find.py data/shards                 # the fast recipe, its batch, this device
    python tools/lr_find.py data/shards --recipe reference --out lr_ref.png

It runs the trainer's own pieces (fastalex.step.build_training, make_train_step and the train
loader), only setting the optimizer's learning rate before each step, so the result holds for
the recipe, batch size, AMP, model and device given: every `fastalex train` option is accepted.
Learning rates are in --lr's units (per 256 images; the optimizer runs lr * batch / 256).

The suggestion is the learning rate at which the smoothed loss was lowest, divided by 10 (the
rule of Smith's test as fastai applies it: the lowest point is already past the useful range);
the steepest descent of the smoothed loss is printed and marked beside it. The sweep stops early
once an exponential moving average of the loss (beta EMA_BETA, bias-corrected, as fastai's)
exceeds DIVERGED_FACTOR times its lowest value, or is not finite. The curve that is plotted and
searched is smoothed afterwards with a centred moving average (SMOOTH_SHARE of the steps each
side): an EMA lags by ~1 / (1 - beta) = 50 steps, which would shift the minimum it finds to a
higher learning rate by a decade at 40 steps per decade. One host sync per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click
from _common import Tool, build_trainer, train_config, train_options

EMA_BETA = 0.98  # weight of the past in the stopping rule's average (fastai's lr_find)
DIVERGED_FACTOR = 4.0  # stop once that average exceeds this multiple of its minimum (fastai)
SMOOTH_SHARE = 0.05  # the plotted curve: the mean over +-5 % of the steps around each step
SUGGESTION_DIVISOR = 10.0  # suggested lr = lr at the lowest smoothed loss / 10
SKIP_START = 0.1  # share of the first steps left out of the minimum/slope search (noisy start)
POSITIVE = click.FloatRange(min=0, min_open=True)
SWEPT = ("lr", "lr_schedule", "warmup_epochs", "step_epochs", "step_gamma", "epochs")  # the sweep's


def set_lr(optimizer, lr: float) -> None:
    """The optimizer's learning rate, in place: a tensor LR (the compiled CPU step's) is filled,
    so the compiled graph sees it without a recompile."""
    for group in optimizer.param_groups:
        if hasattr(group["lr"], "fill_"):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def sweep(trainer, min_lr: float, max_lr: float, steps: int, log=print) -> list[dict]:
    """Rows of {"lr", "loss"} per step, lr in --lr units, until the loss diverges."""
    from fastalex.step import peak_lr

    cfg, rows, average, best = trainer.cfg, [], 0.0, math.inf
    batches = trainer.batches()
    for index in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (index / max(1, steps - 1))
        set_lr(trainer.training.optimizer, peak_lr(dataclasses.replace(cfg, lr=lr)))
        images, labels = next(batches)
        loss_sum, _ = trainer.step(images, labels)
        loss = loss_sum.item() / len(labels)  # host sync: the sweep decides on every step
        rows.append({"lr": lr, "loss": loss})
        average = EMA_BETA * average + (1 - EMA_BETA) * loss
        smoothed = average / (1 - EMA_BETA ** (index + 1))
        if not math.isfinite(smoothed) or smoothed > DIVERGED_FACTOR * best:
            log(f"stopped at step {index + 1}: the loss diverged at lr {lr:.3g}")
            break
        best = min(best, smoothed)
    return smooth(rows)


def smooth(rows: list[dict]) -> list[dict]:
    """The rows with "smoothed": the centred mean of the finite losses around each step."""
    half = max(1, round(len(rows) * SMOOTH_SHARE))
    losses = [row["loss"] for row in rows]
    for index, row in enumerate(rows):
        window = [x for x in losses[max(0, index - half) : index + half + 1] if math.isfinite(x)]
        row["smoothed"] = sum(window) / len(window) if window else math.nan
    return rows


def suggest(rows: list[dict]) -> dict:
    """{"lr": suggestion, "lowest": lr at the lowest smoothed loss, "steepest": lr of the
    steepest descent}, searched after the first SKIP_START of the steps."""
    usable = [r for r in rows if math.isfinite(r["smoothed"])]
    start = min(int(len(usable) * SKIP_START), max(0, len(usable) - 2))
    usable = usable[start:]
    lowest = min(usable, key=lambda r: r["smoothed"])["lr"]
    slopes = [
        ((b["smoothed"] - a["smoothed"]) / math.log(b["lr"] / a["lr"]), a["lr"])
        for a, b in zip(usable, usable[1:])
    ]
    steepest = min(slopes)[1] if slopes else lowest
    return {"lr": lowest / SUGGESTION_DIVISOR, "lowest": lowest, "steepest": steepest}


def draw(rows: list[dict], found: dict, title: str, out_png: Path) -> None:
    from fastalex.plot import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5), constrained_layout=True)
    lrs = [r["lr"] for r in rows]
    axis.plot(lrs, [r["loss"] for r in rows], color="0.75", label="loss per step")
    axis.plot(lrs, [r["smoothed"] for r in rows], label="smoothed (centred mean)")
    for key, style, label in (
        ("lr", "-", "suggested --lr"),
        ("lowest", ":", "lowest loss"),
        ("steepest", "--", "steepest descent"),
    ):
        axis.axvline(
            found[key],
            linestyle=style,
            color="C3" if key == "lr" else "0.4",
            label=f"{label}: {found[key]:.3g}",
        )
    finite = [r["smoothed"] for r in rows if math.isfinite(r["smoothed"])]
    axis.set_ylim(min(finite) * 0.9, min(max(finite), 2 * finite[0]) * 1.1)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate (--lr units: per 256 images)")
    axis.set_ylabel("train loss")
    axis.set_title(title, fontsize="medium")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


@click.command(cls=Tool, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_png",
    type=click.Path(path_type=Path),
    default=Path("lr_find.png"),
    show_default=True,
    help="PNG of the loss against the learning rate.",
)
@click.option(
    "--steps",
    default=200,
    show_default=True,
    type=click.IntRange(min=2),
    help="Steps of the sweep.",
)
@click.option(
    "--min-lr",
    default=1e-4,
    show_default=True,
    type=POSITIVE,
    help="First learning rate (--lr units).",
)
@click.option(
    "--max-lr",
    default=10.0,
    show_default=True,
    type=POSITIVE,
    help="Last learning rate (--lr units).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the rows and the suggestion here.",
)
@train_options(skip=SWEPT)
@click.pass_context
def main(ctx, shards, out_png, steps, min_lr, max_lr, json_path, **options) -> None:
    """Learning-rate range test on the pack at SHARDS: a PNG of the smoothed loss against the
    learning rate and a suggested --lr for this recipe, batch size and device."""
    if min_lr >= max_lr:
        raise click.BadParameter("--min-lr must be below --max-lr")
    cfg = train_config(ctx, shards, options)
    trainer = build_trainer(cfg)
    try:
        rows = sweep(trainer, min_lr, max_lr, steps, log=click.echo)
    finally:
        trainer.loader.close()
    found = suggest(rows)
    rt = trainer.runtime
    title = (
        f"{cfg.recipe} recipe: {cfg.arch} at {cfg.image_size} px, batch {cfg.batch_size}, "
        f"{rt.device.type}, amp {rt.amp}, {len(rows)} steps"
    )
    draw(rows, found, title, out_png)
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "suggested_lr": found["lr"],
                    **found,
                    "rows": rows,
                    "config": dataclasses.asdict(cfg),
                },
                indent=1,
            )
            + "\n"
        )
    click.echo(
        f"{title}\nsuggested --lr {found['lr']:.3g} (per 256 images: the optimizer's "
        f"{found['lr'] * cfg.batch_size / 256:.3g} at batch {cfg.batch_size}); lowest "
        f"loss at {found['lowest']:.3g}, steepest descent at {found['steepest']:.3g}; "
        f"wrote {out_png}"
    )


if __name__ == "__main__":
    main()
