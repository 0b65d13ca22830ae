"""The training commands: `train` (reads torchrun's environment: rank, world size, restart
count) and `doctor` (what this machine should run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fastalex import config
from fastalex.cli.options import build, config_options, shards_argument
from fastalex.config import TrainConfig
from fastalex.errors import UserError


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


def rerun_config(path: Path, shards: Path, explicit: dict, recipe_given: bool) -> TrainConfig:
    """The settings of RUN/config.json, with `explicit` (the command line's options) over them;
    a new OUT unless --out is given. The result records the file and the overridden fields."""
    import json

    from fastalex.checkpoint import config_from_record

    if recipe_given:
        raise UserError("give one of --config and --recipe: the config holds every setting")
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--config {path}: cannot read it as JSON ({e})") from None
    if isinstance(saved, dict):
        saved = {k: v for k, v in saved.items() if k not in RERUN_DROPPED}
    return config_from_record(
        saved,
        f"--config {path}",
        **explicit,
        shards=str(shards),
        config_file=str(Path(path).resolve()),
        overrides=tuple(sorted(explicit)),
    )


@click.command(context_settings={"show_default": True})
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


@click.command()
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
