"""synth writes the exact Tiny ImageNet layout, the same bytes for a seed whatever the workers,
images a CNN can learn, and never into a directory that holds something."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastalex.errors import UserError
from fastalex.synth import synth


def test_synth_writes_the_tiny_imagenet_layout(synth_tree):
    wnids = (synth_tree / "wnids.txt").read_text().split()
    assert len(wnids) == 6
    words = dict(line.split("\t") for line in (synth_tree / "words.txt").read_text().splitlines())
    assert set(words) == set(wnids)
    for wnid in wnids:
        images = sorted((synth_tree / "train" / wnid / "images").iterdir())
        assert [p.name for p in images] == sorted(f"{wnid}_{i}.JPEG" for i in range(40))
        boxes = (synth_tree / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines()
        assert len(boxes) == 40 and all(len(b.split("\t")) == 5 for b in boxes)
    annotations = (synth_tree / "val" / "val_annotations.txt").read_text().splitlines()
    assert len(annotations) == 60
    for line in annotations:
        fields = line.split("\t")
        assert len(fields) == 6 and fields[1] in wnids
        assert (synth_tree / "val" / "images" / fields[0]).is_file()
    assert len(list((synth_tree / "test" / "images").iterdir())) == 5
    with Image.open(synth_tree / "val" / "images" / "val_0.JPEG") as image:
        assert image.format == "JPEG" and image.size == (64, 64)


def test_synth_is_deterministic_for_a_seed_whatever_the_workers(tmp_path):
    for name, seed, workers in (("a", 7, 1), ("b", 7, 2), ("c", 8, 1)):
        synth(
            tmp_path / name,
            classes=3,
            train_per_class=5,
            val_per_class=2,
            seed=seed,
            workers=workers,
            progress=False,
        )

    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_synth_images_are_structured_with_about_one_percent_grayscale(tmp_path):
    synth(
        tmp_path / "t", classes=2, train_per_class=1000, val_per_class=1, workers=2, progress=False
    )
    gray = 0
    for path in (tmp_path / "t" / "train").rglob("*.JPEG"):
        with Image.open(path) as image:
            gray += image.mode == "L"
    assert 5 <= gray <= 40  # 1 % of 2000 = 20; binomial 99.9 % interval is about 7..36
    pixels = np.asarray(Image.open(tmp_path / "t/train/n90000000/images/n90000000_0.JPEG"), float)
    assert pixels.std() > 20  # not a solid colour
    # Not pure noise: neighbouring pixels are strongly correlated.
    luma = pixels.mean(axis=2)
    assert np.corrcoef(luma[:, :-1].ravel(), luma[:, 1:].ravel())[0, 1] > 0.7


def test_synth_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        synth(tmp_path, classes=1, train_per_class=1, val_per_class=1, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"
