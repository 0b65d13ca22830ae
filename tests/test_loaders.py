"""The loader contract (fastalex.loaders), checked on every backend: what a batch looks like, which
samples an epoch holds, how ranks share a split, that labels follow their images, that the
backends hand over the same val pixels, that a tampered pack is refused, bounded memory, and
resuming (the global order, skipped samples, another number of processes). Each backend's own
parts: test_cpu.py, test_dali.py, test_decode.py, test_augment.py, test_workers.py."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from helpers import BACKEND_PARAMS, CPU, PACKS, batches_of, make, needs, ramp_crops, run_epoch

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, rank_share, steps_per_epoch
from fastalex.loaders.base import epoch_seed
from fastalex.shards import read_manifest


@pytest.mark.parametrize("backend", [*BACKEND_PARAMS, "cpu-threads"])
def test_batches_follow_the_contract(coded_pack, backend):
    needs(backend)
    train = make(coded_pack.path, backend, "train", batch_size=32)
    assert train.backend == backend.split("-")[0]
    n_train = len(coded_pack.ids["train"])
    assert len(train) == n_train // 32 and train.samples == len(train) * 32
    epochs = [run_epoch(train, coded_pack) for _ in range(2)]
    for ids, batches in epochs:
        assert batches == len(train)
        assert len(ids) == train.samples and len(set(ids)) == len(ids)  # nothing repeated
        assert set(ids) <= set(coded_pack.ids["train"])
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # reshuffled
    train.close()

    val = make(coded_pack.path, backend, "val", batch_size=32)
    n_val = len(coded_pack.ids["val"])
    assert len(val) == math.ceil(n_val / 32) and val.samples == n_val
    for _ in range(2):
        ids, batches = run_epoch(val, coded_pack)
        assert batches == len(val)
        np.testing.assert_array_equal(ids, coded_pack.ids["val"])  # each once, in global order
    val.close()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_same_seed_gives_same_epochs(coded_pack, backend):
    needs(backend)
    orders = []
    for seed in (0, 0, 1):
        loader = make(coded_pack.path, backend, "train", batch_size=40, seed=seed)
        orders.append([run_epoch(loader, coded_pack)[0] for _ in range(2)])
        loader.close()
    for epoch in range(2):
        np.testing.assert_array_equal(orders[0][epoch], orders[1][epoch])
    assert not np.array_equal(orders[0][0], orders[2][0])


def test_cpu_epoch_is_a_function_of_seed_and_epoch(coded_pack):
    fresh = make(coded_pack.path, "cpu", "train", batch_size=40)
    run_epoch(fresh, coded_pack)
    second = run_epoch(fresh, coded_pack)[0]
    resumed = make(coded_pack.path, "cpu", "train", batch_size=40, first_epoch=1)
    np.testing.assert_array_equal(run_epoch(resumed, coded_pack)[0], second)
    fresh.close()
    resumed.close()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ranks_get_disjoint_covering_shares(coded_pack, backend, world):
    needs(backend)
    ids = coded_pack.ids
    val_seen, train_seen, steps = [], [], set()
    for rank in range(world):
        start, stop = rank_share(len(ids["val"]), rank, world)
        val = make(coded_pack.path, backend, "val", rank, world, batch_size=10)
        got, batches = run_epoch(val, coded_pack)
        assert batches == len(val) == math.ceil((stop - start) / 10) and len(got) == val.samples
        np.testing.assert_array_equal(got, ids["val"][start:stop])
        val_seen.append(got)
        val.close()

        train = make(coded_pack.path, backend, "train", rank, world, batch_size=47)
        placement = Placement(CPU, rank, world)
        assert len(train) == steps_per_epoch(len(ids["train"]), 47, placement, True)
        start, stop = rank_share(len(ids["train"]), rank, world)
        for _ in range(2):  # the second epoch must not inherit an unfinished first one
            got, batches = run_epoch(train, coded_pack)
            assert batches == len(train) and len(got) == len(train) * 47 == train.samples
            assert len(set(got)) == len(got)
            # dali reads the rank's share; cpu and resident slice one global order
            assert set(got) <= set(ids["train"][start:stop] if backend == "dali" else ids["train"])
        train_seen.append(got)
        steps.add(len(train))
        train.close()
    assert len(steps) == 1  # every rank takes the same number of steps
    np.testing.assert_array_equal(np.sort(np.concatenate(val_seen)), np.sort(ids["val"]))
    assert len(set(np.concatenate(train_seen))) == sum(map(len, train_seen))  # disjoint


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ranks_draw_their_own_crops_and_flips(ramp_pack, backend):
    """ramp_pack's images are all alike, so two ranks' first batches differ only by their crops
    and flips: ranks seeded alike would train on identical batches."""
    needs(backend)
    first = []
    for rank in range(2):
        loader = make(ramp_pack.path, backend, "train", rank, 2, batch_size=50)
        first.append(ramp_crops(next(iter(loader)).images, ramp_pack.slope))
        loader.close()
    for key in ("w", "h", "flipped"):
        assert not np.allclose(first[0][key], first[1][key]), key


def test_epoch_seed_is_distinct_for_each_seed_epoch_and_rank():
    seeds = {epoch_seed(s, e, r) for s in range(4) for e in range(4) for r in range(4)}
    assert len(seeds) == 64 and all(0 <= seed < 2**63 for seed in seeds)


@pytest.mark.parametrize("image_size", [64, 227])
@pytest.mark.parametrize("backend", ["dali", "resident"])
def test_val_pixels_agree_with_the_cpu_reference(synth_pack, backend, image_size):
    needs(backend)
    loaders = [
        make(synth_pack, b, "val", batch_size=30, image_size=image_size) for b in ("cpu", backend)
    ]
    batches = 0
    for (cpu_images, cpu_labels), (images, labels) in zip(*loaders):
        batches += 1
        assert torch.equal(cpu_labels, labels)
        assert torch.equal(cpu_images, images)  # the same decoder output through augment.py
    assert batches == 2
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_tampered_shard_is_refused_before_any_batch(coded_pack, tmp_path, backend):
    needs(backend)
    copy = tmp_path / "shards"
    shutil.copytree(coded_pack.path, copy)
    tar = copy / read_manifest(copy).splits["train"].shards[1].name
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        make(copy, backend, "train", batch_size=32)
    make(copy, backend, "val", batch_size=32).close()  # only the tampered split is refused


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loader_batches_are_channels_last_cuda(coded_pack, backend):
    """On CUDA: batches land on the GPU, channels-last, labels following their images; val covers
    the split once."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    needs(backend)
    cuda = torch.device("cuda", torch.cuda.current_device())
    train = make(coded_pack.path, backend, "train", device=cuda, batch_size=32)
    ids, batches = run_epoch(train, coded_pack, cuda)
    assert batches == len(train) and len(set(ids)) == len(ids) == train.samples
    train.close()
    val = make(coded_pack.path, backend, "val", device=cuda, batch_size=32)
    np.testing.assert_array_equal(run_epoch(val, coded_pack, cuda)[0], coded_pack.ids["val"])
    val.close()


