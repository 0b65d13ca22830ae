#!/usr/bin/env python3
"""A grid of real batches, one row per loader backend plus one of val, each image titled with its
class: the picture that tells at a glance whether augmentation, labels and normalisation are right.

    python tools/show_batches.py data/shards --out grid.png
    python tools/show_batches.py data/shards --loaders cpu,dali --image-size 227 --images 6

Each row is the first train batch of an epoch as `fastalex.loaders.build_loader` hands it to the
trainer for that backend (every `fastalex train` option applies: crop scale and ratio, image size,
seed, ...): uint8 pixels, shown as they are. All rows use the same seed: `cpu` and `resident` draw
the same samples and crops from it, `dali` draws its own from DALI's generator (its shuffle lives
in the pipeline), so its row shows other images. The last row is the val transform (the whole
image resized) through the `cpu` loader, in pack order. Each row's label gives the batch's
per-channel mean and std after the model's normalisation (model.normalise_pixels with the config's
constants: about 0 and 1 when they suit the data). A backend that cannot run here (DALI not
installed, a resident split too large) is left out with the reason, in the figure and on stdout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from _common import Tool, train_config, train_options

NAME_CHARS = 22  # a class name is cut to this in a title


def first_batch(cfg, split: str):
    """(images, labels, backend) of the first batch of `split` under `cfg`, on the CPU: (N, 3, S,
    S) uint8 pixels, (N,) int64."""
    from fastalex.auto import loader_for
    from fastalex.loaders import build_loader
    from fastalex.runtime import resolve_runtime
    from fastalex.shards import read_manifest

    placement = resolve_runtime(cfg).placement
    chosen = loader_for(cfg, placement, read_manifest(Path(cfg.shards)))
    loader = build_loader(dataclasses.replace(cfg, loader=chosen), split, placement)
    try:
        images, labels = next(iter(loader))
        return images.cpu(), labels.cpu(), loader.backend
    finally:
        loader.close()


def class_title(classes, label: int) -> str:
    wnid, words = classes[label]
    name = (words.split(",")[0] if words else wnid)[:NAME_CHARS]
    return f"{label}: {name}"


def row_label(name: str, images) -> str:
    """`name`, then the per-channel mean and std of (N, 3, S, S) uint8 `images` after the model's
    normalisation (model.normalise_pixels with the config's constants: what its layers see)."""
    import torch

    from fastalex.config import IMAGE_MEAN, IMAGE_STD
    from fastalex.model import normalise_pixels, register_normalisation

    constants = torch.nn.Module()  # holds the model's normalisation constants, nothing else
    register_normalisation(constants, IMAGE_MEAN, IMAGE_STD)
    normalised = normalise_pixels(constants, images)
    channel_mean = normalised.mean(dim=(0, 2, 3)).tolist()
    channel_std = normalised.std(dim=(0, 2, 3)).tolist()
    return (
        f"{name}\nmean {' '.join(f'{m:+.2f}' for m in channel_mean)}\n"
        f"std {' '.join(f'{s:.2f}' for s in channel_std)}"
    )


def draw(
    rows: list[tuple[str, object, object]],
    skipped: list[str],
    classes,
    count: int,
    title: str,
    out_png: Path,
) -> None:
    from fastalex.plot import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(
        len(rows),
        count,
        figsize=(1.9 * count, 2.2 * len(rows)),
        squeeze=False,
        constrained_layout=True,
    )
    for axes_row, (name, images, labels) in zip(axes, rows):
        pixels = images[:count].permute(0, 2, 3, 1).numpy()  # (n, S, S, 3) uint8 for imshow
        for column, axis in enumerate(axes_row):
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(pixels):
                axis.imshow(pixels[column], interpolation="nearest")
                axis.set_title(class_title(classes, int(labels[column])), fontsize=7)
        axes_row[0].set_ylabel(row_label(name, images), fontsize=7)
    if skipped:
        title += "\nnot shown: " + "; ".join(skipped)
    figure.suptitle(title, fontsize=9)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


@click.command(cls=Tool, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_png",
    type=click.Path(path_type=Path),
    default=Path("grid.png"),
    show_default=True,
    help="PNG to write.",
)
@click.option(
    "--images",
    "count",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images shown per row.",
)
@click.option(
    "--loaders",
    default="dali,cpu,resident",
    show_default=True,
    help="Train backends to show, comma-separated, each as one row.",
)
@train_options()
@click.pass_context
def main(ctx, shards, out_png, count, loaders, **options) -> None:
    """Draw the first train batch of each loader backend, and a val batch, from the pack at
    SHARDS, with class names: augmentation, labels and normalisation at a glance."""
    from fastalex.errors import UserError
    from fastalex.loaders import BACKENDS
    from fastalex.shards import read_manifest

    backends = [name.strip() for name in loaders.split(",") if name.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise UserError(f"--loaders: choose from {', '.join(BACKENDS)} (got {loaders!r})")
    cfg = train_config(ctx, shards, options)
    classes = read_manifest(Path(shards)).classes
    rows, skipped = [], []
    for backend in backends:
        try:
            images, labels, ran = first_batch(dataclasses.replace(cfg, loader=backend), "train")
        except (ImportError, RuntimeError, UserError) as e:  # DALI missing, no room, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            skipped.append(f"{backend} ({reason})")
            click.echo(f"{backend}: not shown: {reason}")
            continue
        rows.append((f"train: {ran}", images, labels))
    images, labels, _ = first_batch(dataclasses.replace(cfg, loader="cpu"), "val")
    rows.append(("val: cpu", images, labels))
    title = (
        f"{shards}: {cfg.arch} input {cfg.image_size} px, crop scale {cfg.crop_scale_min:g}-"
        f"{cfg.crop_scale_max:g}, ratio {cfg.crop_ratio_min:.3g}-{cfg.crop_ratio_max:.3g}, "
        f"seed {cfg.seed}, batch {cfg.batch_size}"
    )
    draw(rows, skipped, classes, count, title, out_png)
    click.echo(f"wrote {out_png}: {', '.join(name for name, _, _ in rows)}")


if __name__ == "__main__":
    main()
