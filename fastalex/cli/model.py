"""The commands on a trained model: `eval`, `predict`, `export`, `model-info` and `plot`."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import click

from fastalex.cli.options import config_options, shards_argument
from fastalex.config import PackConfig, TrainConfig
from fastalex.errors import UserError


@click.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@shards_argument
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help='Also write {"top1": ..., "top5": ...} (percent) here.',
)
@config_options(
    TrainConfig,
    skip=tuple(
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("device", "loader", "loader_workers")
    ),
)
def evaluate(checkpoint, shards, json_path, device, loader, loader_workers) -> None:
    """Top-1/top-5 of CHECKPOINT on the val split of SHARDS, with the eval transform and
    flip-TTA setting the checkpoint was trained with."""
    from fastalex.evaluate import evaluate_checkpoint
    from fastalex.metrics import write_json

    result = evaluate_checkpoint(checkpoint, str(shards), device, loader, loader_workers)
    click.echo(
        f"{checkpoint} ({result['arch']}, after epoch {result['epoch']}): val top-1 "
        f"{result['top1']:.2f} %, top-5 {result['top5']:.2f} %, loss {result['loss']:.4f} "
        f"over {result['samples']} images"
    )
    if json_path is not None:
        write_json(
            json_path,
            {
                "top1": result["top1"],
                "top5": result["top5"],
                "loss": result["loss"],
                "samples": result["samples"],
            },
        )


ARCH_CHOICES = typing.get_args(typing.get_type_hints(TrainConfig)["arch"])


@click.command("model-info")
@click.option(
    "--arch",
    type=click.Choice(ARCH_CHOICES),
    default=TrainConfig.arch,
    show_default=True,
    help="Architecture.",
)
@click.option(
    "--image-size",
    type=int,
    default=TrainConfig.image_size,
    show_default=True,
    help="Square input size in px.",
)
@click.option(
    "--classes",
    type=int,
    default=200,
    show_default=True,
    help="Output classes (Tiny ImageNet: 200).",
)
def model_info(arch, image_size, classes) -> None:
    """Layer shapes, parameters and forward FLOPs of an architecture (nothing is computed)."""
    from fastalex.model import describe_model, format_model_info

    try:
        info = describe_model(arch, classes, image_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(format_model_info(info))


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_png",
    type=click.Path(path_type=Path),
    default=Path("curves.png"),
    show_default=True,
    help="PNG to write.",
)
def plot(runs, out_png) -> None:
    """Draw loss, top-1/top-5 and images/s per epoch of one or more RUN directories (written by
    `fastalex train`), overlaid in one PNG; the images/s axis starts at zero."""
    from fastalex.plot import plot_runs

    click.echo(f"wrote {plot_runs(list(runs), out_png)}")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--top",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Classes shown per image.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image instead.")
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="CSV instead: path,rank,index,class,name,probability (a header, then a row per class).",
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per forward pass.",
)
@click.option(
    "--device",
    type=click.Choice(typing.get_args(typing.get_type_hints(TrainConfig)["device"])),
    default=TrainConfig.device,
    show_default=True,
    help="auto = cuda when available.",
)
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Decode threads; 0 = every core.",
)
@click.option(
    "--max-side",
    default=PackConfig.max_side,
    show_default=True,
    type=click.IntRange(min=0),
    help="Downscale larger images to this longer side first, as pack stores them; 0 = full size.",
)
def predict(checkpoint, paths, top, as_json, as_csv, batch_size, device, workers, max_side) -> None:
    """Top classes of images: PATHS are image files, directories (searched recursively) and glob
    patterns (quote them; ** recurses): JPEG, PNG, WebP, BMP, TIFF, GIF or PPM.

    Each image gets the run's val transform (the whole image resized to the model's size) and, when
    the run used it, flip TTA. Files that cannot be read are named on stderr and skipped: exit
    status 1 if any were.
    """
    from fastalex.predict import predict_paths

    if as_json and as_csv:
        raise UserError("choose one of --json and --csv")
    skipped = predict_paths(
        checkpoint,
        paths,
        top=top,
        output="json" if as_json else "csv" if as_csv else "text",
        batch_size=batch_size,
        device=device,
        workers=workers,
        max_side=max_side,
        write=click.echo,
        warn=lambda line: click.echo(line, err=True),
        progress=sys.stderr.isatty(),
    )
    if skipped:
        sys.exit(1)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pt2", "onnx"]),
    default="pt2",
    show_default=True,
    help="pt2: a torch.export program; onnx: ONNX (needs pip install 'fastalex[onnx]').",
)
@click.option(
    "--layout",
    type=click.Choice(["nhwc", "nchw"]),
    default="nhwc",
    show_default=True,
    help="Input layout: (N, S, S, 3) as numpy/PIL give it, or (N, 3, S, S).",
)
@click.option(
    "--flip-tta/--no-flip-tta",
    default=None,
    help="Average with the mirror's logits inside the program  [default: as the run evaluated]",
)
def export(checkpoint, out, fmt, layout, flip_tta) -> None:
    """Write CHECKPOINT's model to OUT as a program that needs only torch (or onnxruntime): uint8
    RGB images of the model's size in, logits out, normalisation inside; plus OUT's .json sidecar
    with the class names and the preprocessing."""
    from fastalex.export import export_model

    program, sidecar, info = export_model(checkpoint, out, fmt, layout, flip_tta)
    shape = ", ".join(str(side) for side in info["input"]["shape"])
    click.echo(
        f"wrote {program}: uint8 RGB ({shape}) in, logits (N, {len(info['classes'])}) out"
        f"{', flip TTA inside' if info['flip_tta'] else ''}; classes and preprocessing in "
        f"{sidecar}"
    )
