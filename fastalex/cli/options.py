"""What every fastalex command shares: one clean line for a UserError, the click options
generated from a config dataclass's fields (name, type, default, help), so the CLI cannot drift
from the config, and the SHARDS argument (a directory or a URL). tools/ builds its commands from
these too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing
from pathlib import Path

import click

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