# --- several processes on one machine, and the GPU hand-off -------------------------------------


def test_default_workers_are_this_processes_share_of_the_cores(monkeypatch):
    from fastalex.loaders import loader_workers

    monkeypatch.setattr("fastalex.loaders.contract.default_workers", lambda: 16)
    cfg = TrainConfig()
    assert loader_workers(cfg, Placement(CPU)) == 16
    assert loader_workers(cfg, Placement(CPU, 3, 8, local_world_size=8)) == 2
    assert loader_workers(cfg, Placement(CPU, 0, 32, local_world_size=32)) == 1
    assert loader_workers(TrainConfig(loader_workers=5), Placement(CPU, 0, 8, 8)) == 5


@pytest.mark.slow  # trains or starts processes
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_mixed_size_pack_trains_with_memory_bounded_by_the_batch(mixed_pack, backend, tmp_path):
    """The stated bound: every image is decoded onto a canvas of at most (2 * image_size)^2 pixels
    (loaders.canvas_px), so a batch holds at most batch * 4 * image_size^2 * 3 bytes of decoded
    pixels, however large the pack's images (here one of 2000 x 1000 among 20-40 px ones)."""
    needs(backend)
    from click.testing import CliRunner

    from fastalex.cli import main
    from fastalex.loaders import canvas_px

    info = read_manifest(mixed_pack).splits["train"]
    assert max(info.image_px) >= 2000  # stored as it is: the loaders must bound it
    bound = (128, 128)
    assert canvas_px(tuple(info.image_px), 64) == bound
    train = make(mixed_pack, backend, "train", batch_size=8)
    if backend == "cpu":  # its workers' canvases (and the ring: finished 64 px batches here)
        assert train.table.canvas_px == bound and tuple(train.canvases.shape[2:4]) == (64, 64)
    elif backend == "resident":
        assert tuple(train.images.shape[1:3]) == bound
    seen = 0
    for images, labels in train:
        assert images.shape == (8, 3, 64, 64) and torch.isfinite(images).all()
        seen += len(labels)
    assert seen == train.samples
    train.close()
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(mixed_pack),
            "--out",
            str(tmp_path / "run"),
            "--loader",
            backend,
            "--device",
            "cpu",
            "--no-compile",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--loader-workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1/1:" in result.output


# --- resuming: global order, skipped samples, another number of processes ----------------------

OWN_ORDER = ["cpu", "resident"]  # the backends whose epoch order is a global permutation


