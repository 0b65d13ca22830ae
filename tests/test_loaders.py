"""The loader contract, checked on every backend: what a batch looks like, which samples an epoch
holds, how ranks share a split, that labels follow their images, that `cpu` and `dali` produce the
same pixels and the same augmentation statistics, and that a tampered pack is refused."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil

import numpy as np
import pytest
import torch

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, augment, build_loader, rank_share, steps_per_epoch
from fastalex.loaders.augment import crop_resize, sample_crop_boxes
from fastalex.loaders.base import epoch_seed
from fastalex.shards import read_manifest

BACKENDS = ["cpu", "dali", "resident"]
BACKEND_PARAMS = ["cpu", pytest.param("dali", marks=pytest.mark.dali), "resident"]
# "cpu-threads": the cpu backend decoding in threads (--decode threads); "cpu" runs --decode auto.
VARIANTS = {"cpu-threads": {"loader": "cpu", "decode": "threads"}}
CPU = torch.device("cpu")


def needs(backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def make(
    pack_path, backend, split, rank=0, world=1, first_epoch=0, device=CPU, skip_samples=0, **fields
):
    """A loader of rank `rank` of `world`; `batch_size`, when given, is each rank's batch (the
    config holds the global one: batch_size * world)."""
    if "batch_size" in fields:
        fields["batch_size"] *= world
    fields = {"loader": backend, **VARIANTS.get(backend, {}), **fields}
    cfg = TrainConfig(shards=str(pack_path), loader_workers=1, **fields)
    return build_loader(cfg, split, Placement(device, rank, world), first_epoch, skip_samples)


def run_epoch(loader, coded, device=CPU) -> tuple[np.ndarray, int]:
    """The image ids of one epoch, in order, and the number of batches; checks every batch's
    layout and that its labels are its images' classes."""
    ids, batches = [], 0
    for images, labels in loader:
        batches += 1
        assert images.dtype == torch.uint8 and images.device.type == device.type
        assert labels.device.type == device.type
        assert images.shape[1:] == (3, 64, 64)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        found = coded.decode(images)
        np.testing.assert_array_equal(labels.cpu().numpy(), found % coded.classes)
        ids.append(found)
    return np.concatenate(ids), batches


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


def ramp_crops(images: torch.Tensor, slope: float) -> dict[str, np.ndarray]:
    """Crop box (w, h in source pixels) and flip of each ramp_pack output, read from its pixels:
    a resampled linear ramp stays linear, value = 30 + 3 * (source x - 0.5), up to rounding to
    uint8 (averaged over S rows or columns)."""
    size = images.shape[-1]
    pixels = images.double()
    j1, j2 = size // 4, 3 * size // 4  # inner columns: clear of border replication
    red = pixels[:, 0].mean(dim=1)  # (N, S): the x ramp, per output column
    green = pixels[:, 1].mean(dim=2)  # (N, S): the y ramp, per output row
    span_x = (red[:, j2] - red[:, j1]) / slope  # source pixels between the two columns
    span_y = (green[:, j2] - green[:, j1]) / slope
    scale = size / (j2 - j1)
    return {
        "w": (span_x.abs() * scale).numpy(),
        "h": (span_y * scale).numpy(),
        "flipped": (span_x < 0).numpy(),
    }


