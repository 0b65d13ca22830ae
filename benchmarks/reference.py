"""The reference blog's input pipeline, rebuilt as the baseline that `throughput.py` compares with.

A benchmark baseline, not product code: nothing in `fastalex` imports this module.

The reference is the blog post "Training AlexNet from Scratch" (aandyw.github.io/blog/2024/alexnet;
code: github.com/aandyw/StuffFromScratch, AlexNet/train_alexnet.ipynb and trainer.py): paper AlexNet
on Tiny ImageNet upsampled to 227 px, 31.75 % top-1 / 58.76 % top-5 after ~30 epochs on a Colab T4.
Its training input pipeline, verbatim from the notebook::

    transforms.Compose([
        transforms.RandomResizedCrop(64),
        transforms.Resize(227),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=2)

and in the training loop ``inputs.to(device)`` (pageable memory, no pinning, blocking copy).

What is the same here, and what is not:

- torchvision cannot be installed beside this project's torch, so its transforms are re-implemented
  with PIL + torch exactly as torchvision's v1 transforms run them on PIL images: the crop box is
  drawn by `RandomResizedCrop.get_params` (10 tries of scale (0.08, 1) and log-uniform ratio
  (3/4, 4/3) with the torch RNG, else the centre-crop fallback), then PIL ``crop`` + ``resize`` with
  ``Image.BILINEAR``; ``Resize(size)`` scales the shorter side (and returns the image untouched when
  it already has that size, as torchvision >= 0.13 does); the flip is ``torch.rand(1) < 0.5`` then
  ``FLIP_LEFT_RIGHT``; ToTensor is uint8 HWC -> float CHW / 255; Normalize is ``(x - mean) / std``.
- The blog read Tiny ImageNet through Hugging Face ``datasets`` (``zh-plus/tiny-imagenet``: the same
  JPEGs, decoded by PIL from bytes in Parquet files); here an ImageFolder-style dataset reads the
  JPEG files of the unpacked tree and decodes them with PIL, as torchvision's ``ImageFolder`` does.
  Both decode every JPEG with PIL in the loader workers and convert it to RGB.
- The blog's size is 227 (64 px upsampled). At other image sizes the crop stays
  RandomResizedCrop(64) (Tiny ImageNet's native size) followed by Resize(image_size): at 64 px the
  Resize is a no-op.
- The blog trained at batch 128 (its post) or 512 (one notebook version); the benchmark passes the
  batch size it compares at.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

# The blog's Normalize: ImageNet statistics (torchvision's documented values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The blog's RandomResizedCrop(64): torchvision defaults scale=(0.08, 1.0), ratio=(3/4, 4/3).
CROP_PX = 64
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params
FLIP_P = 0.5  # torchvision RandomHorizontalFlip default
WORKERS = 2  # the blog's DataLoader(num_workers=2)
# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """torchvision.datasets.ImageFolder's behaviour: classes are the sorted subdirectories of
    `root`, samples every image file below each (walked recursively, sorted), loaded with PIL and
    converted to RGB, then passed through `transform`."""

    def __init__(self, root: str | os.PathLike, transform=None) -> None:
        root = Path(root)
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{root}: no class directories")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(folder, file), self.class_to_idx[name]))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader
            image = Image.open(f).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def random_resized_crop_box(width: int, height: int, scale=CROP_SCALE, ratio=CROP_RATIO):
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, the same torch RNG draws."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(CROP_TRIES):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = width / height  # fallback: centre crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size) with an int: shorter side to `size`, aspect kept, bilinear;
    the image itself when it already has that size."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


class ReferenceTrainTransform:
    """RandomResizedCrop(64) -> Resize(image_size) -> RandomHorizontalFlip -> ToTensor ->
    Normalize, on one PIL image; returns (3, image_size, image_size) float32."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(*image.size)
        image = image.crop((left, top, left + w, top + h))
        if image.size != (CROP_PX, CROP_PX):  # torchvision's resize returns a same-size image as is
            image = image.resize((CROP_PX, CROP_PX), Image.BILINEAR)
        image = resize_shorter(image, self.image_size)
        if torch.rand(1) < FLIP_P:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))  # (H, W, 3) uint8
        tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # (3, H, W)
        return tensor.sub_(self.mean).div_(self.std)


class Batch(NamedTuple):
    images: torch.Tensor  # (N, 3, S, S) float32, contiguous NCHW, on the device
    labels: torch.Tensor  # (N,) int64, on the device


class ReferenceLoader:
    """The blog's DataLoader, yielding batches moved to the device as its training loop moves them
    (``inputs.to(device)``: pageable memory, a blocking copy). Same iteration surface as a fastalex
    Loader: each ``__iter__`` is one epoch, ``len()`` is batches per epoch."""

    backend = "reference"

    def __init__(
        self,
        train_dir: str | os.PathLike,
        image_size: int,
        batch_size: int,
        device: torch.device,
        workers: int = WORKERS,
    ) -> None:
        self.dataset = ImageFolder(train_dir, ReferenceTrainTransform(image_size))
        self.device = torch.device(device)
        self.samples = len(self.dataset)
        self.loader = DataLoader(
            self.dataset, batch_size=batch_size, shuffle=True, num_workers=workers
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self.loader:
            yield Batch(images.to(self.device), labels.to(self.device))

    def close(self) -> None:
        pass
