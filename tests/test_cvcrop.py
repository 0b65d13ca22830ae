"""cvcrop.py: the CPU's crop through OpenCV and Pillow against the torch resize
(`augment.resample`, the geometry and kernel DALI's ROI resize has), per grey level, at the bounds
docs/loaders.md states: upsampling and 1:1 crops within 1 grey level (a 1:1 copy exact),
downscaling crops within 1 but in the outermost output pixels; and the threads' chunks equal one
call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastalex.loaders import cvcrop
from fastalex.loaders.augment import Augment, crop_resize, resample

TRAIN = Augment(train=True, image_size=64, crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3))


def photo_like(n: int, side: int, seed: int) -> torch.Tensor:
    """(n, side, side, 3) uint8: smooth colour fields (8 x 8 random, bicubic upsampled) plus
    +-20 grey levels of noise: edges and texture, as photographs have."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 8, 8), generator=generator) * 255
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    noise = torch.randint(-20, 21, smooth.shape, generator=generator)
    return (smooth + noise).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def noise(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8, generator=generator)


def ragged(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, 2) sizes of images smaller than the canvas, down to half of it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            torch.randint(height // 2, height + 1, (n,), generator=generator),
            torch.randint(width // 2, width + 1, (n,), generator=generator),
        ],
        dim=1,
    ).to(torch.int32)


def crops(images, sizes, out_px, seed):
    """(boxes, flips) of the train transform for these images, at out_px."""
    augment = Augment(True, out_px, TRAIN.crop_scale, TRAIN.crop_ratio)
    generator = torch.Generator().manual_seed(seed)
    heights, widths = sizes.unbind(1)
    return augment.draw(heights, widths, generator)


def gap(images, boxes, flips, out_px, sizes) -> torch.Tensor:
    """|OpenCV - torch| per pixel and channel, after checking the OpenCV batch's contract."""
    ours = crop_resize(images, boxes, flips, out_px, sizes)
    assert ours.shape == (len(images), 3, out_px, out_px) and ours.dtype == torch.uint8
    assert ours.is_contiguous(memory_format=torch.channels_last)
    reference = resample(images, boxes, flips, out_px, sizes)
    return (ours.int() - reference.int()).abs()


@pytest.mark.parametrize("out_px", [64, 227])
@pytest.mark.parametrize("source", ["noise", "photo"])
def test_upsampling_crops_are_within_one_grey_level_of_the_torch_resize(out_px, source):
    """Every crop of a 64 x 64 canvas at >= 64 px upsamples (the Tiny ImageNet case): bilinear at
    pixel centres in both, flips and images smaller than the canvas included (their border is
    replicated at the image's own edge, outside the box too, as the torch path does)."""
    n = 64
    images = noise(n, 64, 64, 1) if source == "noise" else photo_like(n, 64, 1)
    sizes = ragged(n, 64, 64, 2)
    boxes, flips = crops(images, sizes, out_px, 3)
    assert (boxes[:, 2:] <= out_px).all() and flips.any() and not flips.all()
    difference = gap(images, boxes, flips, out_px, sizes)
    assert difference.max() <= 1
    assert (difference > 0).float().mean() < 0.01  # measured ~0.3 %: rounding near halves


def test_a_one_to_one_resize_is_an_exact_copy():
    """Val at Tiny ImageNet's own size: the whole 64 x 64 image to 64 px, bit for bit, on every
    backend's CPU path."""
    images = noise(16, 64, 64, 4)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(16, 4)
    out = crop_resize(images, boxes, None, 64)
    assert torch.equal(out.permute(0, 2, 3, 1), images)


@pytest.mark.parametrize("source", ["noise", "photo"])
def test_downscaling_crops_are_within_one_grey_level_but_at_the_outermost_pixels(source):
    """Photos packed larger than the output: canvases up to 2x the output a side, so crops
    downscale by up to 2x, through Pillow's antialiased triangle filter, the torch path's. Where a
    box meets the image's edge, Pillow renormalises the filter inside the image and the torch path
    replicates the edge: only the outermost output pixels may differ more (noise: ~13 levels)."""
    images = noise(64, 128, 120, 5) if source == "noise" else photo_like(64, 128, 5)[:, :, :120]
    sizes = ragged(64, 128, 120, 6).clamp(min=100)
    boxes, flips = crops(images, sizes, 64, 7)
    assert (boxes[:, 2:] > 64).any(dim=1).float().mean() > 0.9  # nearly every box downscales
    difference = gap(images, boxes, flips, 64, sizes)
    assert difference[:, :, 1:-1, 1:-1].max() <= 1
    assert (difference > 1).float().mean() < 0.02


def test_chunks_in_threads_reading_rows_in_place_equal_one_call_on_a_gathered_batch():
    """crop_batch's threads, reading rows of a held split in place (resident's CPU path), write
    the same pixels as one crop_into over those rows gathered first."""
    held = photo_like(40, 64, 7)
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(8))[:33]
    sizes = ragged(33, 64, 64, 8)
    boxes, flips = crops(held[rows], sizes, 64, 9)
    args = (sizes.numpy(), boxes.numpy(), flips.numpy())
    one = np.empty((33, 64, 64, 3), np.uint8)
    cvcrop.crop_into(one, held[rows].numpy(), *args)
    chunked = np.empty_like(one)
    cvcrop.crop_batch(chunked, held.numpy(), *args, rows.numpy(), threads=3)
    np.testing.assert_array_equal(chunked, one)


def test_the_maps_sample_pixel_centres_and_mirror_the_columns():
    """inverse_maps against the definition: output column u of a box [x0, x0 + w) reads
    x0 + (u + 0.5) * w / S - 0.5 (OpenCV's integer pixel centres), mirrored u -> S - 1 - u."""
    boxes = np.array([[3.0, 5.0, 10.0, 20.0]])
    plain, mirrored = (cvcrop.inverse_maps(boxes, np.array([f]), 40)[0] for f in (False, True))
    for u, v in [(0, 0), (17, 9), (39, 39)]:
        x, y = plain @ [u, v, 1]
        assert x == pytest.approx(3 + (u + 0.5) * 10 / 40 - 0.5)
        assert y == pytest.approx(5 + (v + 0.5) * 20 / 40 - 0.5)
        assert (mirrored @ [u, v, 1])[0] == pytest.approx((plain @ [39 - u, v, 1])[0])


def crop_in_threads() -> None:
    """crop_batch over 2 threads, numpy only (torch's OpenMP is not fork-safe in a child)."""
    images = np.random.default_rng(10).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    boxes = np.tile(np.array([[0.0, 0.0, 64.0, 64.0]]), (8, 1))
    out = np.empty_like(images)
    cvcrop.crop_batch(out, images, np.full((8, 2), 64), boxes, None, None, threads=2)
    assert np.array_equal(out, images)


@pytest.mark.slow  # starts a process
def test_a_forked_child_crops_in_threads_of_its_own():
    """The crop threads of a process do not survive a fork: a child (a decode worker forked after
    `resident` cropped in threads) makes its own instead of waiting on its parent's for good."""
    import multiprocessing

    crop_in_threads()  # this process's pool of 2
    child = multiprocessing.get_context("fork").Process(target=crop_in_threads)
    child.start()
    child.join(timeout=30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
