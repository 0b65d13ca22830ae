"""loaders/cpu.py: the shared-memory ring (sized to fit, named for the run, unlinked on close), the
decode workers (stopped on close, a killed one named) and GPU batches kept until read."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import CPU, make, run_epoch

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, build_loader


def test_the_shared_memory_ring_shrinks_to_fit_or_names_the_fix(coded_pack, monkeypatch):
    from fastalex.loaders import cpu

    monkeypatch.setattr("fastalex.loaders.contract.default_workers", lambda: 8)
    # a batch of 10 images cropped to 32 px in the workers: the CPU device's ring holds those
    batch_bytes = 10 * 32 * 32 * 3
    # room for (prefetch 2 * 3 workers + 2) = 8 slots of each of 2 ranks' train rings
    monkeypatch.setattr(
        cpu, "free_shared_memory", lambda: int(8 * batch_bytes * 2 * 2 / cpu.SHM_HEADROOM) + 1
    )
    two_ranks = Placement(CPU, 0, 2, local_world_size=2)
    cfg = TrainConfig(
        shards=str(coded_pack.path), loader="cpu", batch_size=20, decode="processes", image_size=32
    )
    assert cpu.fit_ring(cfg, two_ranks, batch_bytes, train=True) == 3  # 4 would not fit
    loader = build_loader(cfg, "train", two_ranks)
    assert loader._loader.num_workers == 3
    loader.close()
    monkeypatch.setattr(cpu, "free_shared_memory", lambda: 64 << 10)
    with pytest.raises(UserError, match=r"shared-memory ring needs .*--shm-size"):
        cpu.fit_ring(cfg, two_ranks, batch_bytes, train=True)
    explicit = TrainConfig(
        shards=str(coded_pack.path),
        loader="cpu",
        batch_size=10,
        loader_workers=8,
        decode="processes",
    )
    with pytest.raises(UserError, match="--loader-workers"):  # an explicit count is not shrunk
        build_loader(explicit, "train", Placement(CPU))
    monkeypatch.setattr(cpu, "AUTO_DECODE", "processes")
    auto = build_loader(dataclasses.replace(explicit, decode="auto"), "train", Placement(CPU))
    assert auto.decode == "threads" and "no room for processes" in auto.summary
    auto.close()


class FakeEvent:
    """A CUDA event stand-in: done once `finish` is called; synchronize finishes it."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


@pytest.mark.dali
def test_gpu_batches_are_kept_until_the_work_that_reads_them_has_run():
    pytest.importorskip("nvidia.dali")
    from fastalex.loaders.dali import HELD_MAX, KeepUntilDone

    events = []

    def new_event():
        events.append(FakeEvent())
        return events[-1]

    kept = KeepUntilDone(new_event)
    kept.keep("batch 0")
    kept.keep("batch 1")
    assert [outputs for _, outputs in kept.held] == ["batch 0", "batch 1"]  # still being read
    events[0].done = True
    kept.keep("batch 2")
    assert [outputs for _, outputs in kept.held] == ["batch 1", "batch 2"]  # 0 let go, no wait
    for number in range(3, 3 + HELD_MAX):
        kept.keep(f"batch {number}")
    assert len(kept.held) == HELD_MAX and events[1].done  # waited for the oldest only
    assert not any(event.done for event in events[2 + 1 :])
    kept.release_all()
    assert not kept.held and all(event.done for event in events)
    nothing = KeepUntilDone(None)  # the CPU: batches are read synchronously
    nothing.keep("batch")
    assert not nothing.held


def test_close_stops_the_decode_workers(coded_pack):
    """CpuLoader.close stops its persistent workers at once (through the DataLoader iterator's
    private _shutdown_workers: this pins that it still does)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    loader = make(coded_pack.path, "cpu", "val", batch_size=32, decode="processes")
    run_epoch(loader, coded_pack)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1 and all(worker.is_alive() for worker in workers)
    still_referenced = loader._loader  # so garbage collection cannot be what stops them
    loader.close()
    assert not any(worker.is_alive() for worker in workers)
    del still_referenced


def test_the_ring_is_named_for_the_run_and_unlinked_on_close(coded_pack, tmp_path):
    from fastalex.loaders.shm import owner_part

    loader = make(
        coded_pack.path,
        "cpu",
        "val",
        batch_size=32,
        out=str(tmp_path / "my run"),
        decode="processes",
    )
    path = loader.ring.path
    assert path.name.startswith(owner_part("my_run") + "-") and path.exists()
    run_epoch(loader, coded_pack)
    loader.close()
    assert not path.exists()


def test_a_killed_decode_worker_ends_the_pass_naming_it_and_memory(coded_pack):
    import multiprocessing
    import os
    import signal

    from fastalex.loaders.cpu import DecodeWorkerDied

    before = set(multiprocessing.active_children())
    loader = make(coded_pack.path, "cpu", "train", batch_size=20, decode="processes")
    batches = iter(loader)
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(DecodeWorkerDied, match=rf"pid.*{worker.pid}.*memory"):
        for _ in batches:
            pass
    loader.close()


@pytest.mark.parametrize(
    ("pack", "image_size"), [("synth_pack", 64), ("synth_pack", 150), ("mixed_pack", 64)]
)
def test_the_workers_crop_the_drawn_boxes_within_a_grey_level_of_the_torch_resize(
    request, pack, image_size
):
    """On the CPU device the decode workers crop (OpenCV, Pillow where a box downscales): a train
    batch is the global step's boxes and flips applied to the decoded images by `resample` (the
    torch path CUDA runs), within one grey level; only the outermost pixels of a downscaled box
    at its image's edge may differ more (mixed_pack's large photo; docs/loaders.md)."""
    from pathlib import Path

    from fastalex.loaders.augment import resample
    from fastalex.loaders.base import epoch_order, step_generator
    from fastalex.loaders.decode import SampleTable, ShardDecoder
    from fastalex.shards import read_manifest

    path = Path(request.getfixturevalue(pack))
    loader = make(path, "cpu", "train", batch_size=16, image_size=image_size, seed=5)
    images, labels = next(iter(loader))
    loader.close()
    table = SampleTable(path, read_manifest(path), "train", image_size)
    ids = epoch_order(5, 0, len(table.labels))[:16].numpy()
    canvas = np.zeros((16, *table.canvas_px, 3), np.uint8)
    sizes = torch.from_numpy(ShardDecoder(table).decode_into(canvas, ids))
    boxes, flips = loader.augment.draw(sizes[:, 0], sizes[:, 1], step_generator(5, 0, 0))
    expected = resample(torch.from_numpy(canvas), boxes, flips, image_size, sizes)
    assert torch.equal(labels, table.labels[ids])
    gap = (images.int() - expected.int()).abs()
    assert gap[:, :, 1:-1, 1:-1].max() <= 1
    assert (gap > 1).float().mean() < 0.01
    if pack == "synth_pack":  # every box upsamples: the whole crop within one grey level
        assert gap.max() <= 1
