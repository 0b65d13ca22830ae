"""The Hugging Face parquet layout: a local snapshot of an image-classification dataset
(``data/train-*.parquet``, ``data/valid-*.parquet``, or the Hub converter's
``default/train/0000.parquet``), read with pyarrow; `snapshot_hub` fetches ``hf://OWNER/NAME`` (or
one config of it, ``hf://OWNER/NAME/CONFIG``).

Columns: ``image`` (a struct of ``bytes`` and ``path``, or plain binary), ``label`` (ClassLabel ids,
kept as the dataset numbers them). A file's split is the first directory or file-name prefix naming
one (train; valid/validation/val; test: counted, not packed); its config, the directories above
that (``data``, ``default``, ``<config>``): a snapshot of several configs is refused unless one is
chosen (`with_config`, a root below the snapshot). Class names: the schema's metadata, else a
``dataset_infos.json`` (the config's entry), else the ids. Items are ``"<file> row <n>"``; a read
unit is a row group, read once. Imports errors, images, base.py; pyarrow when it reads. Reasons:
docs/data.md.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections import defaultdict

from fastalex.errors import UserError
from fastalex.images import Rejected
from fastalex.sources.base import Layout, SourceKind, SourceRef, hold_out

SPLIT_NAMES = {"train": "train", "valid": "val", "validation": "val", "val": "val", "test": "test"}
SPLIT_WORD = re.compile(r"^(train|valid|validation|val|test)(?=$|[-_.])")
ROW = " row "  # "<file> row <n>": an item of this layout
INFO_FILES = ("dataset_infos.json", "dataset_info.json")
HUB_PREFIX = "hf://"
HUB_PATTERNS = ["*.parquet", "*.json", "*.md"]  # a snapshot needs nothing else
HUB_INFO = ["*.md", "dataset_info*.json"]  # beside one config's files: the card and class names


def find_root(path: str) -> str | None:
    """Root "" when directory `path` holds *.parquet files at any depth (a zip never does)."""
    return "" if find_parquet_files(path) else None


def find_parquet_files(path: str) -> list[str]:
    """'/'-separated paths below directory `path` of its *.parquet files, sorted; [] if none."""
    if not os.path.isdir(path):
        return []
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        below = os.path.relpath(folder, path).replace(os.sep, "/")
        prefix = "" if below == "." else below + "/"
        found += [prefix + f for f in files if f.endswith(".parquet") and not f.startswith(".")]
    return sorted(found)


def split_of(rel: str) -> str | None:
    """train / val / test from a file's directories or name (module docstring), or None."""
    return _split_and_config(rel)[0]


def _split_and_config(rel: str) -> tuple[str | None, str]:
    """(split, config) of a file: the config is the directories above the part naming the split
    ("" at the top of the snapshot)."""
    parts = rel.split("/")
    for depth, part in enumerate(parts):
        match = SPLIT_WORD.match(part.lower())
        if match:
            return SPLIT_NAMES[match.group(1)], "/".join(parts[:depth])
    return None, ""


def find_configs(top: str) -> list[str]:
    """The configs of a snapshot directory, sorted: the directories holding its split files."""
    return sorted(
        {config for split, config in map(_split_and_config, find_parquet_files(top)) if split}
    )


def config_label(config: str) -> str:
    return config or "(top level)"


def with_config(ref: SourceRef, name: str) -> SourceRef:
    """`ref` narrowed to one config of its snapshot: `name` is a config's directory or its last
    component (``default`` for ``default/``, ``cifar10`` for ``data/cifar10/``)."""
    top = os.path.join(ref.path, ref.root)
    configs = find_configs(top)
    found = [c for c in configs if name.strip("/") in (c, c.rsplit("/", 1)[-1])]
    if len(found) != 1:
        raise UserError(
            f"{ref.path}: no config {name!r}; it holds {', '.join(map(config_label, configs))}"
        )
    return SourceRef(ref.path, ref.root + found[0] + "/" if found[0] else ref.root, ref.layout)


