"""The `fastalex` command line: the only package that reads argv or prints for the user.

`main` is the click group (the `fastalex` entry point); its commands live by subject in data.py,
run.py and model.py, built from the config dataclasses by options.py. A UserError anywhere below
ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import click

from fastalex.cli import data, model, run
from fastalex.cli.options import Group, OneLineErrors, config_options

__all__ = ["OneLineErrors", "config_options", "main"]


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


for command in (
    data.synth,
    data.pack,
    data.verify,
    run.train,
    run.doctor,
    model.evaluate,
    model.model_info,
    model.plot,
    model.predict,
    model.export,
):
    main.add_command(command)
