"""Batched augmentation on the device: DALI-equivalent random-resized-crop boxes, and one
crop + resize + flip op over a uint8 NHWC batch.

Imports torch, and cvcrop.py (numpy, Pillow; OpenCV on first use) for the CPU; no DALI, no shard
code, so every backend uses it. Every function takes tensors on any device and works there, with
no host sync except where marked. Contract: (N, H, W, 3) uint8 images top-left on a canvas, with
(N, 2) sizes -> (N, 3, S, S) uint8 channels_last, each resized value rounded to the nearest
integer; the model normalises (model.py). Crop boxes follow DALI 2.4's RandomCropGenerator; the
resize is DALI's antialiased linear ROI resize (pixel centres, border replicated at the image's
edge): `resample` in torch on CUDA, cvcrop.py's library calls on the CPU (within a grey level of
it). Reasons and measurements: docs/loaders.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastalex.loaders.cvcrop import crop_batch

CROP_ATTEMPTS = 10  # DALI's RandomCropGenerator default num_attempts
DRAWS_PER_SAMPLE = 1 + 4 * CROP_ATTEMPTS  # uniforms per sample in Augment.draw: flip, crop tries


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, 4) float32 crop boxes (x0, y0, w, h) in whole pixels for images of the given sizes,
    distributed as DALI's random_resized_crop windows: up to CROP_ATTEMPTS tries of (area
    fraction ~ U(scale), aspect w/h ~ exp(U(log ratio))), each rounded to whole pixels and accepted
    if it fits and its rounded aspect is in range; else DALI's fallback (the whole image, its
    aspect clamped into range, shrunk to the largest allowed area); then an anchor uniform over the
    whole-pixel positions.

    `heights`/`widths`: (N,) integer or float tensors, on the generator's device. Vectorised over
    the batch and the attempts; the generator (or `draws`: (4, N, CROP_ATTEMPTS) uniforms in
    [0, 1) drawn beforehand) is the only source of randomness, so a seeded generator gives the
    same boxes on every run.
    """
    device = heights.device
    n = heights.shape[0]
    img_h = heights.to(torch.float32)
    img_w = widths.to(torch.float32)
    area_lo, area_hi = scale
    ratio_lo, ratio_hi = ratio
    if draws is None:
        draws = torch.rand((4, n, CROP_ATTEMPTS), generator=generator, device=device)
    target = (area_lo + (area_hi - area_lo) * draws[0]) * (img_h * img_w)[:, None]
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[1])
    # DALI: std::roundf (half away from zero; the values are positive), at least one pixel.
    w = torch.floor(torch.sqrt(target * aspect) + 0.5).clamp_(min=1)
    h = torch.floor(torch.sqrt(target / aspect) + 0.5).clamp_(min=1)
    rounded = w / h
    ok = (w <= img_w[:, None]) & (h <= img_h[:, None])
    ok &= (rounded >= ratio_lo) & (rounded <= ratio_hi)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first accepted attempt
    crop_w = w.gather(1, first).squeeze(1)
    crop_h = h.gather(1, first).squeeze(1)

    # Fallback after CROP_ATTEMPTS failures, and DALI's two shapes that no attempt can satisfy.
    max_w = torch.floor(img_h * ratio_hi).clamp_(min=1)  # widest allowed crop, full height
    max_h = torch.floor(img_w / ratio_lo).clamp_(min=1)  # tallest allowed crop, full width
    image_ratio = img_w / img_h
    fb_w = torch.where(image_ratio > ratio_hi, max_w, img_w)
    fb_h = torch.where(image_ratio < ratio_lo, max_h, img_h)
    shrink = torch.clamp(area_hi * img_w * img_h / (fb_w * fb_h), max=1).sqrt()
    fb_w = torch.floor(fb_w * shrink).clamp_(min=1)
    fb_h = torch.floor(fb_h * shrink).clamp_(min=1)
    min_area = area_lo * img_w * img_h
    too_wide = img_h * max_w < min_area
    too_tall = ~too_wide & (img_w * max_h < min_area)
    failed = ~ok.any(dim=1)
    crop_w = torch.where(failed, fb_w, crop_w)
    crop_h = torch.where(failed, fb_h, crop_h)
    crop_w = torch.where(too_wide, max_w, torch.where(too_tall, img_w, crop_w))
    crop_h = torch.where(too_wide, img_h, torch.where(too_tall, max_h, crop_h))

    # Anchor uniform over the integer positions 0..(W - w), as std::uniform_int_distribution.
    x0 = torch.floor(draws[2, :, 0] * (img_w - crop_w + 1)).clamp_(max=img_w - crop_w)
    y0 = torch.floor(draws[3, :, 0] * (img_h - crop_h + 1)).clamp_(max=img_h - crop_h)
    return torch.stack([x0, y0, crop_w, crop_h], dim=1)