def crop_summary(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Mean and sd of the area fraction and of log(w/h) for 64 x 64 sources."""
    area, log_ratio = w * h / 64**2, np.log(w / h)
    return np.array([area.mean(), area.std(), log_ratio.mean(), log_ratio.std()])


def reference_crop_size(
    height: int, width: int, scale, ratio, rng: random.Random
) -> tuple[int, int]:
    """(w, h) of one random-resized-crop window by its definition (augment.py's docstring, after
    DALI's RandomCropGenerator), written apart from the code under test: scalar, plain Python."""
    (area_lo, area_hi), (ratio_lo, ratio_hi) = scale, ratio
    widest = max(1, math.floor(height * ratio_hi))  # the widest allowed crop is full height
    tallest = max(1, math.floor(width / ratio_lo))  # the tallest allowed crop is full width
    if height * widest < area_lo * height * width:  # too wide for any allowed crop
        return widest, height
    if width * tallest < area_lo * height * width:  # too tall for any allowed crop
        return width, tallest
    for _ in range(augment.CROP_ATTEMPTS):
        area = rng.uniform(area_lo, area_hi) * height * width
        aspect = math.exp(rng.uniform(math.log(ratio_lo), math.log(ratio_hi)))
        w = max(1, math.floor(math.sqrt(area * aspect) + 0.5))  # round half up: C's roundf
        h = max(1, math.floor(math.sqrt(area / aspect) + 0.5))
        if w <= width and h <= height and ratio_lo <= w / h <= ratio_hi:
            return w, h
    # Every attempt failed: the whole image, its aspect clamped into range, shrunk to fit the area.
    w = widest if width / height > ratio_hi else width
    h = tallest if width / height < ratio_lo else height
    shrink = math.sqrt(min(1.0, area_hi * height * width / (w * h)))
    return max(1, math.floor(w * shrink)), max(1, math.floor(h * shrink))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


KS_C_001 = 1.95  # two-sample KS critical coefficient at alpha = 0.001: D > 1.95 sqrt((n+m)/nm)
DEFAULT_SCALE, DEFAULT_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)  # TrainConfig's crop_* defaults


@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [
        (64, 64, DEFAULT_SCALE, DEFAULT_RATIO),  # Tiny ImageNet
        (24, 64, DEFAULT_SCALE, DEFAULT_RATIO),  # wide: ~10 % of draws take the clamped fallback
        (64, 24, DEFAULT_SCALE, DEFAULT_RATIO),  # tall
        (12, 17, DEFAULT_SCALE, DEFAULT_RATIO),  # small: rounding moves many aspects
        (10, 200, DEFAULT_SCALE, DEFAULT_RATIO),  # too wide for any allowed crop: 13 x 10
        (200, 10, DEFAULT_SCALE, DEFAULT_RATIO),  # too tall: 10 x 13
        (
            2,
            2,
            (0.3, 0.4),
            (1.2, 1.3),
        ),  # no rounded attempt in range: fallback 2 x 1 shrunk to 1 x 1
    ],
)
def test_crop_boxes_follow_the_random_resized_crop_definition(height, width, scale, ratio):
    """sample_crop_boxes against a reference sampler written from the definition: the same
    distribution of area fraction and aspect (KS test), whole-pixel boxes inside the image, the
    anchor uniform over every whole-pixel position."""
    n = 20_000
    heights, widths = torch.full((n,), height), torch.full((n,), width)
    boxes = sample_crop_boxes(heights, widths, scale, ratio, torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.double().numpy().T
    assert all(np.array_equal(v, np.round(v)) for v in (x0, y0, w, h))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= width).all() and (y0 + h <= height).all()
    rng = random.Random(1)
    ref_w, ref_h = np.array(
        [reference_crop_size(height, width, scale, ratio, rng) for _ in range(n)], dtype=np.float64
    ).T
    bound = KS_C_001 * math.sqrt(2 / n)
    assert ks_distance(w * h, ref_w * ref_h) < bound, "crop area"
    assert ks_distance(np.log(w / h), np.log(ref_w / ref_h)) < bound, "crop aspect"
    assert ks_distance(w, ref_w) < bound and ks_distance(h, ref_h) < bound
    # Anchor uniform over 0..(side - size): spread over [0, 1) by a uniform jitter, it is U(0, 1).
    jitter = np.random.default_rng(2).random((2, n))
    for start, size, side, noise in ((x0, w, width, jitter[0]), (y0, h, height, jitter[1])):
        spread = (start + noise) / (side - size + 1)
        assert ks_distance(spread, np.random.default_rng(3).random(n)) < bound, "anchor"


