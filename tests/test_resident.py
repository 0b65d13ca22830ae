"""The resident loader's own behaviour: it refuses, before decoding, a split that will not fit.
(The loader contract, DDP shares and pixel agreement are in test_loaders.py, for every backend.)"""

from __future__ import annotations

import pytest
import torch

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, build_loader
from fastalex.loaders import resident

CPU = torch.device("cpu")


def test_split_over_the_cap_is_refused_naming_the_alternative(synth_pack):
    cfg = TrainConfig(shards=str(synth_pack), loader="resident", batch_size=16, resident_max_gb=1e-6)
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
