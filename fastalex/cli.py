"""The `fastalex` command line: the only module that reads argv or prints for the user.

Each config option is generated from its dataclass field (name, type, default, and the help in
its metadata), so the CLI cannot drift from the config. A UserError anywhere
below ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import click

from fastalex import config
from fastalex.config import PackConfig, TrainConfig
from fastalex.errors import UserError


class OneLineErrors:
    """A click command or group mixin: a UserError (bad input) ends it with one clean line on
    stderr and exit status 2 (tools/ commands use it too)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


class Group(OneLineErrors, click.Group):
    """The fastalex command group."""


def config_options(cls: type, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per dataclass field of `cls` (minus `skip`)."""
    hints = typing.get_type_hints(cls)

    def decorate(function):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            kwargs = dict(default=f.default, show_default=True, help=f.metadata.get("help"))
            if hint is bool or hint == bool | None:  # None: unset, `auto` decides
                decl = f"{flag}/--no-{flag[2:]}"
            elif typing.get_origin(hint) is typing.Literal:
                decl, kwargs["type"] = flag, click.Choice(typing.get_args(hint))
            else:
                decl, kwargs["type"] = flag, hint
            function = click.option(decl, f.name, **kwargs)(function)
        return function

    return decorate


def build(cls: type, **values):
    try:
        return cls(**values)
    except ValueError as e:
        raise UserError(str(e)) from None


def shards_argument(command):
    """The SHARDS argument of a command, a pack directory or an fsspec URL (s3://, gs://, https://)
    staged into --cache-dir first (fastalex.remote): the command gets a local directory."""
    import functools
    import os

    @functools.wraps(command)
    def with_local_pack(*args, shards, cache_dir, **kwargs):
        from fastalex.remote import local_pack

        return command(*args, shards=local_pack(shards, cache_dir), **kwargs)

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastalex" / "shards"
    with_local_pack = click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        default=cache,
        show_default=True,
        help="Where a SHARDS URL is staged, once per machine, and reused.",
    )(with_local_pack)
    return click.argument("shards")(with_local_pack)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastalex")
def main() -> None:
    """fastalex: train AlexNet on Tiny ImageNet fast, with numbers you can trust.

    \b
    Typical use:
      fastalex pack tiny-imagenet-200.zip shards/   # once: verified record shards
      fastalex train shards/ --out runs/first       # train; images/s and top-1/top-5
    No dataset at hand? `fastalex synth DIR` writes a stand-in in the same layout.
    """


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--classes", default=200, show_default=True, help="Number of classes (wnids).")
@click.option("--train-per-class", default=500, show_default=True, help="Train images per class.")
@click.option("--val-per-class", default=50, show_default=True, help="Val images per class.")
@click.option("--test-images", default=0, show_default=True, help="Unlabelled test images.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--workers", default=0, show_default=True, help="Processes; 0 = every core.")
def synth(out, classes, train_per_class, val_per_class, test_images, seed, workers) -> None:
    """Write a SYNTHETIC stand-in for Tiny ImageNet to OUT, in the exact official layout.

    64x64 JPEGs whose class (shape x stripes x hue) a CNN can learn; about 1 % grayscale, as in the
    real set. For demos and tests only: accuracy on it says nothing about Tiny ImageNet.
    """
    from fastalex.synth import synth as write_synth

    count = write_synth(
        out,
        classes,
        train_per_class,
        val_per_class,
        test_images,
        seed,
        workers or config.default_workers(),
    )
    click.echo(f"wrote {count} SYNTHETIC images (a stand-in, not Tiny ImageNet) to {out}")


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option(
    "--download", is_flag=True, help="Fetch the official zip first (then SRC is not given)."
)
@click.option("--url", default=None, help="Download from here instead of the official address.")
@click.option(
    "--md5", default=None, help="Expected md5 of the download (default: the official zip's)."
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=Path.home() / ".cache" / "fastalex",
    show_default=True,
    help="Where --download keeps the zip (resumed if partial) and hf:// its snapshots.",
)
@click.option(
    "--config",
    "hub_config",
    default=None,
    help="Of a parquet snapshot holding several configs: the one to pack (its directory).",
)
@config_options(PackConfig)
def pack(paths, download, url, md5, cache_dir, hub_config, **options) -> None:
    """Pack a source tree (a directory, or a zip read in place) into shards at OUT.

    \b
    SRC is in one of three layouts, told apart by what it holds:
      Tiny ImageNet  wnids.txt, train/<wnid>/images/*, val/val_annotations.txt + val/images/*
      ImageFolder    train/<class>/<images>, val/<class>/<images> (or --val-fraction), and
                     optionally classes.txt or words.txt: <class> <name> per line
      HF parquet     a Hugging Face dataset snapshot: data/train-*.parquet, data/valid-*.parquet
                     (or default/train/0000.parquet ...) with image and label columns;
                     hf://OWNER/NAME fetches one (needs pip install huggingface_hub),
                     hf://OWNER/NAME/CONFIG one config of it (or --config CONFIG)

    Train and val become WebDataset tars with DALI indexes and a manifest (counts, sha256, labels in
    sorted class order, rejected files and why). Every image's header is checked (over
    --max-pixels: rejected undecoded) and every image fully decoded once: files that do not decode
    are rejected and listed (or, with --strict, stop the run). PNG, WebP, BMP, TIFF, GIF and PPM
    are stored as JPEG (--no-transcode rejects them), images over --max-side are stored
    downscaled; other JPEGs are stored byte for byte. A pack killed part-way leaves no manifest;
    run the same command again: it keeps the shards already finished.
    """
    from fastalex.pack import pack as run_pack
    from fastalex.pack import summarize
    from fastalex.sources import detect_source, parquet, tinyimagenet

    cfg = build(PackConfig, **options)
    if download:
        if len(paths) != 1:
            raise UserError("with --download give only OUT: fastalex pack --download OUT")
        from tqdm import tqdm

        with tqdm(unit="B", unit_scale=True, desc="download") as bar:

            def show(done, total):
                bar.total = total
                bar.update(done - bar.n)

            src = tinyimagenet.download_zip(
                url or tinyimagenet.OFFICIAL_URL,
                cache_dir,
                md5 or (None if url else tinyimagenet.OFFICIAL_MD5),
                show,
            )
        out = paths[0]
    elif len(paths) == 2:
        src, out = paths
    else:
        raise UserError("give SRC and OUT: fastalex pack SRC-DIR-OR-ZIP OUT")
    if str(src).startswith("hf://"):
        src, hub_config = parquet.snapshot_hub(str(src), str(cache_dir / "hub"), hub_config)
    ref = detect_source(src)
    if hub_config:
        if ref.layout != "parquet":
            raise UserError(
                f"{src}: --config picks a config of a parquet snapshot; this is not one"
            )
        ref = parquet.with_config(ref, hub_config)
    manifest, wrote = run_pack(ref, out, cfg)
    click.echo(summarize(manifest))
    done = "packed into" if wrote else "already packed (same source and settings), kept"
    click.echo(f"{done} {out}; check it any time with: fastalex verify {out}")


@main.command()
@shards_argument
@click.option("--decode", default=32, show_default=True, help="Images fully decoded per shard.")
def verify(shards, decode) -> None:
    """Check a pack: re-hash every shard against the manifest, check every index against its tar,
    and fully decode a sample of images. Exit 0 when sound, 1 naming each problem otherwise."""
    from fastalex.pack import verify_pack

    problems = verify_pack(shards, decode)
    for problem in problems:
        click.echo(f"BAD {problem}", err=True)
    if problems:
        click.echo(f"{shards}: {len(problems)} problems; re-pack from the source", err=True)
        sys.exit(1)
    click.echo(f"{shards}: OK (every shard hash, index and {decode} decodes per shard)")


def process_group_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) as torchrun sets them; one process
    without torchrun."""
    import os

    try:
        return (
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )
    except ValueError as e:
        raise UserError(
            f"RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE must be integers: {e}"
        ) from None


RERUN_DROPPED = ("shards", "out", "resume", "config_file", "overrides")  # not a run's settings
RECORD_ONLY = ("decisions",)  # what config.json records beside the settings (train.py)


def rerun_config(path: Path, shards: Path, explicit: dict, recipe_given: bool) -> TrainConfig:
    """The settings of RUN/config.json, with `explicit` (the command line's options) over them;
    a new OUT unless --out is given. The result records the file and the overridden fields."""
    import json

    if recipe_given:
        raise UserError("give one of --config and --recipe: the config holds every setting")
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--config {path}: cannot read it as JSON ({e})") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(RECORD_ONLY)
    unknown = sorted(set(saved) - known) if isinstance(saved, dict) else ["(not an object)"]
    if unknown:
        raise UserError(f"--config {path}: not a fastalex config.json (unknown {unknown[:3]})")
    base = {k: v for k, v in saved.items() if k not in RERUN_DROPPED + RECORD_ONLY}
    overrides = tuple(sorted(explicit))
    config_file = str(Path(path).resolve())
    fields = {**base, **explicit, "shards": str(shards), "config_file": config_file}
    return build(TrainConfig, **fields, overrides=overrides)


@main.command(context_settings={"show_default": True})
@shards_argument
@config_options(TrainConfig, skip=("shards", "config_file", "overrides"))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Re-run the settings of this RUN/config.json; options given here override them.",
)
@click.pass_context
def train(ctx: click.Context, shards, config_path, **options) -> None:
    """Train on the pack at SHARDS; writes RUN/config.json, metrics.jsonl, summary.json and
    checkpoints/.

    Defaults shown are the `fast` recipe's; `--recipe reference` (the blog's AlexNet at 227 px,
    lr 0.01 at batch 128, StepLR(7, 0.1), 30 epochs) replaces every option not given on the command
    line. Several processes: `torchrun --nproc_per_node N -m fastalex train ...` (DDP; --batch-size
    is the global batch, split over the processes; a torchrun restart resumes by itself). Ctrl-C
    finishes the step, saves, and `--resume --out RUN` continues. `--config RUN/config.json` re-runs
    a run's settings (in a new OUT unless --out is given), the options given beside it overriding
    them.
    """
    import os

    from click.core import ParameterSource

    from fastalex.train import train as run_training

    explicit = {
        name: value
        for name, value in options.items()
        if name != "recipe" and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    if config_path is not None:
        recipe_given = ctx.get_parameter_source("recipe") == ParameterSource.COMMANDLINE
        cfg = rerun_config(config_path, shards, explicit, recipe_given)
    else:
        try:
            cfg = config.recipe_config(options["recipe"], shards=str(shards), **explicit)
        except ValueError as e:
            raise UserError(str(e)) from None
    rank, world_size, local_rank, local_world_size = process_group_env()
    try:
        result = run_training(
            cfg,
            rank,
            world_size,
            local_rank,
            log=click.echo,
            local_world_size=local_world_size,
            restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )
    except UserError:
        if rank != 0:  # rank 0 says it once
            sys.exit(2)
        raise
    if result.status == "interrupted":
        sys.exit(130)


@main.command()
@shards_argument
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--arch", type=click.Choice(sorted(config.MIN_IMAGE_SIZE)), default="alexnet64")
@click.option("--image-size", type=int, default=TrainConfig().image_size, help="px")
@click.option("--batch-size", type=int, default=TrainConfig().batch_size, help="images per step")
@click.option("--epochs", type=int, default=TrainConfig().epochs, help="of the planned run")
@click.option("--loader-workers", type=int, default=0, help="0 = this process's share of cores")
@click.option("--windows", type=int, default=3, help="timed windows per row, interleaved")
@click.option("--quick", is_flag=True, help="one window per row and no compiled rows (seconds)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the report")
def doctor(
    shards, device, arch, image_size, batch_size, epochs, loader_workers, windows, quick, json_path
) -> None:
    """Time this machine's options on the pack at SHARDS and print the `fastalex train` command
    to run: the train step per AMP mode, eager and compiled (no loader: the upper bound), each
    loader's images/s, the predicted epoch time and the loader's share of waiting."""
    import json

    from fastalex.doctor import diagnose, doctor_config, format_report

    cfg = build(
        doctor_config,
        shards=shards,
        device=device,
        arch=arch,
        image_size=image_size,
        batch_size=batch_size,
        epochs=epochs,
        loader_workers=loader_workers,
    )
    report = diagnose(
        cfg,
        compiled_rows=not quick,
        windows=1 if quick else windows,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(format_report(report))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


@main.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("shards", type=click.Path(path_type=Path))
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
    from fastalex.metrics import write_json
    from fastalex.train import evaluate_checkpoint

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


@main.command("model-info")
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


@main.command()
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


@main.command()
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


@main.command()
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