@pytest.mark.dali
def test_crop_boxes_match_dali_generator():
    """sample_crop_boxes draws what DALI's RandomCropGenerator draws (log-uniform aspect)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    cfg = TrainConfig()
    area, ratio = [cfg.crop_scale_min, cfg.crop_scale_max], [cfg.crop_ratio_min, cfg.crop_ratio_max]
    n = 40_000

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=7)
    def windows():
        shape = types.Constant(np.array([64, 64, 3], dtype=np.int64))
        anchor, size = fn.random_crop_generator(shape, random_area=area, random_aspect_ratio=ratio)
        return anchor, size

    pipe = windows()
    pipe.build()
    _, sizes = pipe.run()
    sizes = np.stack([np.array(s) for s in sizes]).astype(np.float64)  # (n, 2) = (h, w)
    dali = crop_summary(sizes[:, 1], sizes[:, 0])
    side = torch.full((n,), 64)
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(side, side, tuple(area), tuple(ratio), generator)
    ours = crop_summary(boxes[:, 2].double().numpy(), boxes[:, 3].double().numpy())
    # Standard errors at n = 40,000 are ~0.0008 (area) and ~0.0008 (log ratio); a uniform rather
    # than log-uniform aspect would shift the mean log ratio by ~0.023.
    np.testing.assert_allclose(ours, dali, atol=0.005)
    assert (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 64).all()


@pytest.mark.dali
def test_crop_resize_matches_dali_resize():
    """Same window -> same pixels as DALI's ROI resize: upsampling, 1:1 and antialiased
    downscaling, the border replicated at the image's edge."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    image = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    windows = [
        ((0, 0, 20, 24), 40),
        ((3, 5, 10, 12), 227),
        ((10, 12, 10, 12), 31),
        ((2, 3, 15, 20), 7),
    ]
    for (x0, y0, w, h), size in windows:

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def resize():
            source = fn.external_source(source=lambda: [image], layout="HWC", batch=True)
            return fn.resize(
                source,
                size=[size, size],
                roi_start=[y0, x0],
                roi_end=[y0 + h, x0 + w],
            )  # uint8 out, as the input

        pipe = resize()
        pipe.build()
        (dali,) = pipe.run()
        ours = crop_resize(
            torch.from_numpy(image)[None],
            torch.tensor([[x0, y0, w, h]], dtype=torch.float32),
            None,
            size,
        )
        assert ours.dtype == torch.uint8
        # DALI's float result is ours to ~5e-4 (measured), so rounding parts them only near a
        # half, by one grey level: measured in 0-3 % of the pixels of these windows.
        gap = (ours[0].permute(1, 2, 0).int() - torch.from_numpy(np.array(dali[0])).int()).abs()
        assert gap.max() <= 1 and gap.float().mean() < 0.05


def test_train_augmentation_statistics_agree(ramp_pack):
    """Crop area, aspect and flip rate, read back from each backend's training batches, agree with
    the distribution the definition gives (reference_crop_size, not the code under test)."""
    cfg = TrainConfig()
    scale = (cfg.crop_scale_min, cfg.crop_scale_max)
    ratio = (cfg.crop_ratio_min, cfg.crop_ratio_max)
    rng = random.Random(1)
    w, h = np.array(
        [reference_crop_size(64, 64, scale, ratio, rng) for _ in range(50_000)], dtype=np.float64
    ).T
    expected = crop_summary(w, h)
    for backend in BACKENDS:
        if backend == "dali":
            pytest.importorskip("nvidia.dali")
        loader = make(ramp_pack.path, backend, "train", batch_size=50)
        crops = [ramp_crops(images, ramp_pack.slope) for _ in range(4) for images, _ in loader]
        loader.close()
        w, h, flipped = (np.concatenate([c[k] for c in crops]) for k in ("w", "h", "flipped"))
        assert len(w) == 1200
        # 1,200 crops: standard errors ~0.005 (area mean), ~0.0045 (log-ratio mean), 0.014 (flips).
        np.testing.assert_allclose(crop_summary(w, h), expected, atol=0.025, err_msg=backend)
        assert abs(flipped.mean() - 0.5) < 0.07, backend  # ~5 standard errors


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


