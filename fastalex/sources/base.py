"""The source contract: what `pack` needs from any layout, and nothing about any one layout.

A layout is a `SourceKind`: `find_root(path)` says whether a directory or zip holds it (and below
which prefix), `read_layout(ref, val_fraction, seed)` lists its classes and labelled train and val
items (a `Layout`), `open_reader(ref)` opens the `Reader` that gives each item's bytes. An item is
a name relative to the root; its label indexes `Layout.classes`. A `SourceRef` is what crosses to
pack's worker processes; each opens one Reader and reads a shard at a time: `prefetch(items)`, then
`size`/`read` of each. `unit(item)` names what an item is read with (a parquet row group; a file is
its own unit): pack puts each unit whole into one shard, so every unit is read once. A bad item
raises images.Rejected (or its file's I/O error): pack lists it as rejected with the reason.
Imports numpy only; never torch, DALI or pack.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SourceRef:
    """A picklable handle on a source: a directory, or a zip read in place."""

    path: str  # the directory or the zip file
    root: str  # prefix of the layout inside it ("" or "tiny-imagenet-200/"), '/'-separated
    layout: str = "tiny-imagenet"  # which SourceKind reads it (SourceKind.layout)

    @property
    def is_zip(self) -> bool:
        return not os.path.isdir(self.path)


@dataclass(frozen=True)
class Layout:
    classes: tuple[tuple[str, str], ...]  # (wnid or class name, words) in label order
    train: tuple[tuple[str, int], ...]  # (item, label)
    val: tuple[tuple[str, int], ...]
    test_images: int  # unlabelled, not packed
    skipped: tuple[str, ...] = ()  # other files not packed, one line each, for the manifest


class Reader(Protocol):
    """The bytes of a source's items, by item name (a `Layout`'s first field)."""

    def unit(self, item: str) -> Hashable:
        """What the item is read with: items of one unit are read together, in one shard."""

    def prefetch(self, items: Iterable[str]) -> None:
        """Get ready to read exactly these items (one shard's, whole units); a no-op where reads
        are cheap."""

    def size(self, item: str) -> int:
        """Stored bytes of the item, known before it is read (pack rejects an oversized one)."""

    def read(self, item: str) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceKind:
    """One layout pack reads: an entry of the detector list, `fastalex.sources.SOURCES`."""

    layout: str  # SourceRef.layout, recorded in the manifest as source.layout
    find_root: Callable[[str], str | None]  # path (a checked dir or zip) -> root prefix, or None
    read_layout: Callable[[SourceRef, float, int], Layout]  # (ref, val_fraction, seed)
    open_reader: Callable[[SourceRef], Reader]


def hold_out(
    files: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, val): `val_fraction` of each class's files, drawn with a seeded generator per class.
    A class of n >= 2 images gives between 1 and n - 1 of them to val; a class of one keeps it."""
    train, val = {}, {}
    for label, name in enumerate(sorted(files)):
        paths = files[name]
        count = min(len(paths) - 1, max(1, round(len(paths) * val_fraction)))
        held = set(np.random.default_rng([seed, 1, label]).permutation(len(paths))[:count].tolist())
        train[name] = [p for i, p in enumerate(paths) if i not in held]
        val[name] = [p for i, p in enumerate(paths) if i in held]
    return train, val
