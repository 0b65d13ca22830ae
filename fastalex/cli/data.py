"""The data commands: `synth` (a stand-in tree), `pack` (a source into verified shards) and
`verify` (a pack against its manifest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fastalex import config
from fastalex.cli.options import build, config_options, shards_argument
from fastalex.config import PackConfig
from fastalex.errors import UserError


@click.command()
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


@click.command()
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


@click.command()
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
