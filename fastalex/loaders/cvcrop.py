"""Crop + resize + flip of decoded images on the CPU through libraries vectorised for the CPU they
run on: augment.crop_resize on the CPU device (the `cpu` loader's decode workers or threads, and
the main process of `resident` and of `dali`'s CPU-only mode).

Imports numpy, Pillow and cv2 (opencv-python-headless, on first use); boxes and flips come from
augment.Augment, so every backend, process count and resume sees the same crops. Per image:
a box no larger than the output S (upsampling or 1:1: all of Tiny ImageNet) is one
`cv2.warpAffine` (kernels picked at run time for SSE4/AVX2/AVX-512/NEON): augment.resample's
geometry and bilinear kernel, the flip folded into the map, within 1 grey level of it, a 1:1 copy
exact. A box that downscales goes through Pillow's BILINEAR `resize(box=...)`, the same
antialiased triangle: within 1 grey level but at the outermost pixels of a box at the image's
edge (Pillow renormalises there instead of replicating). OpenCV runs one thread per call
(`cv2.setNumThreads(1)`, process-wide): callers spread images over their own workers or threads.
Reasons and measurements: docs/loaders.md, "The crop on the CPU".
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

# This process's crop threads, by count, made on first use; a forked child (a decode worker)
# starts without them, since their threads do not survive the fork.
_pools: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_pools.clear)


def opencv():
    """cv2, imported on first use and set to one thread per call."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def inverse_maps(boxes: np.ndarray, flips: np.ndarray | None, out_px: int) -> np.ndarray:
    """(N, 2, 3) float64: for each box, the affine map from an output pixel (column u, row v) to
    the source position it samples, in OpenCV's convention (pixel centres at integers): x = x0 +
    (u + 0.5) * w / S - 0.5, mirrored (u -> S - 1 - u) where flipped; y likewise, never
    mirrored."""
    x0, y0, width, height = boxes.astype(np.float64).T
    step_x, step_y = width / out_px, height / out_px
    maps = np.zeros((len(boxes), 2, 3))
    flipped = np.zeros(len(boxes), bool) if flips is None else flips.astype(bool)
    maps[:, 0, 0] = np.where(flipped, -step_x, step_x)
    maps[:, 0, 2] = x0 - 0.5 + np.where(flipped, out_px - 0.5, 0.5) * step_x
    maps[:, 1, 1] = step_y
    maps[:, 1, 2] = y0 - 0.5 + 0.5 * step_y
    return maps


def crop_into(
    out: np.ndarray,
    images: np.ndarray,
    sizes: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray | None,
    rows: np.ndarray | None = None,
) -> None:
    """Write each image's crop, resized to out's S x S and mirrored where `flips`, into out[k].

    out: (N, S, S, 3) uint8, C-contiguous; images: (M, H, W, 3) uint8 canvases, image k top-left
    on images[rows[k]] (rows None: images[k]) with (height, width) sizes[k]; boxes: (N, 4)
    (x0, y0, w, h) in whole pixels; flips: (N,) bool or None.
    """
    cv2 = opencv()
    out_px = out.shape[1]
    maps = inverse_maps(boxes, flips, out_px)
    corners = boxes.astype(np.int64).tolist()
    shapes = sizes.tolist()
    flipped = [False] * len(out) if flips is None else flips.tolist()
    picks = range(len(out)) if rows is None else rows.tolist()
    bilinear = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    replicate, size = cv2.BORDER_REPLICATE, (out_px, out_px)
    warp = cv2.warpAffine
    for k, (x0, y0, width, height) in enumerate(corners):
        h, w = shapes[k]
        image = images[picks[k], :h, :w]
        if width <= out_px and height <= out_px:
            # Positional: OpenCV's bindings parse keywords more slowly (~5 % of a 64 px warp).
            warp(image, maps[k], size, out[k], bilinear, replicate)
            continue
        box = (x0, y0, x0 + width, y0 + height)
        pixels = np.asarray(
            Image.fromarray(image).resize((out_px, out_px), Image.Resampling.BILINEAR, box=box)
        )
        out[k] = pixels[:, ::-1] if flipped[k] else pixels


def crop_batch(
    out: np.ndarray,
    images: np.ndarray,
    sizes: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray | None,
    rows: np.ndarray | None,
    threads: int,
) -> None:
    """crop_into over `threads` contiguous chunks of the batch, run in this process's crop threads
    (OpenCV and Pillow release the GIL while they resample); one thread runs it here."""
    n = len(out)
    if threads <= 1 or n < 2:
        crop_into(out, images, sizes, boxes, flips, rows)
        return
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fastalex-crop")
    bounds = np.linspace(0, n, min(threads, n) + 1).astype(int)
    futures = [
        pool.submit(
            crop_into,
            out[a:b],
            images,
            sizes[a:b],
            boxes[a:b],
            None if flips is None else flips[a:b],
            np.arange(a, b) if rows is None else rows[a:b],
        )
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    for future in futures:
        future.result()
