"""Shared fixtures: small synthetic Tiny-ImageNet trees and packs, written once per session."""

from __future__ import annotations

import pytest

from fastalex.config import PackConfig
from fastalex.pack import pack
from fastalex.tinyimagenet import open_source, synth

# Small enough that the whole suite stays fast on 2 cores, big enough for several shards per split.
TREE = dict(classes=6, train_per_class=40, val_per_class=10, test_images=5, seed=0)


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory):
    """A 6-class synthetic tree: 240 train, 60 val, 5 test images."""
    root = tmp_path_factory.mktemp("tree") / "tiny-imagenet-200"
    synth(root, workers=2, progress=False, **TREE)
    return root


@pytest.fixture(scope="session")
def synth_pack(synth_tree, tmp_path_factory):
    """The synth tree packed with 64 samples per shard (4 train shards, 1 val shard)."""
    out = tmp_path_factory.mktemp("pack") / "shards"
    pack(open_source(synth_tree), out, PackConfig(shard_size=64, workers=2), progress=False)
    return out


@pytest.fixture(scope="session")
def learnable_pack(tmp_path_factory):
    """A 4-class pack big enough for a few epochs of training to beat chance clearly."""
    root = tmp_path_factory.mktemp("learn") / "tree"
    synth(root, classes=4, train_per_class=128, val_per_class=32, seed=1, workers=2, progress=False)
    out = tmp_path_factory.mktemp("learnpack") / "shards"
    pack(open_source(root), out, PackConfig(shard_size=128, workers=2), progress=False)
    return out
