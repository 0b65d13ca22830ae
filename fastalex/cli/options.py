"""What every fastalex command shares: one clean line for a UserError, and the click options
generated from a config dataclass's fields (name, type, default, help), so the CLI cannot drift
from the config. tools/ builds its commands from these too.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

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