def full_boxes(heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes covering each whole image: the val transform (resize only)."""
    zeros = torch.zeros_like(heights, dtype=torch.float32)
    return torch.stack([zeros, zeros, widths.to(torch.float32), heights.to(torch.float32)], dim=1)


def resample_taps(
    start: torch.Tensor,
    length: torch.Tensor,
    out_px: int,
    limit: torch.Tensor,
    max_length: int,
    flip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input taps of a 1-D resampling of [start, start + length) to out_px samples per item.

    `max_length` (host int, >= every length: the canvas side) fixes the tap count K without reading
    the lengths back from the device, so no host sync. Returns (indices, weights), each
    (N, out_px, K), K the widest filter a crop of max_length needs (unused taps weigh 0): indices
    into 0..limit-1 (border replicated), weights summing to 1 per output. Triangle filter of radius
    max(1, length / out_px) input pixels: bilinear for upsampling, antialiased for downscaling.
    """
    device = start.device
    step = length / out_px  # (N,) input pixels per output pixel
    radius = step.clamp(min=1.0)
    taps = tap_count(max_length, out_px)
    j = torch.arange(out_px, device=device, dtype=torch.float32) + 0.5
    if flip is None:
        centre = start[:, None] + j * step[:, None]  # (N, S), continuous (pixel edges at integers)
    else:
        mirrored = torch.where(flip[:, None], out_px - j, j)
        centre = start[:, None] + mirrored * step[:, None]
    first = torch.floor(centre - 0.5 - radius[:, None]) + 1
    index = first[..., None] + torch.arange(taps, device=device, dtype=torch.float32)  # (N, S, K)
    weight = (1 - (index + 0.5 - centre[..., None]).abs() / radius[:, None, None]).clamp_(min=0)
    weight /= weight.sum(dim=2, keepdim=True)
    index = torch.minimum(index.clamp_(min=0), (limit.to(torch.float32) - 1)[:, None, None])
    return index.to(torch.int64), weight


def tap_count(max_length: int, out_px: int) -> int:
    """Taps per output of resample_taps: the integers strictly inside a support of width
    2 * radius, for the widest radius a crop of max_length px gives."""
    return max(2, math.ceil(2 * max(1.0, max_length / out_px)))


def box_taps(
    boxes: torch.Tensor,
    flips: torch.Tensor | None,
    heights: torch.Tensor,
    widths: torch.Tensor,
    out_px: int,
    canvas_px: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(col_index, col_weight, row_index, row_weight) of crop_resize's two passes: resample_taps
    along the width (mirrored where `flips`) and along the height of each box."""
    x0, y0, box_w, box_h = boxes.unbind(1)
    col_index, col_weight = resample_taps(x0, box_w, out_px, widths, canvas_px[1], flips)
    row_index, row_weight = resample_taps(y0, box_h, out_px, heights, canvas_px[0])
    return col_index, col_weight, row_index, row_weight


def to_pixels(values: torch.Tensor) -> torch.Tensor:
    """Resampled float values (0..255 up to float error) -> uint8, rounded to nearest, ties to
    even (torch.round; CUDA's and DALI's float -> uint8 conversion round to nearest too)."""
    return values.round().clamp(0, 255).to(torch.uint8)


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor | None,
    out_px: int,
    sizes: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Crop each box, resize it to out_px x out_px, mirror where `flips`, round to uint8.

    images: (M, H, W, 3) uint8, images placed top-left on an H x W canvas, of which `rows` ((N,)
    int64) are the batch's (None: all of them, M = N); boxes: (N, 4) float (x0, y0, w, h) in
    pixels; flips: (N,) bool or None; sizes: (N, 2) (height, width) of each image on the canvas
    (None = the whole canvas), where the border is replicated. Returns (N, 3, out_px, out_px)
    uint8, channels_last, on images.device. On the CPU through OpenCV and Pillow (cvcrop.py) in
    `threads` threads (default: torch's intra-op thread count), elsewhere `resample` there.
    """
    if images.device.type != "cpu":
        if rows is not None:
            images = images.index_select(0, rows)  # whole rows copied: 10x images[rows]
        return resample(images, boxes, flips, out_px, sizes)
    n = len(boxes)
    if sizes is None:
        sizes = torch.tensor(images.shape[1:3], dtype=torch.int32).expand(n, 2)
    out = torch.empty((n, out_px, out_px, 3), dtype=torch.uint8)
    crop_batch(
        out.numpy(),
        images.contiguous().numpy(),
        sizes.numpy(),
        boxes.numpy(),
        None if flips is None else flips.numpy(),
        None if rows is None else rows.numpy(),
        threads or torch.get_num_threads(),
    )
    return out.permute(0, 3, 1, 2)  # (N, 3, S, S) channels_last


def resample(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor | None,
    out_px: int,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """crop_resize in torch ops on images.device (CUDA's path, and the CPU's reference): the
    separable antialiased linear resize DALI's ROI resize does, rounded by `to_pixels`."""
    n, canvas_h, canvas_w, channels = images.shape
    device = images.device
    boxes = boxes.to(device=device, dtype=torch.float32)
    if sizes is None:
        heights = torch.full((n,), canvas_h, device=device)
        widths = torch.full((n,), canvas_w, device=device)
    else:
        heights, widths = sizes.to(device).unbind(1)
    flips = None if flips is None else flips.to(device)
    canvas = (canvas_h, canvas_w)
    col_index, col_weight, row_index, row_weight = box_taps(  # (N, S, K) each
        boxes, flips, heights, widths, out_px, canvas
    )

    # The source as float, written transposed: (N, W, H, 3) float32, so the width pass gathers
    # contiguous rows.
    source = torch.empty((n, canvas_w, canvas_h, channels), device=device, dtype=torch.float32)
    source.copy_(images.transpose(1, 2))
    source = source.view(n * canvas_w, canvas_h * channels)

    # Width pass: rows of the transposed source are image columns. (N*S, H*3) = (N, S, H, 3).
    base = (torch.arange(n, device=device) * canvas_w)[:, None, None]
    columns = F.embedding_bag(
        (col_index + base).view(n * out_px, -1),
        source,
        per_sample_weights=col_weight.reshape(n * out_px, -1),
        mode="sum",
    )
    # (N, H, S, 3): rows are image rows again, of out_px resampled pixels.
    rows = columns.view(n, out_px, canvas_h, channels).transpose(1, 2).contiguous()

    # Height pass: writes the output once. (N*S, S*3) = (N, S, S, 3) = NHWC.
    base = (torch.arange(n, device=device) * canvas_h)[:, None, None]
    out = F.embedding_bag(
        (row_index + base).view(n * out_px, -1),
        rows.view(n * canvas_h, out_px * channels),
        per_sample_weights=row_weight.reshape(n * out_px, -1),
        mode="sum",
    )
    pixels = to_pixels(out).view(n, out_px, out_px, channels)  # (N, S, S, 3) uint8
    return pixels.permute(0, 3, 1, 2)  # (N, 3, S, S) uint8 channels_last


@dataclass(frozen=True)
class Augment:
    """What every backend does to a decoded uint8 batch: train = random-resized-crop + flip, val =
    the whole image; then crop_resize to image_size, rounded to uint8. `draw` and `apply` are
    apart so a backend can draw on one device (the `cpu` loader's CPU generator) and apply on
    another."""

    train: bool
    image_size: int  # px, square output
    crop_scale: tuple[float, float]  # area fraction range (train)
    crop_ratio: tuple[float, float]  # aspect (w/h) range (train)

    def draw(
        self,
        heights: torch.Tensor,
        widths: torch.Tensor,
        generator: torch.Generator | None,
        offset: int = 0,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 4) crop boxes and (N,) flips (None for val), drawn on the generator's device:
        `boxes` of `uniforms(N, ...)`."""
        uniforms = self.uniforms(len(heights), generator, offset, total, heights.device)
        return self.boxes(heights, widths, uniforms)

    def uniforms(
        self,
        n: int,
        generator: torch.Generator | None,
        offset: int = 0,
        total: int | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor | None:
        """(n, DRAWS_PER_SAMPLE) float32 uniforms of n samples (None for val). The generator draws
        them for each of `total` samples (default n) and this batch takes rows [offset, offset +
        n): a rank's slice of a global batch then gets the draws the whole global batch would
        give those positions. Drawn before decoding: a sample's row depends on its position only,
        so a decode worker can turn its rows into boxes once it knows the images' sizes."""
        if not self.train:
            return None
        total = n if total is None else total
        if device is None and generator is not None:
            device = generator.device
        return torch.rand((total, DRAWS_PER_SAMPLE), generator=generator, device=device)[
            offset : offset + n
        ]

    def boxes(
        self, heights: torch.Tensor, widths: torch.Tensor, uniforms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 4) crop boxes and (N,) flips of images of these sizes from their `uniforms` rows;
        val (uniforms None): the whole images, no flips."""
        if uniforms is None:
            return full_boxes(heights, widths), None
        n = len(heights)
        draws = uniforms[:, 1:].reshape(n, 4, CROP_ATTEMPTS).transpose(0, 1)
        boxes = sample_crop_boxes(heights, widths, self.crop_scale, self.crop_ratio, draws=draws)
        return boxes, uniforms[:, 0] < 0.5

    def apply(
        self,
        images: torch.Tensor,
        boxes: torch.Tensor,
        flips: torch.Tensor | None,
        sizes: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        threads: int | None = None,
    ) -> torch.Tensor:
        """(M, H, W, 3) uint8 -> (N, 3, S, S) uint8 channels_last; sizes, rows and threads as
        crop_resize takes them."""
        return crop_resize(images, boxes, flips, self.image_size, sizes, rows, threads)


def ragged_sizes(sizes: torch.Tensor, canvas_px: tuple[int, int]) -> torch.Tensor | None:
    """`sizes` ((N, 2) height, width) when some image does not fill the canvas, else None (the
    fast path). Reads the values: call it on host tensors, not inside a device loop."""
    height, width = canvas_px
    return None if bool((sizes[:, 0] == height).all() and (sizes[:, 1] == width).all()) else sizes
