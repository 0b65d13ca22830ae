"""loaders/dali.py: the DALI pipeline's GPU processing (on its CPU operators), its split decode,
its threads, its batches read late, one decode per epoch, and an epoch order that is a function of
(seed, epoch, rank) however the process got there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CPU, PACKS, batches_of, make, needs

from fastalex.config import TrainConfig
from fastalex.loaders import Placement, rank_share
from fastalex.shards import read_manifest


@pytest.mark.dali
def test_dali_gpu_processing_hands_over_uint8_within_a_grey_level_of_the_cpu_reference(synth_pack):
    """The GPU pipeline's processing (process_images: DALI's resize, then crop_mirror_normalize
    with dtype UINT8), built here on DALI's CPU operators: uint8 HWC val batches equal to the cpu
    loader's up to DALI's own rounding, one grey level (docs/loaders.md, Rounding)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import pipeline_def

    from fastalex.loaders.dali import READER, process_images, read_shards, shard_paths

    cfg = TrainConfig(shards=str(synth_pack), batch_size=30, image_size=227)
    tars, indices = shard_paths(synth_pack, read_manifest(synth_pack), "val")

    @pipeline_def(batch_size=30, num_threads=1, device_id=None)
    def val_pipeline():
        jpegs, _ = read_shards(
            tars=tars, indices=indices, shard_id=0, num_shards=1, shuffle=False, fill=1
        )
        return process_images(jpegs, False, cfg, "cpu")

    pipe = val_pipeline()
    pipe.build()
    reference = make(synth_pack, "cpu", "val", batch_size=30, image_size=227)
    for expected, _ in reference:
        (images,) = pipe.run()
        assert pipe.reader_meta(READER)["epoch_size"] == 60
        images = torch.from_numpy(np.stack([np.array(image) for image in images]))
        assert images.dtype == torch.uint8 and images.shape == (30, 227, 227, 3)
        gap = (images.permute(0, 3, 1, 2).int() - expected.int()).abs()
        assert gap.max() <= 1 and gap.float().mean() < 0.05
    reference.close()


@pytest.mark.dali
@pytest.mark.parametrize("world", [1, 3])
def test_dali_decode_split_matches_cpu_decoder(coded_pack, world):
    """dali.decode_split (the resident loader's decoder on CUDA) and cpu.ShardDecoder give the same
    canvases and sizes for a rank's share, in global order, mixed image sizes included."""
    pytest.importorskip("nvidia.dali")
    from fastalex.loaders.dali import decode_split
    from fastalex.loaders.decode import SampleTable, ShardDecoder

    manifest = read_manifest(coded_pack.path)
    cfg = TrainConfig(shards=str(coded_pack.path), batch_size=32, loader_workers=1)
    table = SampleTable(coded_pack.path, manifest, "train", cfg.image_size)
    rank = world - 1
    start, stop = rank_share(len(table.labels), rank, world)
    placement = Placement(CPU, rank, world)
    images, sizes = decode_split(cfg, "train", manifest, placement, table.canvas_px)
    expected_images, expected_sizes = ShardDecoder(table)[np.arange(start, stop)]
    torch.testing.assert_close(sizes, expected_sizes)
    assert images.shape == expected_images.shape == (stop - start, *table.canvas_px, 3)
    for image, expected, (h, w) in zip(images, expected_images, sizes.tolist()):
        difference = (image[:h, :w].int() - expected[:h, :w].int()).abs()
        assert difference.max() <= 2  # two libjpeg-turbo builds


@pytest.mark.dali
def test_dali_threads_are_this_processes_share_of_the_cores(monkeypatch):
    pytest.importorskip("nvidia.dali")
    from fastalex.loaders.dali import pipeline_device

    monkeypatch.setattr("fastalex.loaders.contract.default_workers", lambda: 16)
    _, device_id, threads = pipeline_device(TrainConfig(), Placement(CPU, 1, 4, 4))
    assert device_id is None and threads == 4


@pytest.mark.gpu
@pytest.mark.dali
def test_dali_gpu_batches_read_late_equal_batches_read_at_once(coded_pack):
    """DALI's zero-copy GPU outputs must not be recycled while queued work still reads them:
    checksums taken behind a long GPU delay (the trainer runs ahead like this) equal those taken
    at once. Val is in a fixed order, so both passes see the same batches."""
    pytest.importorskip("nvidia.dali")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", 0)
    loader = make(coded_pack.path, "dali", "val", device=device, batch_size=8)
    at_once = [images.double().sum().item() for images, _ in loader]
    late = []
    for images, _ in loader:
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time queued before the read
        late.append(images.double().sum())  # queued behind the sleep; no host sync here
    assert [value.item() for value in late] == at_once
    loader.close()


@pytest.mark.dali
@pytest.mark.parametrize(
    "split, batch_size, stop_after",
    [
        ("train", 32, None),  # 280 / 32: a short batch DALI drops
        ("train", 40, None),  # 280 / 40: divides
        ("train", 32, 3),  # passes stopped early
        ("val", 32, None),  # 70 / 32: the short last batch kept
        ("val", 35, None),  # 70 / 35: divides
        ("val", 32, 1),
    ],
)
def test_dali_decodes_each_epoch_once(coded_pack, monkeypatch, split, batch_size, stop_after):
    """Over several passes DALI produces exactly its batches per epoch once per pass, whether a
    pass ran to its end or stopped early: no hidden extra epoch before the next pass. Train
    builds a fresh pipeline per pass (its epoch's seed), so nothing of the last one is drained."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali.pipeline import Pipeline

    produced = []
    share_outputs = Pipeline.share_outputs

    def counted(pipe, *args, **kwargs):
        produced.append(1)
        return share_outputs(pipe, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "share_outputs", counted)
    loader = make(coded_pack.path, "dali", split, batch_size=batch_size)
    samples = len(coded_pack.ids[split])
    per_epoch = -(-samples // batch_size)  # DALI runs the padded short batch too
    passes = 4
    for _ in range(passes):
        taken = 0
        for _ in loader:
            taken += 1
            if taken == stop_after:
                break
        assert taken == (stop_after or len(loader))
    last = stop_after or len(loader)
    if split == "train":  # each pass's own pipeline: only what the pass took
        assert len(produced) == passes * last
    else:  # passes - 1 whole epochs ran through, the last pass took `taken` batches
        assert len(produced) == (passes - 1) * per_epoch + last
    loader.close()


@pytest.mark.dali
@pytest.mark.parametrize("pack", PACKS)
def test_a_dali_epoch_is_the_same_however_the_process_got_there(request, pack):
    """DALI's reader seeds its shuffle once: epoch 2 of a loader started at epoch 0 equals epoch
    2 of one started there (pixels, so crops and flips too, and labels), and a pass resumed 3
    batches into epoch 2 gives that epoch's tail."""
    needs("dali")
    pack = request.getfixturevalue(pack)
    from_zero = make(pack.path, "dali", "train", first_epoch=0, batch_size=40, seed=3)
    epochs = [batches_of(from_zero) for _ in range(3)]
    from_zero.close()
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(epochs[1], epochs[2]))
    resumed = make(
        pack.path, "dali", "train", first_epoch=2, skip_samples=3 * 40, batch_size=40, seed=3
    )
    tail = batches_of(resumed)
    resumed.close()
    assert len(tail) == len(epochs[2]) - 3 > 0
    for (images, labels), (want_images, want_labels) in zip(tail, epochs[2][3:]):
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(images, want_images, atol=0, rtol=0)
