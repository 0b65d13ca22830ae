"""The `fastalex` command line: the only module that reads argv or prints for the user.

Each config option is generated from its dataclass field (name, type, default, and the trailing
comment in config.py as its help), so the CLI cannot drift from the config. A UserError anywhere
below ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

import click

from fastalex import config
from fastalex.config import PackConfig
from fastalex.errors import UserError


class Group(click.Group):
    """Turns a UserError (bad input) or a config ValueError into one clean line and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def field_help(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class's source: the option's help."""
    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    return {m[1]: m[2] for line in inspect.getsource(cls).splitlines() if (m := pattern.match(line))}


def config_options(cls: type, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per dataclass field of `cls` (minus `skip`)."""
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)

    def decorate(function):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            kwargs = dict(default=f.default, show_default=True, help=helps.get(f.name))
            if hint is bool:
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
    from fastalex.tinyimagenet import synth as write_synth

    count = write_synth(
        out, classes, train_per_class, val_per_class, test_images, seed,
        workers or config.default_workers(),
    )
    click.echo(f"wrote {count} SYNTHETIC images (a stand-in, not Tiny ImageNet) to {out}")


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option("--download", is_flag=True, help="Fetch the official zip first (then SRC is not given).")
@click.option("--url", default=None, help="Download from here instead of the official address.")
@click.option("--md5", default=None, help="Expected md5 of the download (default: the official zip's).")
@click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=Path.home() / ".cache" / "fastalex",
    show_default=True, help="Where --download keeps the zip (resumed if partial).",
)
@config_options(PackConfig)
def pack(paths, download, url, md5, cache_dir, **options) -> None:
    """Pack a Tiny ImageNet tree (directory, or the official zip read in place) into shards at OUT.

    Train and val become WebDataset tars with DALI indexes and a manifest (counts, sha256, labels in
    sorted-wnid order, rejected files and why). Every JPEG is fully decoded once first: files that
    do not decode are rejected and listed (or, with --strict, stop the run). Test is unlabelled and
    skipped. A pack killed part-way leaves no manifest; run the same command again.
    """
    from fastalex import tinyimagenet
    from fastalex.pack import pack as run_pack
    from fastalex.pack import summarize

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
                url or tinyimagenet.OFFICIAL_URL, cache_dir,
                md5 or (None if url else tinyimagenet.OFFICIAL_MD5), show,
            )
        out = paths[0]
    elif len(paths) == 2:
        src, out = paths
    else:
        raise UserError("give SRC and OUT: fastalex pack tiny-imagenet-200[.zip] OUT")
    manifest, wrote = run_pack(tinyimagenet.open_source(src), out, cfg)
    click.echo(summarize(manifest))
    done = "packed into" if wrote else "already packed (same source and settings), kept"
    click.echo(f"{done} {out}; check it any time with: fastalex verify {out}")


@main.command()
@click.argument("shards", type=click.Path(path_type=Path))
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
