"""What `pack` reads: one contract (base.py: `SourceRef`, `Layout`, `Reader`, `SourceKind`) and one
detector list, `SOURCES`, tried in order: the first layout whose `find_root` claims SRC reads it.

`detect_source(path)` -> SourceRef; `read_layout(ref, val_fraction, seed)` -> Layout and
`open_reader(ref)` -> Reader dispatch on `ref.layout` through the same list. A new layout is one
module that defines a `SourceKind` and one entry here; pack.py names no layout. Order matters:
parquet first (a snapshot may hold a train/ directory), then Tiny ImageNet (its train/<wnid>/ would
pass for an ImageFolder tree), then ImageFolder. Imports the layout modules; never pack, torch or
DALI. The layouts as users see them: docs/data.md.
"""

from __future__ import annotations

import os

from fastalex.errors import UserError
from fastalex.sources import imagefolder, parquet, tinyimagenet
from fastalex.sources.base import Layout, Reader, SourceKind, SourceRef
from fastalex.sources.imagefolder import EXPECTED
from fastalex.sources.tree import check_source_path

__all__ = [
    "SOURCES",
    "Layout",
    "Reader",
    "SourceKind",
    "SourceRef",
    "detect_source",
    "open_reader",
    "read_layout",
]

SOURCES: list[SourceKind] = [parquet.SOURCE, tinyimagenet.SOURCE, imagefolder.SOURCE]


def detect_source(path: str | os.PathLike) -> SourceRef:
    """The layout at `path` (a directory or a zip), by the first entry of `SOURCES` that finds its
    root there; an unrecognised path is a UserError naming the layouts pack reads."""
    path = check_source_path(path)
    for kind in SOURCES:
        root = kind.find_root(path)
        if root is not None:
            return SourceRef(path, root, kind.layout)
    raise UserError(
        f"{path}: not a source tree pack reads: {EXPECTED}, or a Hugging Face parquet "
        "snapshot (*.parquet files with image and label columns)"
    )


def kind_of(ref: SourceRef) -> SourceKind:
    for kind in SOURCES:
        if kind.layout == ref.layout:
            return kind
    raise ValueError(f"no entry of fastalex.sources.SOURCES reads layout {ref.layout!r}")


def read_layout(ref: SourceRef, val_fraction: float = 0.0, seed: int = 0) -> Layout:
    """Classes and labelled train and val items of `ref`; `val_fraction` of each class of train is
    held out as val (seeded) where the layout has no val split of its own."""
    return kind_of(ref).read_layout(ref, val_fraction, seed)


def open_reader(ref: SourceRef) -> Reader:
    return kind_of(ref).open_reader(ref)