def snapshot_hub(name: str, cache_dir: str, config: str | None = None) -> tuple[str, str | None]:
    """A local snapshot of dataset ``hf://OWNER/NAME`` via huggingface_hub, and the config asked
    for (``hf://OWNER/NAME/CONFIG`` or `config`; None without). Without one, a dataset of several
    configs is refused before any download, naming them; with one, only that config's files are
    fetched."""
    owner, _, rest = name[len(HUB_PREFIX) :].strip("/").partition("/")
    repo_name, _, named = rest.partition("/")
    repo = f"{owner}/{repo_name}"
    if not owner or not repo_name:
        raise UserError(f"{name}: expected hf://OWNER/NAME or hf://OWNER/NAME/CONFIG")
    if named and config and named != config:
        raise UserError(f"{name}: names config {named!r}; drop --config {config}")
    config = named or config
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise UserError(
            f"{name}: fetching from the Hub needs huggingface_hub: pip install huggingface_hub "
            "(or download the dataset's parquet files and pack that directory)"
        ) from None
    try:
        if config:
            patterns = [f"{config}/*.parquet", f"*/{config}/*.parquet", *HUB_INFO]
        else:
            files = list_repo_files(repo, repo_type="dataset")
            configs = sorted(
                {_split_and_config(f)[1] for f in files if f.endswith(".parquet") and split_of(f)}
            )
            if len(configs) > 1:
                listed = ", ".join(f"hf://{repo}/{c}" for c in configs)
                raise UserError(f"{name}: holds {len(configs)} configs; pack one: {listed}")
            patterns = HUB_PATTERNS
        path = snapshot_download(
            repo, repo_type="dataset", allow_patterns=patterns, cache_dir=cache_dir
        )
    except UserError:
        raise
    except Exception as e:  # the hub raises many kinds (network, auth, missing repo)
        raise UserError(f"{name}: cannot fetch from the Hub: {e}") from None
    return path, config or None


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


def read_layout(ref: SourceRef, val_fraction: float = 0.0, seed: int = 0) -> Layout:
    """The Layout of a parquet snapshot; without a val split, `val_fraction` of each class of
    train is held out (seeded, as for an ImageFolder tree)."""
    pq = _pq()
    top = os.path.join(ref.path, ref.root)
    by_split: dict[str, list[str]] = defaultdict(list)
    unknown = []
    configs = find_configs(top)
    if len(configs) > 1:
        raise UserError(
            f"{ref.path}: holds {len(configs)} configs ({', '.join(map(config_label, configs))}); "
            "pack one: --config NAME, or give its directory"
        )
    for rel in find_parquet_files(top):
        split = split_of(rel)
        (by_split[split] if split else unknown).append(rel)
    if not by_split["train"]:
        raise UserError(f"{ref.path}: no train parquet files (train-*.parquet or train/*.parquet)")
    names = None
    items: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    unlabelled = defaultdict(int)
    for split in ("train", "val", "test"):
        for rel in by_split[split]:
            file = pq.ParquetFile(os.path.join(top, rel))
            columns = file.schema_arrow.names
            if "image" not in columns:
                raise UserError(f"{ref.path}: {rel} has no 'image' column (columns: {columns})")
            names = names or _schema_names(file.schema_arrow.metadata)
            if split == "test" or "label" not in columns:
                unlabelled[split] += file.metadata.num_rows
                continue
            labels = file.read(columns=["label"]).column("label").to_pylist()
            for row, label in enumerate(labels):
                if label is None or label < 0:  # the Hub's "no label"
                    unlabelled[split] += 1
                else:
                    items[split].append((f"{rel}{ROW}{row}", int(label)))
    config = (ref.root + (configs[0] if configs else "")).strip("/").rsplit("/", 1)[-1]
    names = names or _info_names(ref.path, os.path.join(top, by_split["train"][0]), config)
    seen = max((label for split in items.values() for _, label in split), default=-1) + 1
    if names is not None and seen > len(names):
        raise UserError(f"{ref.path}: label {seen - 1} but the metadata names {len(names)} classes")
    names = names or [str(i) for i in range(seen)]
    if not items["train"]:
        raise UserError(f"{ref.path}: the train parquet files hold no labelled rows")
    if items["val"] and val_fraction:
        raise UserError(f"{ref.path}: has a valid/validation split already; drop --val-fraction")
    if not items["val"]:
        if not val_fraction:
            raise UserError(
                f"{ref.path}: no valid/validation/val parquet files: hold out part of train with "
                "--val-fraction (e.g. 0.1)"
            )
        items["train"], items["val"] = _hold_out(items["train"], val_fraction, seed)
    skipped = [f"{rel}: not a train/valid/test file, not packed" for rel in unknown]
    skipped += [
        f"{split}: {count} rows without a label, not packed"
        for split, count in unlabelled.items()
        if split != "test" and count
    ]
    return Layout(
        classes=tuple((name, "") for name in names),
        train=tuple(items["train"]),
        val=tuple(items["val"]),
        test_images=unlabelled["test"],
        skipped=tuple(skipped),
    )


