"""The ImageFolder layout (torchvision's, timm's, most datasets'), in a directory or a zip read in
place: ``train/<class>/.../<image>`` (images at any depth below the class directory),
``val/<class>/...`` with the same classes (without val/, --val-fraction holds some of train out),
optionally ``classes.txt`` or ``words.txt`` (<class> TAB or space <name>), ``test/`` not packed; at
the top of SRC or in its one subdirectory. Labels index the sorted class names, the same in both
splits; a class in only one split is an error naming it. Images are picked by extension (any case,
`IMAGE_EXTENSIONS`), other files counted in the manifest's ``skipped``; hidden files and
directories (.DS_Store, macOS's ._ files) are ignored. Imports errors, base.py and tree.py.
"""

from __future__ import annotations

import os
from collections import defaultdict

from fastalex.errors import UserError
from fastalex.sources.base import Layout, SourceKind, SourceRef, hold_out
from fastalex.sources.tree import TreeReader, zip_names

# torchvision's IMG_EXTENSIONS plus GIF, JFIF and the formats that get a clear "not supported"
# (HEIC/AVIF from phones) instead of being skipped unseen.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
    ".pgm",
    ".pbm",
    ".heic",
    ".heif",
    ".avif",
)
NAME_FILES = ("classes.txt", "words.txt")  # the first one present gives the human-readable names
EXPECTED = (
    "expected Tiny ImageNet (wnids.txt, train/<wnid>/images/, val/val_annotations.txt) or "
    "ImageFolder (train/<class>/<images>, val/<class>/<images>)"
)


def find_root(path: str) -> str | None:
    """The prefix under which a directory or zip holds train/, or None."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "train")):
            return ""
        subdirs = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
        if len(subdirs) == 1 and os.path.isdir(os.path.join(path, subdirs[0], "train")):
            return subdirs[0] + "/"
        return None
    roots = set()
    for name in zip_names(path):
        parts = name.split("/")
        if len(parts) >= 3 and parts[0] == "train":
            roots.add("")
        elif len(parts) >= 4 and parts[1] == "train" and not parts[0].startswith((".", "__MACOSX")):
            roots.add(parts[0] + "/")
    if "" in roots:
        return ""
    return roots.pop() if len(roots) == 1 else None


def read_layout(ref: SourceRef, val_fraction: float = 0.0, seed: int = 0) -> Layout:
    """Classes and labelled train and val samples of a tree, checked for consistency; without val/,
    `val_fraction` of each class of train is held out as val (seeded)."""
    source = TreeReader(ref)
    try:
        train, skipped = _class_files(source, "train")
        has_val = source.has_dir("val")
        if has_val and val_fraction:
            raise UserError(f"{ref.path}: has a val/ split already; drop --val-fraction")
        if not has_val and not val_fraction:
            raise UserError(
                f"{ref.path}: no {ref.root}val/ split: add val/<class>/ images, or hold out part "
                "of train with --val-fraction (e.g. 0.1)"
            )
        if has_val:
            val, val_skipped = _class_files(source, "val")
            skipped += val_skipped
            for name, here, there in (("train", train, val), ("val", val, train)):
                missing = sorted(set(here) - set(there))
                if missing:
                    other = "val" if name == "train" else "train"
                    more = f" (and {len(missing) - 1} more classes)" if len(missing) > 1 else ""
                    raise UserError(
                        f"{ref.path}: class {missing[0]!r} has images in {ref.root}{name}/ but "
                        f"none in {ref.root}{other}/{more}; every class needs both"
                    )
        else:
            train, val = hold_out(train, val_fraction, seed)
        classes = sorted(train)
        names = _read_names(source)
        if source.has_dir("test"):
            skipped.append(f"test: {len(source.walk_files('test'))} files, not packed")
    finally:
        source.close()
    label_of = {name: i for i, name in enumerate(classes)}

    def samples(split: str, files: dict[str, list[str]]) -> tuple[tuple[str, int], ...]:
        return tuple((f"{split}/{rel}", label_of[name]) for name in classes for rel in files[name])

    layout = Layout(
        classes=tuple((name, names.get(name, "")) for name in classes),
        train=samples("train", train),
        val=samples("train" if not has_val else "val", val),
        test_images=0,
        skipped=tuple(skipped),
    )
    if not layout.val:
        raise UserError(
            f"{ref.path}: --val-fraction {val_fraction} holds out no image (every class has "
            "one image); give a larger fraction or a val/ tree"
        )
    return layout


def _class_files(source: TreeReader, split: str) -> tuple[dict[str, list[str]], list[str]]:
    """{class: [path below split/]} of the image files of each class, and a `skipped` line for any
    other files."""
    files: dict[str, list[str]] = defaultdict(list)
    others = []
    for rel in source.walk_files(split):
        name, sep, _ = rel.partition("/")
        if sep and rel.lower().endswith(IMAGE_EXTENSIONS):
            files[name].append(rel)
        else:
            others.append(rel)
    ref = source.ref
    if not files:
        raise UserError(
            f"{ref.path}: {ref.root}{split}/ holds no class directories of images ({EXPECTED})"
        )
    empty = sorted({rel.partition("/")[0] for rel in others if "/" in rel} - set(files))
    if empty:
        raise UserError(
            f"{ref.path}: {ref.root}{split}/{empty[0]}/ holds no images "
            f"(by extension: {', '.join(IMAGE_EXTENSIONS)})"
        )
    skipped = []
    if others:
        skipped.append(
            f"{split}: {len(others)} files that are not images by extension, not packed "
            f"(e.g. {split}/{others[0]})"
        )
    return dict(files), skipped


def _read_names(source: TreeReader) -> dict[str, str]:
    for name_file in NAME_FILES:
        if source.exists(name_file):
            text = source.read(name_file).decode("utf-8", errors="replace")
            names = {}
            for line in text.splitlines():
                separator = "\t" if "\t" in line else " "
                key, _, words = line.strip().partition(separator)
                if key.strip():
                    names[key.strip()] = words.strip()
            return names
    return {}


SOURCE = SourceKind("imagefolder", find_root, read_layout, TreeReader)
