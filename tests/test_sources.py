"""The detector list: its order decides between layouts that look alike, an unrecognised path is one
UserError naming the layouts, and a new layout is one SourceKind in the list: pack.py packs it
unchanged."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("simplejpeg", reason="fastalex pack needs simplejpeg")

from fastalex import sources
from fastalex.config import PackConfig
from fastalex.errors import UserError
from fastalex.images import Rejected
from fastalex.pack import pack, verify_pack
from fastalex.shards import iter_shard, read_index, read_manifest
from fastalex.sources import Layout, SourceKind, SourceRef, detect_source
from fastalex.synth import encode_jpeg, render_image

TOY_CLASSES = ("disc", "square")
TOY_BAD = "item 3"  # the toy's one item without an image


def toy_find_root(path: str) -> str | None:
    return "" if os.path.isfile(os.path.join(path, "toy.txt")) else None


def toy_read_layout(ref: SourceRef, val_fraction: float, seed: int) -> Layout:
    """toy.txt holds the item count; the last 4 items are val, label = item number % 2."""
    with open(os.path.join(ref.path, "toy.txt")) as f:
        items = [(f"item {i}", i % 2) for i in range(int(f.read()))]
    classes = tuple((name, "") for name in TOY_CLASSES)
    return Layout(classes, tuple(items[:-4]), tuple(items[-4:]), test_images=0)


class ToyReader:
    """Images drawn on demand: a layout with no files to read at all."""

    def __init__(self, ref: SourceRef):
        self.ref = ref

    def unit(self, item: str) -> str:
        return item

    def prefetch(self, items) -> None:
        pass

    def size(self, item: str) -> int:
        return len(self.read(item))

    def read(self, item: str) -> bytes:
        if item == TOY_BAD:
            raise Rejected("drawn without an image")
        number = int(item.split()[1])
        return encode_jpeg(render_image(number % 2, np.random.default_rng(number))[0], False)

    def close(self) -> None:
        pass


def test_a_new_layout_is_one_source_kind_in_the_list_and_pack_packs_it(monkeypatch, tmp_path):
    src = tmp_path / "toy"
    src.mkdir()
    (src / "toy.txt").write_text("12\n")
    toy = SourceKind("toy", toy_find_root, toy_read_layout, ToyReader)
    monkeypatch.setattr(sources, "SOURCES", [toy, *sources.SOURCES])
    ref = detect_source(src)
    assert ref == SourceRef(str(src), "", "toy")
    # the pack's worker processes (forked) open their readers through the same list
    manifest, wrote = pack(ref, tmp_path / "shards", PackConfig(shard_size=3, workers=2), False)
    assert wrote and manifest.source["layout"] == "toy"
    assert [name for name, _ in manifest.classes] == list(TOY_CLASSES)
    assert (manifest.splits["train"].samples, manifest.splits["val"].samples) == (7, 4)
    assert manifest.rejected == ({"path": TOY_BAD, "reason": "drawn without an image"},)
    reader = ToyReader(ref)
    expected = {(reader.read(f"item {i}"), i % 2) for i in range(12) if f"item {i}" != TOY_BAD}
    out = tmp_path / "shards"
    stored = {
        sample
        for split in ("train", "val")
        for shard in read_manifest(out).splits[split].shards
        for sample in iter_shard(out / shard.name, read_index(out / shard.index_name))
    }
    assert stored == expected  # every JPEG byte for byte, with its label
    assert verify_pack(out) == []
    with pytest.raises(ValueError, match="'gone'"):
        sources.read_layout(SourceRef(str(src), "", "gone"))


def test_the_list_tries_parquet_then_tiny_imagenet_then_imagefolder(synth_tree, tmp_path):
    assert [kind.layout for kind in sources.SOURCES] == ["parquet", "tiny-imagenet", "imagefolder"]
    # Tiny ImageNet's train/<wnid>/ would pass for an ImageFolder tree: Tiny ImageNet is tried first
    assert detect_source(synth_tree) == SourceRef(str(synth_tree), "", "tiny-imagenet")
    # the Hub converter's default/train/0000.parquet: one subdirectory holding train/; parquet first
    snapshot = tmp_path / "snapshot"
    (snapshot / "default" / "train").mkdir(parents=True)
    (snapshot / "default" / "train" / "0000.parquet").write_bytes(b"")
    assert detect_source(snapshot) == SourceRef(str(snapshot), "", "parquet")


def test_an_unrecognised_path_is_one_user_error_naming_every_layout(tmp_path):
    with pytest.raises(UserError) as error:
        detect_source(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: not a source tree pack reads: expected Tiny ImageNet (wnids.txt, "
        "train/<wnid>/images/, val/val_annotations.txt) or ImageFolder (train/<class>/<images>, "
        "val/<class>/<images>), or a Hugging Face parquet snapshot (*.parquet files with image and "
        "label columns)"
    )