@pytest.mark.slow  # trains or starts processes
@pytest.mark.parametrize("image_size", [64, 150])
def test_compiled_and_eager_crop_resize_agree(image_size):
    """The CPU fast path (inductor-compiled gathers) and the separable embedding_bag path give the
    same pixels, smaller images on the canvas and flips included: before rounding they agree to
    ~1e-5, so a rare value that close to a half rounds one grey level apart."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (20, 40, 48, 3), dtype=torch.uint8, generator=generator)
    sizes = torch.stack([torch.randint(20, 41, (20,)), torch.randint(20, 49, (20,))], dim=1)
    boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], (0.35, 1.0), (0.75, 4 / 3), generator)
    flips = torch.rand(20, generator=generator) < 0.5
    args = (images, boxes, flips, image_size, sizes)
    fast, eager = crop_resize(*args), crop_resize(*args, compile_cpu=False)
    for path in (augment.compiled_taps, augment.compiled_bilinear):  # both really ran
        assert path.compiled not in (None, False)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert fast.dtype == eager.dtype == torch.uint8
    gap = (fast.int() - eager.int()).abs()
    assert gap.max() <= 1 and (gap > 0).float().mean() < 1e-4


# --- several processes on one machine, and the GPU hand-off -------------------------------------


def test_default_workers_are_this_processes_share_of_the_cores(monkeypatch):
    from fastalex.loaders import loader_workers

    monkeypatch.setattr("fastalex.loaders.contract.default_workers", lambda: 16)
    cfg = TrainConfig()
    assert loader_workers(cfg, Placement(CPU)) == 16
    assert loader_workers(cfg, Placement(CPU, 3, 8, local_world_size=8)) == 2
    assert loader_workers(cfg, Placement(CPU, 0, 32, local_world_size=32)) == 1
    assert loader_workers(TrainConfig(loader_workers=5), Placement(CPU, 0, 8, 8)) == 5


@pytest.mark.dali
def test_dali_threads_are_this_processes_share_of_the_cores(monkeypatch):
    pytest.importorskip("nvidia.dali")
    from fastalex.loaders.dali import pipeline_device

    monkeypatch.setattr("fastalex.loaders.contract.default_workers", lambda: 16)
    _, device_id, threads = pipeline_device(TrainConfig(), Placement(CPU, 1, 4, 4))
    assert device_id is None and threads == 4


def test_the_shared_memory_ring_shrinks_to_fit_or_names_the_fix(coded_pack, monkeypatch):
    from fastalex.loaders import cpu

    monkeypatch.setattr("fastalex.loaders.contract.default_workers", lambda: 8)
    batch_bytes = 10 * 24 * 24 * 3  # batch 10 of coded_pack's largest (24 x 24) images
    # room for (prefetch 2 * 3 workers + 2) = 8 slots of each of 2 ranks' train rings
    monkeypatch.setattr(
        cpu, "free_shared_memory", lambda: int(8 * batch_bytes * 2 * 2 / cpu.SHM_HEADROOM) + 1
    )
    two_ranks = Placement(CPU, 0, 2, local_world_size=2)
    cfg = TrainConfig(shards=str(coded_pack.path), loader="cpu", batch_size=20, decode="processes")
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


@pytest.fixture
def process_group(tmp_path):
    """A 1-process gloo group in this process (as a rank that decodes alone has one)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def spy_start_methods(monkeypatch, backend) -> list:
    """The start method of every DataLoader `backend`'s module makes (None: the default, fork)."""
    from torch.utils.data import DataLoader

    methods = []

    class Spied(DataLoader):
        def __init__(self, *args, multiprocessing_context=None, **kwargs):
            context = multiprocessing_context
            methods.append(getattr(context, "get_start_method", lambda: context)())
            super().__init__(*args, multiprocessing_context=context, **kwargs)

    monkeypatch.setattr(f"fastalex.loaders.{backend}.DataLoader", Spied)
    return methods


@pytest.mark.parametrize("backend", ["cpu", "resident"])
def test_decode_workers_fork_only_without_a_process_group(coded_pack, monkeypatch, backend):
    """Without a group, fork, whatever the placement says (two ranks' placements here)."""
    methods = spy_start_methods(monkeypatch, backend)
    for world in (1, 2):
        make(coded_pack.path, backend, "val", world - 1, world, decode="processes").close()
    assert methods == [None, None]


