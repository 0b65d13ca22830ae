"""Inference from a checkpoint: the top-k classes of image files (`fastalex predict`), and the model
with its eval transform that export.py wraps.

Imports torch, numpy, checkpoint.py (the model card, the model built from it, the config for
inference on this machine), the model's `eval_logits`, the val transform
(`loaders.augment.crop_resize`, `full_boxes`, `ragged_sizes`), images.py (header check and decode,
shared with pack), imagefolder's IMAGE_EXTENSIONS (which files of a directory are images, as pack
decides) and runtime.py; never a loader backend, the shard reader or the trainer. Needs no pack:
a checkpoint carries arch, image size, normalisation, flip-TTA setting and class names
(`checkpoint.model_card`).

What predict does to an image, and the choices behind it: docs/using-the-model.md.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastalex.checkpoint import inference_config, load_checkpoint, model_card, model_from_card
from fastalex.config import PackConfig, default_workers
from fastalex.errors import UserError
from fastalex.images import Rejected, decode_image, max_file_bytes
from fastalex.loaders.augment import crop_resize, full_boxes, ragged_sizes
from fastalex.model import eval_logits
from fastalex.runtime import Runtime, configure_backends, resolve_runtime
from fastalex.sources.imagefolder import IMAGE_EXTENSIONS

BATCH_SIZE = 64  # images per forward: 64 canvases of pack's max_side (512 px) are 48 MiB of uint8
GLOB_CHARS = "*?["  # a path holding one of these that names no file is a glob pattern
FORMATS = ("text", "json", "csv")
CSV_HEADER = ("path", "rank", "index", "class", "name", "probability")


@dataclass
class InferenceModel:
    """A checkpoint's model in eval mode on its device, with what its eval transform needs."""

    model: torch.nn.Module
    card: dict  # checkpoint.model_card: arch, image_size, flip_tta, mean, std, classes
    runtime: Runtime

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 pixels on the device -> (N, classes) float32 logits, averaged
        with the mirror's when the run evaluated with flip TTA (as train.evaluate does)."""
        images = images.contiguous(memory_format=self.runtime.memory_format)
        with self.runtime.autocast():
            return eval_logits(self.model, images, self.card["flip_tta"])

    def preprocess(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded images, each (H, W, 3) uint8 RGB of any size, -> (N, 3, S, S) uint8 on the
        device: the val transform (whole image, antialiased resize), as the loaders hand it."""
        heights = [p.shape[0] for p in pixels]
        widths = [p.shape[1] for p in pixels]
        canvas = np.zeros((len(pixels), max(heights), max(widths), 3), np.uint8)
        for slot, image in zip(canvas, pixels):  # top-left, as the cpu loader's canvases hold them
            slot[: image.shape[0], : image.shape[1]] = image
        sizes = torch.tensor([heights, widths], dtype=torch.int64).T  # (N, 2) height, width
        boxes = full_boxes(sizes[:, 0], sizes[:, 1])  # the whole image: the val transform
        sizes = ragged_sizes(sizes, canvas.shape[1:3])
        device = self.runtime.device
        return crop_resize(
            torch.from_numpy(canvas).to(device),
            boxes,
            None,
            self.card["image_size"],
            sizes,
        )

    def predict(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded images -> (N, classes) float32 logits on the device."""
        return self.logits(self.preprocess(pixels))


def load_model(checkpoint: Path, device: str = "auto") -> InferenceModel:
    """The checkpoint's model in eval mode on `device` ("auto", "cpu" or "cuda"), under the
    autocast this machine's rule picks (`checkpoint.inference_config`: float32 on a CPU, bf16 or
    fp16 on CUDA by compute capability), never the one the run's machine chose; UserError for a
    missing, foreign or pre-card checkpoint."""
    state = load_checkpoint(Path(checkpoint))
    card = model_card(state, Path(checkpoint))
    runtime = resolve_runtime(inference_config(state, Path(checkpoint), device=device))
    configure_backends(runtime)
    model = model_from_card(state, Path(checkpoint))
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    return InferenceModel(model, card, runtime)


def find_images(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files `paths` name, each once, in order: a file as given; a directory's files with
    an image extension, recursively, sorted; a glob pattern's matches, sorted (``**`` recursive),
    a matched directory searched as above. Returns (files, problems): (path, reason) for each path
    that names nothing or a directory without images."""
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)

    def expand(directory: str) -> None:
        found = directory_images(directory)
        if not found:
            problems.append(
                (
                    directory,
                    "no image files in this directory (by extension: "
                    f"{', '.join(IMAGE_EXTENSIONS)})",
                )
            )
        for path in found:
            add(path)

    for given in paths:
        if os.path.isdir(given):
            expand(given)
        elif os.path.lexists(given):
            add(given)
        elif any(char in given for char in GLOB_CHARS):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                problems.append((given, "no file matches this pattern"))
            for match in matches:
                if os.path.isdir(match):
                    expand(match)
                else:
                    add(match)
        else:
            problems.append((given, "no such file or directory"))
    return files, problems


def directory_images(directory: str) -> list[str]:
    """Files under `directory` with an image extension (any case), sorted; hidden ones skipped."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, name)
            for name in names
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def read_image(
    path: str, max_side: int = PackConfig.max_side, max_pixels: int = PackConfig.max_pixels
) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB, upright, longer side at most `max_side` (0: full
    size). Rejected (or OSError) with the reason when it cannot be used; the header is checked
    against `max_pixels` before any pixel is decoded, and a file too large to be such an image is
    not read at all."""
    if not os.path.isfile(path):
        raise Rejected("not a regular file")
    size = os.path.getsize(path)
    if size > max_file_bytes(max_pixels):
        raise Rejected(f"{size} bytes, more than an image of at most {max_pixels} pixels takes")
    with open(path, "rb") as f:
        data = f.read()
    image = decode_image(data, max_pixels, max_side)  # "RGB" or "L", upright
    return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class Prediction:
    path: str
    indices: list[int]  # class indices, most probable first
    probabilities: list[float]  # softmax of the logits, same order


def predict_files(
    model: InferenceModel,
    files: Sequence[str],
    top: int = 5,
    batch_size: int = BATCH_SIZE,
    workers: int = 0,
    max_side: int = PackConfig.max_side,
    skipped: Callable[[str, str], None] = lambda path, reason: None,
    progress: bool = False,
) -> Iterator[Prediction]:
    """The top-`top` classes of each readable file, in order; `skipped(path, reason)` for each file
    that cannot be read or decoded. Files are decoded by `workers` threads (0: every core), one
    batch ahead of the model; `progress` shows one bar for all files."""
    top = min(top, len(model.card["classes"]))
    with tqdm(
        total=len(files), unit="img", disable=not progress, leave=False, dynamic_ncols=True
    ) as bar:
        for names, decoded in decoded_batches(
            files, batch_size, workers or default_workers(), max_side
        ):
            good = []
            for name, result in zip(names, decoded):
                if isinstance(result, np.ndarray):
                    good.append((name, result))
                else:
                    skipped(name, result)
            if good:
                logits = model.predict([pixels for _, pixels in good])  # (N, classes)
                best = logits.softmax(dim=1).topk(top, dim=1)
                values, indices = best.values.tolist(), best.indices.tolist()  # sync point
                for (name, _), probabilities, classes in zip(good, values, indices):
                    yield Prediction(name, classes, probabilities)
            bar.update(len(names))


def decoded_batches(
    files: Sequence[str], batch_size: int, workers: int, max_side: int
) -> Iterator[tuple[list[str], list[np.ndarray | str]]]:
    """(names, each one's pixels or the reason it failed), `batch_size` files at a time; the next
    batch decodes on the thread pool while the caller runs the model on this one (Pillow releases
    the GIL while it decodes)."""

    def read(path: str) -> np.ndarray | str:
        try:
            return read_image(path, max_side)
        except Rejected as e:
            return str(e)
        except OSError as e:
            return e.strerror or str(e)

    chunks = (list(files[i : i + batch_size]) for i in range(0, len(files), batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(read, path) for path in chunk]))
            if len(pending) == 2:
                names, futures = pending.popleft()
                yield names, [future.result() for future in futures]
        while pending:
            names, futures = pending.popleft()
            yield names, [future.result() for future in futures]


def format_prediction(prediction: Prediction, classes: list, output: str) -> list[str]:
    """The lines one prediction prints as: "text" (the path, then one line per class: probability,
    name, class id), "json" (one object) or "csv" (one row per class, CSV_HEADER's columns)."""
    rows = [
        (rank, index, *classes[index], probability)
        for rank, (index, probability) in enumerate(
            zip(prediction.indices, prediction.probabilities), 1
        )
    ]
    if output == "json":
        return [
            json.dumps(
                {
                    "path": prediction.path,
                    "top": [
                        {
                            "rank": rank,
                            "index": index,
                            "class": wnid,
                            "name": name,
                            "probability": p,
                        }
                        for rank, index, wnid, name, p in rows
                    ],
                },
                ensure_ascii=False,
            )
        ]
    if output == "csv":
        return [
            csv_line(prediction.path, rank, index, wnid, name, f"{p:.6f}")
            for rank, index, wnid, name, p in rows
        ]
    return [prediction.path] + [
        f"  {100 * p:6.2f} %  " + (f"{name}  ({wnid})" if name else wnid)
        for _, _, wnid, name, p in rows
    ]


def above_the_bar(emit: Callable[[str], None]) -> Callable[[str], None]:
    """`emit` with any progress bar cleared first and redrawn after, so lines never tear it."""

    def emit_above(line: str) -> None:
        with tqdm.external_write_mode():
            emit(line)

    return emit_above


def csv_line(*values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def predict_paths(
    checkpoint: Path,
    paths: Sequence[str],
    *,
    top: int = 5,
    output: str = "text",
    batch_size: int = BATCH_SIZE,
    device: str = "auto",
    workers: int = 0,
    max_side: int = PackConfig.max_side,
    write: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
    progress: bool = False,
) -> int:
    """`fastalex predict`: every line of the predictions of the images `paths` name goes to
    `write`, each path that names nothing or does not decode to `warn` ("skipped PATH: reason").
    Returns how many paths were skipped. UserError for bad options or checkpoint."""
    if output not in FORMATS:
        raise UserError(f"output must be one of {FORMATS}, got {output!r}")
    if top < 1 or batch_size < 1 or workers < 0 or max_side < 0:
        raise UserError("--top and --batch-size must be >= 1, --workers and --max-side >= 0")
    write, warn = above_the_bar(write), above_the_bar(warn)
    model = load_model(checkpoint, device)
    files, problems = find_images(paths)
    for path, reason in problems:
        warn(f"skipped {path}: {reason}")
    if output == "csv":
        write(csv_line(*CSV_HEADER))
    failed = []

    def skipped(path: str, reason: str) -> None:
        failed.append(path)
        warn(f"skipped {path}: {reason}")

    classes = model.card["classes"]
    for prediction in predict_files(
        model, files, top, batch_size, workers, max_side, skipped, progress
    ):
        for line in format_prediction(prediction, classes, output):
            write(line)
    return len(problems) + len(failed)
