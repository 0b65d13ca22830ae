"""augment.py: the random-resized-crop boxes and the torch resize (`resample`), against their
definition and DALI's operators, and the train augmentation's statistics across backends. The
OpenCV crop of the CPU device against `resample`: test_cvcrop.py."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from helpers import BACKENDS, make, ramp_crops

from fastalex.config import TrainConfig
from fastalex.loaders import augment
from fastalex.loaders.augment import resample, sample_crop_boxes

KS_C_001 = 1.95  # two-sample KS critical coefficient at alpha = 0.001: D > 1.95 sqrt((n+m)/nm)
DEFAULT_SCALE, DEFAULT_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)  # TrainConfig's crop_* defaults


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
        ours = resample(
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