@pytest.mark.slow  # starts a forkserver and its workers (~15 s)
@pytest.mark.parametrize("backend", ["cpu", "resident"])
def test_decode_workers_start_by_forkserver_beside_a_process_group(
    coded_pack, monkeypatch, process_group, backend
):
    """A rank's decoding never forks beside its group's threads, even when it decodes as if
    alone (the resident loader's train split, a probe): a 1-process group, workers by forkserver,
    the right images."""
    methods = spy_start_methods(monkeypatch, backend)
    loader = make(coded_pack.path, backend, "train", decode="processes")
    ids, _ = run_epoch(loader, coded_pack)
    loader.close()
    assert methods == ["forkserver"]
    assert len(set(ids)) == len(ids) > 0 and set(ids) <= set(coded_pack.ids["train"])


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
    if backend == "cpu":
        assert tuple(train.canvases.shape[2:4]) == bound
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


def test_an_image_larger_than_the_canvas_is_scaled_to_fit_as_it_is_decoded():
    import io

    from PIL import Image

    from fastalex.loaders.decode import decode_to_fit, jpeg_size

    rows = np.linspace(0, 255, 1000)[:, None] * np.ones((1, 2000))
    photo = np.stack([rows, rows[::-1], np.full_like(rows, 90)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    assert jpeg_size(data) == (1000, 2000)
    fitted = decode_to_fit(data, jpeg_size(data), 128, 128)
    assert fitted.shape == (64, 128, 3) and fitted.dtype == np.uint8  # aspect kept
    expected = np.asarray(Image.fromarray(photo).resize((128, 64), Image.BILINEAR)).astype(int)
    assert np.abs(fitted.astype(int) - expected).mean() < 3  # the same picture, smaller


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


# --- resuming: global order, skipped samples, another number of processes ----------------------

OWN_ORDER = ["cpu", "resident"]  # the backends whose epoch order is a global permutation


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


# coded_pack's flat colours trace each sample; ramp_pack's identical ramps trace crops and flips.
PACKS = ["coded_pack", "ramp_pack"]


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


def test_skip_samples_must_be_whole_global_batches(coded_pack):
    with pytest.raises(ValueError, match="whole number"):
        make(coded_pack.path, "cpu", "train", 0, 2, skip_samples=20, batch_size=20)
    with pytest.raises(ValueError, match="train split only"):
        make(coded_pack.path, "cpu", "val", skip_samples=40, batch_size=20)


# --- shared memory and dying workers ------------------------------------------------------------


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


def test_decode_threads_and_processes_give_identical_batches(synth_pack):
    """--decode threads and processes run the same decoder into the same canvases: equal pixels
    and labels, train (two epochs, then a resumed pass) and val."""
    runs = {}
    for mode in ("threads", "processes"):
        batches = []
        for split, fields in (("train", {}), ("train", {"first_epoch": 1}), ("val", {})):
            loader = make(synth_pack, "cpu", split, batch_size=32, decode=mode, **fields)
            assert loader.decode == mode
            passes = 2 if split == "train" and not fields else 1
            batches += [batch for _ in range(passes) for batch in batches_of(loader)]
            loader.close()
        runs[mode] = batches
    assert len(runs["threads"]) == len(runs["processes"]) == 2 * 7 + 7 + 2
    for (images, labels), (want_images, want_labels) in zip(runs["threads"], runs["processes"]):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_a_sample_that_does_not_decode_is_named(coded_pack, tmp_path, mode):
    """A JPEG damaged after the pack was checked (here zeroed once the loader is built) ends the
    pass with UndecodableSample naming the shard and the sample, from a thread or a process."""
    from fastalex.loaders.decode import UndecodableSample

    copy = tmp_path / "shards"
    shutil.copytree(coded_pack.path, copy)
    loader = make(copy, "cpu", "val", batch_size=32, decode=mode)
    table = loader.table
    sample = 40  # in the second batch
    shard = table.paths[table.shard_ids[sample]]
    with open(shard, "r+b") as tar:
        tar.seek(int(table.offsets[sample]))
        tar.write(bytes(int(table.sizes[sample])))
    with pytest.raises(UndecodableSample, match=rf"{shard}: sample {sample} .*fastalex verify"):
        for _ in loader:
            pass
    loader.close()


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
