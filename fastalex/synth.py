"""`fastalex synth`: a learnable stand-in for Tiny ImageNet, written as a tree in its exact layout,
so sources/tinyimagenet.py reads it as it reads the real one.

Each class is a combination of shape, stripe orientation and hue; `render_image` draws one 64x64
RGB uint8 image of a class (and its box) at a random position and scale over a random background,
`encode_jpeg` stores it, about 1 % as grayscale as in the real set. The same seed writes the same
bytes whatever the number of workers. Imports numpy, PIL and errors; nothing of sources or pack.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastalex.errors import UserError

SYNTH_PX = 64  # Tiny ImageNet images are 64x64 RGB JPEGs
SYNTH_GRAY_FRACTION = 0.01  # about 1 % of Tiny ImageNet's JPEGs are single-channel
SHAPES = ("disc", "square", "diamond", "ring", "cross", "bar", "triangle", "blob")
TEXTURES = 5  # stripe orientations 0, 45, 90, 135 degrees, and plain
HUES = 5


def synth_wnids(classes: int) -> list[str]:
    return [f"n{90000000 + c:08d}" for c in range(classes)]


def _class_traits(label: int) -> tuple[int, int, float]:
    """(shape, texture, hue) of a class: 5 hues x 8 shapes x 5 textures = 200 distinct combinations.
    The hue varies fastest, so a stand-in with few classes is still easy to tell apart."""
    hue_bin = label % HUES
    shape = (label // HUES) % len(SHAPES)
    texture = (label // (HUES * len(SHAPES))) % TEXTURES
    extra = label // (len(SHAPES) * TEXTURES * HUES)  # beyond 200 classes: shift the hue
    return shape, texture, (hue_bin / HUES + extra * 0.618) % 1.0


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


_GRID = (np.mgrid[0:SYNTH_PX, 0:SYNTH_PX].astype(np.float32) + 0.5) / SYNTH_PX  # (2, 64, 64) y, x


def render_image(
    label: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One 64x64 RGB uint8 image of class `label`, and the shape's bounding box (x0, y0, x1, y1)."""
    shape, texture, hue = _class_traits(label)
    size = rng.uniform(0.22, 0.4)
    cy, cx = rng.uniform(size, 1 - size, 2)
    v = (_GRID[0] - cy) / size
    u = (_GRID[1] - cx) / size
    r = np.hypot(u, v)
    masks = {
        "disc": r < 1,
        "square": np.maximum(abs(u), abs(v)) < 0.85,
        "diamond": abs(u) + abs(v) < 1.1,
        "ring": (r < 1) & (r > 0.55),
        "cross": (np.minimum(abs(u), abs(v)) < 0.3) & (np.maximum(abs(u), abs(v)) < 1),
        "bar": (abs(v) < 0.35) & (abs(u) < 1),
        "triangle": (v < 0.8) & (v > 2 * abs(u) - 1.1),
        "blob": r < 0.8 + 0.2 * np.cos(3 * np.arctan2(v, u)),
    }
    mask = masks[SHAPES[shape]]
    if texture < 4:
        angle = texture * np.pi / 4
        stripes = np.sin(9 * (u * np.cos(angle) + v * np.sin(angle)) + rng.uniform(0, 6.3))
        shade = 0.75 + 0.25 * np.sign(stripes)
    else:
        shade = np.ones_like(u)
    fg = _hsv_to_rgb(hue + rng.normal(0, 0.02), rng.uniform(0.6, 1), rng.uniform(0.7, 1))
    bg = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.2, 0.8))
    image = np.where(mask[..., None], fg * shade[..., None], bg)
    image = image + rng.normal(0, 0.06, image.shape)
    pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    box = (
        (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (0, 0, 63, 63)
    )
    return pixels, box


def encode_jpeg(pixels: np.ndarray, gray: bool, quality: int = 90) -> bytes:
    image = Image.fromarray(pixels)
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def synth_class(out: str, label: int, train_per_class: int, seed: int) -> int:
    """Write one class's train images and boxes file; returns the number of images written."""
    wnid = synth_wnids(label + 1)[label]
    folder = Path(out, "train", wnid, "images")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0, label])
    boxes = []
    for i in range(train_per_class):
        pixels, box = render_image(label, rng)
        name = f"{wnid}_{i}.JPEG"
        (folder / name).write_bytes(encode_jpeg(pixels, rng.random() < SYNTH_GRAY_FRACTION))
        boxes.append(f"{name}\t" + "\t".join(map(str, box)))
    (folder.parent / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    return train_per_class


def synth_images(out: str, split: str, labels: list[int], start: int, seed: int) -> list[str]:
    """Write `{split}_{start + i}.JPEG` for each label; returns annotation lines (val only)."""
    folder = Path(out, split, "images")
    rng = np.random.default_rng([seed, 1 if split == "val" else 2, start])
    wnids = synth_wnids(max(labels) + 1) if labels else []
    lines = []
    for i, label in enumerate(labels):
        pixels, box = render_image(label, rng)
        name = f"{split}_{start + i}.JPEG"
        (folder / name).write_bytes(encode_jpeg(pixels, rng.random() < SYNTH_GRAY_FRACTION))
        lines.append(f"{name}\t{wnids[label]}\t" + "\t".join(map(str, box)))
    return lines


def synth(
    out: str | os.PathLike,
    classes: int = 200,
    train_per_class: int = 500,
    val_per_class: int = 50,
    test_images: int = 0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> int:
    """Write a Tiny-ImageNet-layout tree of generated images to `out`; returns the image count.

    Each class is a combination of shape, stripe orientation and hue, drawn at a random position
    and scale over a random background with pixel noise, so a CNN can learn it but not from one
    pixel. Deterministic for a seed, whatever the number of workers.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new directory")
    if classes < 1 or train_per_class < 1 or val_per_class < 0 or test_images < 0:
        raise UserError("synth needs classes >= 1, train-per-class >= 1 and non-negative counts")
    try:
        return _write_synth(
            out, classes, train_per_class, val_per_class, test_images, seed, workers, progress
        )
    except OSError as e:  # unwritable, read-only or full: the user's to fix, not a bug
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
        raise UserError(f"{out}: cannot write there: {e.strerror or e}{where}") from None


def _write_synth(
    out: Path,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    test_images: int,
    seed: int,
    workers: int,
    progress: bool,
) -> int:
    from multiprocessing import get_context

    from tqdm import tqdm

    wnids = synth_wnids(classes)
    for split in ("val", "test"):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (out / "words.txt").write_text(
        "".join(
            f"{w}\tsynthetic {SHAPES[s]}, texture {t}, hue {h:.2f}\n"
            for w, (s, t, h) in zip(wnids, map(_class_traits, range(classes)))
        )
    )
    rng = np.random.default_rng([seed, 3])
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class)).tolist()
    test_labels = rng.integers(0, classes, test_images).tolist()
    chunk = 500
    jobs = [(synth_class, (str(out), c, train_per_class, seed)) for c in range(classes)]
    for split, labels in (("val", val_labels), ("test", test_labels)):
        for start in range(0, len(labels), chunk):
            jobs.append(
                (synth_images, (str(out), split, labels[start : start + chunk], start, seed))
            )
    total = classes * train_per_class + len(val_labels) + len(test_labels)
    annotations: dict[int, list[str]] = {}
    with (
        get_context("fork").Pool(max(1, workers)) as pool,
        tqdm(total=total, unit="img", desc="synth (stand-in data)", disable=not progress) as bar,
    ):
        for number, result in pool.imap_unordered(_run_job, list(enumerate(jobs))):
            if isinstance(result, list):
                annotations[number] = result
                bar.update(len(result))
            else:
                bar.update(result)
    val_lines = [
        line for n in sorted(annotations) for line in annotations[n] if line.startswith("val_")
    ]
    (out / "val" / "val_annotations.txt").write_text("".join(line + "\n" for line in val_lines))
    return total


def _run_job(numbered_job):
    number, (function, args) = numbered_job
    return number, function(*args)
