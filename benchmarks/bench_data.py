"""The data and configs the benchmark rows run on: a given pack (and its source tree), or a
synthetic stand-in made and packed in a temporary directory; and each row's TrainConfig.

Owns `Data` (what the rows read), `prepare_data`, `unpack_shards` (a pack written back out as a
Tiny-ImageNet-layout tree, for the reference rows) and `base_config`. Imports fastalex's config,
pack and shard code, and harness.Skip; no timing and no row (the bench_*.py group modules).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from harness import Skip

from fastalex.config import RECIPES, PackConfig, TrainConfig, default_workers

# Stand-in data when no --data is given: 200 classes as Tiny ImageNet, fewer images per class.
STANDIN = dict(classes=200, train_per_class=64, val_per_class=8)
QUICK_STANDIN = dict(classes=2, train_per_class=16, val_per_class=4)


@dataclasses.dataclass
class Data:
    shards: Path | None = None  # a finished pack, for the fastalex loaders
    tree: Path | None = None  # a Tiny-ImageNet-layout directory, for the reference rows
    source: Path | None = None  # what the pack row packs: the tree, or the official zip as given
    description: str = ""
    problem: str | None = None  # why there is no data (rows that need it are skipped with this)
    scratch: Path | None = None  # this run's temporary directory (derived files of a stand-in)


def need(data: Data, what: str) -> Path:
    """data.<what>, or a Skip saying why the row has none."""
    path = getattr(data, what)
    if path is None:
        raise Skip(data.problem or f"no {what} given")
    return path


def extract_zip(ref, out: Path) -> Path:
    """The train/ and val/ files of a Tiny ImageNet zip, extracted to `out` (the reference reads
    files from a directory, as torchvision's ImageFolder does)."""
    import zipfile

    with zipfile.ZipFile(ref.path) as archive:
        wanted = (ref.root + "train/", ref.root + "val/", ref.root + "wnids.txt")
        members = [n for n in archive.namelist() if n.startswith(wanted)]
        archive.extractall(out, members)
    return out / ref.root


def unpack_shards(shards: Path, out: Path) -> Path:
    """Write the pack back out as a Tiny-ImageNet-layout tree (the reference reads files)."""
    from fastalex.shards import iter_shard, read_index, read_manifest

    manifest = read_manifest(shards)
    wnids = [wnid for wnid, _ in manifest.classes]
    (out / "val" / "images").mkdir(parents=True)
    (out / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (out / "words.txt").write_text("".join(f"{w}\t{words}\n" for w, words in manifest.classes))
    for wnid in wnids:
        (out / "train" / wnid / "images").mkdir(parents=True)
    annotations = []
    for split, info in manifest.splits.items():
        for shard in info.shards:
            index = read_index(shards / shard.index_name)
            for key, (data, label) in zip(index.names, iter_shard(shards / shard.name, index)):
                if split == "train":
                    (out / "train" / wnids[label] / "images" / f"{key}.JPEG").write_bytes(data)
                else:
                    (out / "val" / "images" / f"{key}.JPEG").write_bytes(data)
                    annotations.append(f"{key}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
    (out / "val" / "val_annotations.txt").write_text("".join(annotations))
    return out


def prepare_data(args, workdir: Path) -> Data:
    """--data (and --tree), or a synthetic stand-in written and packed under `workdir`."""
    from fastalex.sources.tinyimagenet import open_source

    if args.data:
        data = Data(shards=Path(args.data), description=f"pack {args.data}", scratch=workdir)
        if args.tree:
            ref = open_source(args.tree)
            data.source = Path(args.tree)
            data.description += f"; source {args.tree}"
            if ref.is_zip:
                print(f"extracting {args.tree} for the reference rows", file=sys.stderr, flush=True)
                data.tree = extract_zip(ref, workdir / "tree")
            else:
                data.tree = Path(ref.path) / ref.root
        else:
            print(
                f"unpacking {args.data} into a temporary tree for the reference and pack rows",
                file=sys.stderr,
            )
            data.tree = data.source = unpack_shards(data.shards, workdir / "tree")
            data.description += " (unpacked to a tree for the reference and pack rows)"
        return data
    from fastalex.synth import synth

    counts = QUICK_STANDIN if args.quick else STANDIN
    description = (
        f"SYNTHETIC stand-in (not Tiny ImageNet): {counts['classes']} classes x "
        f"{counts['train_per_class']} train + {counts['val_per_class']} val 64x64 JPEGs"
    )
    print(f"no --data: writing a {description} in {workdir}", file=sys.stderr, flush=True)
    data = Data(
        tree=workdir / "tree", source=workdir / "tree", description=description, scratch=workdir
    )
    synth(data.tree, seed=0, workers=default_workers(), progress=False, **counts)
    try:
        from fastalex.pack import pack

        shards = workdir / "shards"
        pack(
            open_source(data.tree),
            shards,
            PackConfig(shard_size=16 if args.quick else 5000),
            progress=False,
        )
        data.shards = shards
    except ImportError as e:
        data.problem = f"cannot pack the stand-in ({e})"
    return data


def arch_for(image_size: int) -> str:
    """The paper layout for upsampled input (227 px, as the blog), the 64 px layout for native-size
    input (model.py); 128 px, twice Tiny ImageNet's size, splits the two."""
    return "alexnet" if image_size >= 128 else "alexnet64"


def base_config(args, data: Data, size: int, recipe: str = "fast", **fields) -> TrainConfig:
    """The recipe's config at this image size on this device, with `fields` replaced."""
    return dataclasses.replace(
        RECIPES[recipe],
        shards=str(data.shards or ""),
        image_size=size,
        arch=arch_for(size),
        device=args.device,
        **fields,
    )
