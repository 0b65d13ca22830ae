"""The resident loader's own behaviour: on the CPU its epochs are the `cpu` loader's (same order,
crops and flips), and it refuses, before decoding, a split that will not fit. (The loader contract
and DDP shares are in test_loaders.py, for every backend.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip(
    "simplejpeg", reason="the resident loader decodes with the cpu loader's simplejpeg"
)

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, build_loader, resident

CPU = torch.device("cpu")


@pytest.mark.parametrize("world", [1, 3])
def test_resident_epochs_on_the_cpu_are_the_cpu_loaders(coded_pack, world):
    """Same (seed, epoch, rank): the same images in the same order with the same labels, and the
    same crops and flips (pixels equal to float noise), epoch after epoch, for train and val."""
    rank = world - 1
    for split, epochs in (("train", 2), ("val", 1)):
        loaders = {}
        for backend in ("cpu", "resident"):
            cfg = TrainConfig(
                shards=str(coded_pack.path), loader=backend, batch_size=32, seed=5, loader_workers=1
            )
            loaders[backend] = build_loader(cfg, split, Placement(CPU, rank, world), first_epoch=1)
        assert len(loaders["cpu"]) == len(loaders["resident"]) > 0
        for _ in range(epochs):
            batches = 0
            for (images, labels), (resident_images, resident_labels) in zip(*loaders.values()):
                batches += 1
                np.testing.assert_array_equal(
                    coded_pack.decode(resident_images), coded_pack.decode(images)
                )
                assert torch.equal(resident_labels, labels)
                torch.testing.assert_close(resident_images, images, atol=1e-5, rtol=0)
            assert batches == len(loaders["cpu"])
        for loader in loaders.values():
            loader.close()


def test_split_over_the_cap_is_refused_naming_the_alternative(synth_pack):
    cfg = TrainConfig(
        shards=str(synth_pack), loader="resident", batch_size=16, resident_max_gb=1e-6
    )
    with pytest.raises(UserError, match=r"needs 0\.00 GiB, over --resident-max-gb .*--loader dali"):
        build_loader(cfg, "train", Placement(CPU))


def test_split_larger_than_free_memory_is_refused_before_decoding(synth_pack, monkeypatch):
    monkeypatch.setattr(resident, "free_bytes", lambda device: resident.RAM_MARGIN_BYTES + 1000)
    decoded = []
    monkeypatch.setattr(resident, "decode_share", lambda *args: decoded.append(args))
    cfg = TrainConfig(shards=str(synth_pack), loader="resident", batch_size=16)
    with pytest.raises(UserError, match="free .*--loader dali"):
        build_loader(cfg, "train", Placement(CPU))
    assert decoded == []


def test_free_memory_is_read_on_this_machine():
    assert resident.free_bytes(CPU) > 0
