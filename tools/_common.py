"""What the tools share: `fastalex train`'s options on a click command and the TrainConfig they
make (the recipe's preset, then the options given on the command line), the train loader, model
and step the trainer itself builds, and one-line user errors.

Imports fastalex (never the other way round: fastalex imports nothing from tools/).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
from click.core import ParameterSource

from fastalex import config
from fastalex.cli import OneLineErrors, config_options
from fastalex.config import TrainConfig
from fastalex.errors import UserError

NOT_FOR_TOOLS = ("shards", "out", "resume", "max_steps")  # run-directory and stop options


def train_options(skip: tuple[str, ...] = ()):
    """Every `fastalex train` option that shapes a step or a batch (less `skip`), with the same
    defaults and help."""
    return config_options(TrainConfig, skip=(*NOT_FOR_TOOLS, *skip))


def train_config(ctx: click.Context, shards, options: dict, **fixed) -> TrainConfig:
    """The recipe's config with the options given on the command line (as `fastalex train`
    builds it) and `fixed` on top; UserError for an invalid combination."""
    train_names = {name for name in options if name in TrainConfig.__dataclass_fields__}
    explicit = {
        name: options[name]
        for name in train_names
        if name != "recipe" and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    try:
        return config.recipe_config(options["recipe"], shards=str(shards), **{**explicit, **fixed})
    except ValueError as e:
        raise UserError(str(e)) from None


@dataclass
class Trainer:
    """The trainer's own pieces for one config: runtime, train loader, model/optimizer (Training)
    and the compiled or eager step, built by fastalex.train's functions."""

    cfg: TrainConfig
    runtime: object  # fastalex.runtime.Runtime
    loader: object  # fastalex.loaders.Loader
    training: object  # fastalex.train.Training
    step: object  # step(images, labels) -> (loss_sum, correct), on the device
    class_count: int

    def batches(self) -> Iterator:
        """Train batches, epoch after epoch, in the step's memory format."""
        while True:
            for images, labels in self.loader:
                yield images.contiguous(memory_format=self.runtime.memory_format), labels


def build_trainer(cfg: TrainConfig, model=None) -> Trainer:
    """What `fastalex train` builds before its first step. `model(training) -> nn.Module`, when
    given, wraps the model the step calls (profile_step labels its forward)."""
    from fastalex.auto import loader_for
    from fastalex.loaders import build_loader
    from fastalex.runtime import resolve_runtime
    from fastalex.shards import read_manifest
    from fastalex.step import build_training, make_train_step

    runtime = resolve_runtime(cfg)
    manifest = read_manifest(Path(cfg.shards))
    class_count = manifest.num_classes
    cfg = dataclasses.replace(cfg, loader=loader_for(cfg, runtime.placement, manifest))
    loader = build_loader(cfg, "train", runtime.placement)
    training = build_training(cfg, class_count, runtime, len(loader))
    stepped = training.model if model is None else model(training)
    step = make_train_step(stepped, training.optimizer, training.scaler, cfg, runtime)
    return Trainer(cfg, runtime, loader, training, step, class_count)


class Tool(OneLineErrors, click.Command):
    """A tool's command: a UserError ends it with one line on stderr and exit status 2."""
