"""`fastalex export`: a checkpoint's model as a self-contained program that runs without fastalex,
with its normalisation inside, plus a JSON sidecar naming the classes and the preprocessing.

Imports torch and predict.py (which loads the checkpoint and its model card); ONNX output needs the
optional ``onnx`` extra (onnx, onnxscript; onnxruntime to run it), imported only for
``--format onnx``. Never imports a loader or the trainer.

The program's contract and the choices behind it: docs/using-the-model.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from fastalex.errors import UserError
from fastalex.model import eval_logits
from fastalex.predict import load_model

SIDECAR_FORMAT = "fastalex-export/1"
SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx"}
LAYOUTS = ("nhwc", "nchw")
EXAMPLE_BATCH = 2  # the traced batch; batch 1 would be specialised (torch.export's 0/1 rule)
ONNX_HINT = "pip install 'fastalex[onnx]'  (onnx, onnxscript, onnxruntime)"


class PixelModel(nn.Module):
    """uint8 RGB pixels -> logits: layout to NCHW, the model (which normalises first), optional
    flip TTA."""

    def __init__(self, model: nn.Module, layout: str, flip_tta: bool) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.model, self.layout, self.flip_tta = model, layout, flip_tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":
            images = images.permute(0, 3, 1, 2)  # (N, S, S, 3) -> (N, 3, S, S) view
        return eval_logits(self.model, images, self.flip_tta)


def pixel_model(
    checkpoint: Path, layout: str = "nhwc", flip_tta: bool | None = None
) -> tuple[PixelModel, dict]:
    """The checkpoint's model wrapped to take uint8 pixels, float32 (no autocast traced: the
    program computes in float32 wherever it runs), eval mode, on the CPU, and its model card.
    flip_tta None: as the run evaluated."""
    loaded = load_model(checkpoint, "cpu")
    card = loaded.card
    tta = card["flip_tta"] if flip_tta is None else flip_tta
    model = loaded.model.float().to(memory_format=torch.contiguous_format)
    return PixelModel(model, layout, tta).eval(), {
        **card,
        "flip_tta": tta,
    }


def example_input(image_size: int, layout: str, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    shape = (
        (batch, image_size, image_size, 3)
        if layout == "nhwc"
        else (batch, 3, image_size, image_size)
    )
    seeded = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=seeded)


def program_path(out: Path, fmt: str) -> Path:
    """OUT with the format's suffix added when it has none; UserError for another format's."""
    out = Path(out)
    if fmt not in SUFFIXES:
        raise UserError(f"format must be one of {tuple(SUFFIXES)}, got {fmt!r}")
    if out.suffix.lower() == SUFFIXES[fmt]:
        return out
    other = {v: k for k, v in SUFFIXES.items()}.get(out.suffix.lower())
    if other:
        raise UserError(
            f"{out}: a {out.suffix} name, but --format {fmt}; pass --format {other} "
            f"or name it *{SUFFIXES[fmt]}"
        )
    return out.with_name(out.name + SUFFIXES[fmt])


def export_model(
    checkpoint: Path,
    out: Path,
    fmt: str = "pt2",
    layout: str = "nhwc",
    flip_tta: bool | None = None,
) -> tuple[Path, Path, dict]:
    """Write the program (`fmt` "pt2" or "onnx") and its sidecar; returns their paths and the
    sidecar's content."""
    path = program_path(out, fmt)
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    wrapped, card = pixel_model(checkpoint, layout, flip_tta)
    example = example_input(card["image_size"], layout)
    batch = torch.export.Dim("batch", min=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # torch.export.save wants a .pt2 name
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(
                wrapped, (example,), dynamic_shapes={"images": {0: batch}}
            )
            torch.export.save(program, tmp)
        else:
            write_onnx(wrapped, example, batch, tmp)
    os.replace(tmp, path)
    sidecar_path = path.with_name(path.name + ".json")
    tmp = sidecar_path.with_name(sidecar_path.name + ".tmp")
    info = sidecar(card, path.name, fmt, layout, checkpoint)
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, sidecar_path)
    return path, sidecar_path, info


def write_onnx(wrapped: nn.Module, example: torch.Tensor, batch, path: Path) -> None:
    """torch.onnx's dynamo exporter, its progress lines and missing-torchvision warnings muted."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"--format onnx needs {module}: {ONNX_HINT}") from None
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations inside torch.onnx, not ours to fix
            torch.onnx.export(
                wrapped,
                (example,),
                str(path),
                dynamo=True,
                verbose=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes={"images": {0: batch}},
                external_data=False,
            )
    finally:
        quiet.setLevel(level)


def sidecar(card: dict, program: str, fmt: str, layout: str, checkpoint: Path) -> dict:
    """What a deployment needs beside the program: input/output contract, preprocessing, classes."""
    size = card["image_size"]
    shape = ["N", size, size, 3] if layout == "nhwc" else ["N", 3, size, size]
    return {
        "format": SIDECAR_FORMAT,
        "program": program,
        "program_format": "torch.export" if fmt == "pt2" else "onnx",
        "load": (
            "torch.export.load(program).module()"
            if fmt == "pt2"
            else "onnxruntime.InferenceSession(program)"
        ),
        "arch": card["arch"],
        "image_size": size,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": layout.upper(),
            "shape": shape,
            "channels": "RGB",
            "range": [0, 255],
        },
        "output": {
            "name": "logits",
            "dtype": "float32",
            "shape": ["N", len(card["classes"])],
            "probabilities": "softmax over the last axis",
        },
        "preprocessing": {
            "decode": "first frame, EXIF orientation applied, alpha composited on white, RGB",
            "resize": f"the whole image (no crop) to {size}x{size} with an antialiased linear "
            "(triangle) filter, the edge pixel replicated beyond the border; "
            "PIL.Image.resize((S, S), Image.Resampling.BILINEAR) matches it to 1 grey "
            "level except in the outermost pixels of a downscaled image",
            "inside_the_program": "x / 255, minus mean, divided by std, per channel",
            "mean": card["mean"],
            "std": card["std"],
        },
        "flip_tta": card["flip_tta"],
        "classes": [
            {"index": index, "id": wnid, "name": name}
            for index, (wnid, name) in enumerate(card["classes"])
        ],
        "checkpoint": str(checkpoint),
        "torch": torch.__version__,
    }
