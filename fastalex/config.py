"""Run configuration: frozen dataclasses for pack and train, their validation, and the recipes.

Owns every default of the project; nothing else holds a default value. Imports only the standard
library. fastalex.cli builds one option per field (``--batch-size`` <-> ``batch_size``); below
it the code receives a config, never argv, environment variables or globals.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

# Tiny ImageNet training-set statistics (RGB, 0..1); ImageNet's (0.485, 0.456, 0.406) /
# (0.229, 0.224, 0.225), which the reference blog uses, differ by under 0.03 per channel.
IMAGE_MEAN = (0.4802, 0.4481, 0.3975)
IMAGE_STD = (0.2770, 0.2691, 0.2821)
# Smallest input each arch accepts: alexnet64's pool5 is empty below 32 px (model.py); alexnet is
# held to 63 px, a quarter of the paper's 227 at which its 11x11/4 stem still sees a 15x15 map;
# alexnet-tv's pool5 (rounding down) is empty below 63 px.
MIN_IMAGE_SIZE = {"alexnet64": 32, "alexnet": 63, "alexnet-tv": 63}


def option(default: Any, help: str) -> Any:
    """A config field with its default and its ``--help`` text (fastalex.cli reads the metadata)."""
    return field(default=default, metadata={"help": help})


def default_workers() -> int:
    """All the cores this process may use (the CPU affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    """How `fastalex pack` turns a Tiny ImageNet or ImageFolder tree into shards."""

    shard_size: int = option(5000, "samples per shard: 20 train + 2 val shards for the full set")
    workers: int = option(0, "processes decoding and writing; 0 = every core")
    seed: int = option(0, "pack-time shuffle (and the --val-fraction hold-out)")
    strict: bool = option(False, "fail on the first rejected file instead of listing it")
    overwrite: bool = option(False, "replace a different pack already in OUT")
    # max_side 512 keeps Tiny ImageNet (64 px) byte-identical and stores a 4000 x 3000 photo as
    # 512 x 384; max_pixels 2**27 (128 Mpx) passes the largest common photo (108 Mpx, 12032 x
    # 9024) and bounds one decode to 384 MiB of RGB.
    max_side: int = option(
        512, "px: images with a longer side are stored downscaled to it; 0 = keep originals"
    )
    jpeg_quality: int = option(
        95, "of the JPEGs pack writes (transcoded, downscaled or rotated upright)"
    )
    transcode: bool = option(
        True, "store PNG/WebP/BMP/TIFF/GIF/PPM images as JPEG; off = reject them"
    )
    val_fraction: float = option(
        0.0, "share of each class held out as val, for an ImageFolder tree without val/"
    )
    max_pixels: int = option(
        134_217_728, "larger images (width x height, from the header) are rejected undecoded"
    )

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = every core), got {self.workers}")
        if self.max_side < 0:
            raise ValueError(f"max_side must be >= 0 (0 = keep originals), got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(
                f"val_fraction must be in [0, 1) (0 = the tree's own val/), got {self.val_fraction}"
            )
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    @property
    def processes(self) -> int:
        return self.workers or default_workers()


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. The defaults are the `fast` recipe; `RECIPES` holds the others."""

    shards: str = option("", "directory written by `fastalex pack`")
    out: str = option("", "run directory; empty = runs/<utc>_<sha7>")
    recipe: Literal["fast", "reference"] = option(
        "fast", "preset that fills every option not given"
    )
    arch: Literal["alexnet64", "alexnet", "alexnet-tv"] = option(
        "alexnet64",
        "alexnet = paper layout for 227 px; alexnet-tv = torchvision's layout (its weights load)",
    )
    image_size: int = option(
        64, "px, square model input (64 native, 227 upsampled as in the paper)"
    )
    epochs: int = option(16, "full passes over the train split")
    batch_size: int = option(
        256, "images per step across all processes (each of N processes takes 1/N)"
    )
    lr: float = option(0.08, "peak learning rate per 256 images (scaled linearly with batch_size)")
    lr_schedule: Literal["warmup-linear", "step"] = option("warmup-linear", "shape of the LR curve")
    warmup_epochs: float = option(1.0, "epochs of linear warm-up from 0 (warmup-linear only)")
    step_epochs: int = option(7, "epochs between LR drops (step only)")
    step_gamma: float = option(0.1, "LR factor at each drop (step only)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 on conv/linear weights")
    decay_biases: bool = option(False, "also apply weight decay to biases")
    label_smoothing: float = option(0.1, "cross-entropy target smoothing")
    crop_scale_min: float = option(0.35, "random-resized-crop area fraction, lower bound")
    crop_scale_max: float = option(1.0, "random-resized-crop area fraction, upper bound")
    crop_ratio_min: float = option(0.75, "random-resized-crop aspect ratio (w/h), lower bound")
    crop_ratio_max: float = option(4 / 3, "random-resized-crop aspect ratio (w/h), upper bound")
    flip_tta: bool = option(True, "average logits of the image and its mirror at eval")
    loader: Literal["auto", "dali", "cpu", "resident"] = option(
        "auto",
        "data backend; auto = resident when the decoded splits fit (device memory; half the free "
        "RAM on a CPU), else dali on CUDA, the measured faster of dali and cpu on a CPU",
    )
    loader_workers: int = option(
        0,
        "decode processes (cpu, resident) or threads (dali); 0 = this process's share of the cores",
    )
    decode: Literal["auto", "processes", "threads"] = option(
        "auto",
        "how the cpu loader decodes: worker processes writing into a shared-memory ring, or "
        "threads of the training process writing into its batch buffers (simplejpeg releases "
        "the GIL); auto = processes, or threads where shared memory has no room for the ring",
    )
    prefetch: int = option(2, "batches prepared ahead of the step")
    resident_max_gb: float = option(
        0.0, "cap on the resident loader's decoded split; 0 = free memory"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available")
    amp: Literal["auto", "off", "bf16", "fp16"] = option(
        "auto",
        "auto = CUDA: bf16 at capability >= 8.0, else fp16 + loss scaling; CPU: bf16 only where "
        "a short probe measures it >= 10 % faster than fp32 (docs/defaults.md)",
    )
    compile: bool | None = option(
        None,
        "torch.compile the train step; unset = auto: always on CUDA, on a CPU where the measured "
        "gain over the run outweighs the compile",
    )
    probe_cache: bool = option(
        True,
        "reuse the figures of earlier `auto` probes ($XDG_CACHE_HOME/fastalex/probes.json); "
        "--no-probe-cache measures again and refreshes them",
    )
    channels_last: Literal["auto", "on", "off"] = option("auto", "auto = on for CUDA, off for CPU")
    seed: int = option(0, "model init, shuffling and augmentation")
    max_steps: int = option(0, "stop after this many train steps in total; 0 = no limit")
    resume: bool = option(False, "continue from the newest valid checkpoint in OUT/checkpoints")
    checkpoint_every: str = option(
        "10m",
        "also checkpoint inside epochs: every N steps (500) or a duration (90s, 10m); 0 = off",
    )
    keep_checkpoints: int = option(2, "newest checkpoints kept in OUT/checkpoints")
    collective_timeout_s: float = option(
        300.0, "s a collective waits for a silent process before the run stops (torchrun)"
    )
    init_from: str = option(
        "",
        "start from these weights: torchvision's alexnet file (--arch alexnet-tv) or a fastalex "
        "checkpoint; a different class count re-initialises the head; empty = fresh init",
    )
    tensorboard: bool = option(False, "also write TensorBoard scalars to OUT/tensorboard")
    config_file: str = option("", "the config.json this run re-ran (train --config); set by cli")
    overrides: tuple[str, ...] = option((), "fields given on the command line over config_file")

    def checkpoint_interval(self) -> tuple[int, float]:
        """checkpoint_every as (steps, seconds), the other 0: "500" -> (500, 0), "90s" -> (0, 90),
        "10m" -> (0, 600), "0" -> (0, 0) (epoch ends only)."""
        number, unit = re.fullmatch(
            r"(\d+(?:\.\d+)?)([smh]?)", self.checkpoint_every.strip()
        ).groups()
        if not unit:
            return int(float(number)), 0.0
        return 0, float(number) * {"s": 1, "m": 60, "h": 3600}[unit]

    def __post_init__(self) -> None:
        positive = ("image_size", "epochs", "batch_size", "prefetch", "step_epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("loader_workers", "max_steps", "resident_max_gb", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.crop_scale_min <= self.crop_scale_max <= 1:
            raise ValueError(
                "crop_scale_min/crop_scale_max must satisfy 0 < min <= max <= 1, got "
                f"{self.crop_scale_min}/{self.crop_scale_max}"
            )
        if not 0 < self.crop_ratio_min <= self.crop_ratio_max:
            raise ValueError(
                "crop_ratio_min/crop_ratio_max must satisfy 0 < min <= max, got "
                f"{self.crop_ratio_min}/{self.crop_ratio_max}"
            )
        if not re.fullmatch(r"\d+(\.\d+)?[smh]?", self.checkpoint_every.strip()):
            raise ValueError(
                "checkpoint_every must be a step count (500) or a duration (90s, 10m, 1h), got "
                f"{self.checkpoint_every!r}"
            )
        if self.keep_checkpoints < 1 or self.collective_timeout_s <= 0:
            raise ValueError(
                "keep_checkpoints must be >= 1 and collective_timeout_s > 0, got "
                f"{self.keep_checkpoints} and {self.collective_timeout_s}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.image_size < MIN_IMAGE_SIZE[self.arch]:
            raise ValueError(
                f"arch {self.arch} needs image_size >= {MIN_IMAGE_SIZE[self.arch]}, got "
                f"{self.image_size}"
                + ("; use --arch alexnet64 for small inputs" if self.arch != "alexnet64" else "")
            )


# The reference blog: paper AlexNet on Tiny ImageNet upsampled to 227, SGD 0.9 / wd 5e-4 / lr 0.01,
# StepLR(7, 0.1), batch 128, torchvision RandomResizedCrop defaults (0.08-1, 3/4-4/3), 30 epochs.
RECIPES: dict[str, TrainConfig] = {
    "fast": TrainConfig(),
    "reference": TrainConfig(
        recipe="reference",
        arch="alexnet",
        image_size=227,
        epochs=30,
        batch_size=128,
        lr=0.02,  # 0.01 at batch 128, expressed per 256 images
        lr_schedule="step",
        warmup_epochs=0.0,
        decay_biases=True,
        label_smoothing=0.0,
        crop_scale_min=0.08,
        flip_tta=False,
    ),
}


def recipe_config(recipe: str, **overrides: object) -> TrainConfig:
    """The recipe's preset with the given fields replaced (what the user set explicitly)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return dataclasses.replace(RECIPES[recipe], recipe=recipe, **overrides)