def _hold_out(train, val_fraction: float, seed: int):
    """base.hold_out over the rows of each label: (train items, val items)."""
    files = defaultdict(list)
    for rel, label in train:
        files[f"{label:09d}"].append(rel)  # zero-padded: hold_out seeds by sorted position
    kept, held = hold_out(files, val_fraction, seed)
    return tuple(
        tuple((rel, int(key)) for key in sorted(part) for rel in part[key]) for part in (kept, held)
    )


def _schema_names(metadata: dict | None) -> list[str] | None:
    """ClassLabel names of column `label` from the schema's b"huggingface" metadata."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    return _label_names(features)


def _info_names(base: str, first: str, config: str) -> list[str] | None:
    """ClassLabel names from a dataset_infos.json in the folder of `first` (the first train file)
    or above it, up to the snapshot `base`; of the entry of `config` where it has several."""
    folder = os.path.dirname(first)
    while True:
        for name in INFO_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        infos = json.load(f)
                except ValueError as e:
                    raise UserError(f"{path}: not JSON ({e})") from None
                # dataset_infos.json: {config: {"features": ...}}; dataset_info.json: {"features"}
                entries = [infos, *infos.values()] if isinstance(infos, dict) else []
                if isinstance(infos, dict) and isinstance(infos.get(config), dict):
                    entries = [infos[config]]
                for info in entries:
                    found = isinstance(info, dict) and _label_names(info.get("features"))
                    if found:
                        return found
        if os.path.abspath(folder) == os.path.abspath(base) or folder == os.path.dirname(folder):
            return None
        folder = os.path.dirname(folder)


def _label_names(features) -> list[str] | None:
    label = features.get("label") if isinstance(features, dict) else None
    names = label.get("names") if isinstance(label, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


class ParquetReader:
    """Image bytes of ``"<file> row <n>"`` items: the Reader of this layout (base.py). A unit is a
    row group: pack hands a worker whole row groups, and `prefetch` reads each one once."""

    def __init__(self, ref: SourceRef):
        self.ref = ref
        self._top = os.path.join(ref.path, ref.root)
        self._bytes: dict[str, bytes | None] = {}
        self._starts: dict[str, list[int]] = {}  # file -> first row of each row group
        # file -> its footer, read once per worker: it can hold each row group's min and max
        # image (pyarrow writes binary statistics of small values), two images a row group
        self._metadata: dict[str, object] = {}

    def close(self) -> None:
        self._bytes.clear()

    def _open(self, file: str):
        path = os.path.join(self._top, file)
        parquet = _pq().ParquetFile(path, metadata=self._metadata.get(file))
        self._metadata[file] = parquet.metadata
        return parquet

    def _group_starts(self, file: str) -> list[int]:
        if file not in self._starts:
            metadata = self._open(file).metadata
            starts, start = [], 0
            for group in range(metadata.num_row_groups):
                starts.append(start)
                start += metadata.row_group(group).num_rows
            self._starts[file] = starts
        return self._starts[file]

    def unit(self, rel: str) -> tuple[str, int]:
        """(file, row group) of the item."""
        file, _, row = rel.rpartition(ROW)
        return file, bisect.bisect_right(self._group_starts(file), int(row)) - 1

    def prefetch(self, rels) -> None:
        """Hold exactly these items' bytes: each row group they fall in read once, image only."""
        wanted: dict[tuple[str, int], list[int]] = defaultdict(list)
        for rel in rels:
            wanted[self.unit(rel)].append(int(rel.rpartition(ROW)[2]))
        self._bytes = {}
        files = {}
        for (file, group), rows in sorted(wanted.items()):
            parquet = files.get(file) or files.setdefault(file, self._open(file))
            start = self._group_starts(file)[group]
            column = parquet.read_row_group(group, columns=["image"]).column("image")
            column = column.combine_chunks()
            if hasattr(column, "field"):  # the Image feature's {bytes, path} struct
                column = column.field("bytes")
            rows = sorted(set(rows))
            picked = column.take([row - start for row in rows]).to_pylist()
            for row, data in zip(rows, picked):
                self._bytes[f"{file}{ROW}{row}"] = data

    def _get(self, rel: str) -> bytes:
        if rel not in self._bytes:
            self.prefetch([rel])
        data = self._bytes[rel]
        if data is None:
            raise Rejected("the row holds no image bytes (an image stored by path only)")
        return data

    def read(self, rel: str) -> bytes:
        return self._get(rel)

    def size(self, rel: str) -> int:
        return len(self._get(rel))


SOURCE = SourceKind("parquet", find_root, read_layout, ParquetReader)