# coded_pack's flat colours trace each sample; ramp_pack's identical ramps trace crops and flips.


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("backend", OWN_ORDER)
def test_two_ranks_and_one_cover_the_same_global_batches(request, pack, backend):
    """Global batch 40 as 2 ranks x 20 or 1 x 40: the same samples in each global step, with the
    same crops and flips (a sample's augmentation depends on its global position only)."""
    pack = request.getfixturevalue(pack)
    one = make(pack.path, backend, "train", 0, 1, first_epoch=2, batch_size=40)
    single = batches_of(one)
    halves = []
    for rank in range(2):
        loader = make(pack.path, backend, "train", rank, 2, first_epoch=2, batch_size=20)
        assert len(loader) == len(one) > 0
        halves.append(batches_of(loader))
        loader.close()
    one.close()
    assert len(single) == len(halves[0]) == len(halves[1])
    for (images, labels), first, second in zip(single, *halves):
        torch.testing.assert_close(torch.cat([first[0], second[0]]), images, atol=1e-5, rtol=0)
        assert torch.equal(torch.cat([first[1], second[1]]), labels)


@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_skipped_samples_give_the_tail_of_the_uninterrupted_epoch(request, pack, backend):
    """skip_samples with one process: the first pass is exactly the uninterrupted epoch's batches
    after that point (pixels and labels), len() stays the full count, and the next pass is the
    next whole epoch."""
    needs(backend)
    pack = request.getfixturevalue(pack)
    whole = make(pack.path, backend, "train", first_epoch=1, batch_size=40, seed=3)
    expected = [batches_of(whole) for _ in range(2)]
    whole.close()
    resumed = make(
        pack.path, backend, "train", first_epoch=1, skip_samples=3 * 40, batch_size=40, seed=3
    )
    assert len(resumed) == len(expected[0]) > 3
    tail = batches_of(resumed)
    if backend == "cpu" and resumed.decode == "processes":
        assert len(resumed._tasks.batches) == len(resumed) - 3  # the skipped ones never decoded
    after = batches_of(resumed)
    resumed.close()
    for got, want in zip([tail, after], [expected[0][3:], expected[1]]):
        assert len(got) == len(want)
        for (images, labels), (want_images, want_labels) in zip(got, want):
            assert torch.equal(labels, want_labels)
            torch.testing.assert_close(images, want_images, atol=0, rtol=0)


@pytest.mark.parametrize("backend", OWN_ORDER)
def test_a_pass_resumed_by_one_process_sees_each_remaining_sample_once(coded_pack, backend):
    """Two ranks take 3 global steps of 40, then one process continues the epoch from that cursor:
    every sample of the epoch's full global batches is seen exactly once."""
    ids = coded_pack.ids["train"]
    seen = []
    for rank in range(2):
        loader = make(coded_pack.path, backend, "train", rank, 2, first_epoch=1, batch_size=20)
        for step, (images, _) in enumerate(loader):
            if step == 3:
                break
            seen.append(coded_pack.decode(images))
        loader.close()
    rest = make(coded_pack.path, backend, "train", first_epoch=1, skip_samples=120, batch_size=40)
    remaining, batches = run_epoch(rest, coded_pack)
    rest.close()
    assert batches == len(ids) // 40 - 3
    everything = np.concatenate([*seen, remaining])
    assert len(everything) == len(ids) // 40 * 40 and len(set(everything)) == len(everything)
    assert set(everything) <= set(ids)


def test_skip_samples_must_be_whole_global_batches(coded_pack):
    with pytest.raises(ValueError, match="whole number"):
        make(coded_pack.path, "cpu", "train", 0, 2, skip_samples=20, batch_size=20)
    with pytest.raises(ValueError, match="train split only"):
        make(coded_pack.path, "cpu", "val", skip_samples=40, batch_size=20)


# --- shared memory and dying workers ------------------------------------------------------------


@pytest.mark.parametrize(
    "saved, now, saved_world, cursor, cut",
    [
        ("cpu", "resident", 1, 80, False),  # one global order: each remaining sample once
        ("resident", "cpu", 2, 80, False),  # ... on any process count
        ("cpu", "dali", 1, 80, True),  # dali cannot continue another loader's order
        ("dali", "cpu", 1, 80, True),
        ("dali", "dali", 1, 80, False),  # its own order, the same count: exact
        ("dali", "dali", 2, 80, True),  # another count: its rank shares differ
        ("dali", "cpu", 2, 0, False),  # at an epoch boundary anything continues
    ],
)
def test_a_resumed_epoch_ends_early_only_where_the_loader_cannot_continue_it(
    saved, now, saved_world, cursor, cut
):
    from fastalex.loaders import continue_train_loader

    built = []

    class Stub:
        resplits = now != "dali"

        def __init__(self, cfg, split, placement, first_epoch, skip_samples=0):
            built.append((first_epoch, skip_samples))

        def close(self):
            pass

    cfg = TrainConfig(loader=now)
    loader, why = continue_train_loader(
        cfg, Placement(CPU, 0, 1), 3, cursor, saved_world, saved, Stub
    )
    assert bool(why) == cut and isinstance(loader, Stub)
    assert built[-1] == ((4, 0) if cut else (3, cursor))
    if cut:
        assert now in why and (saved in why or "processes" in why)
