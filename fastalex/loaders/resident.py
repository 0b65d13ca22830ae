"""The `resident` backend: the split decoded once into device memory, augmented there every epoch.

Imports torch, numpy, the shard format and the other loaders' pieces (cpu.py's sample table and
decoder, augment.py's crops); DALI only through dali.py, lazily. Why: at 64x64 AlexNet needs ~0.7
GFLOP per training image, so a GPU can consume far more images per second than per-epoch JPEG
decoding delivers; decoded, Tiny ImageNet's train split is 100,000 x 64 x 64 x 3 = 1.23 GB and fits
any training GPU (the approach of airbench on CIFAR-10).

- First use: this rank's share of the split (``rank_share``: under DDP each rank holds only its
  own) is decoded into one uint8 (N, H, W, 3) canvas tensor on the device (H x W: the split's
  largest image, capped at twice image_size a side, ``loaders.canvas_px``; larger images are
  scaled down to fit as they are decoded; `summary` says what is held), plus each image's
  (h, w) and label. On CUDA with DALI installed, DALI's ``mixed`` decoder (nvJPEG) does it
  (dali.decode_split); otherwise the `cpu` backend's worker processes do (simplejpeg; on the
  2-core box it is several times faster than DALI's CPU decoder). Before decoding, the bytes needed
  are compared with the device's free memory less a margin (and with --resident-max-gb), and the
  loader refuses with a clear message naming `--loader dali` rather than running out of memory.
- Every epoch: a permutation drawn on the device from a generator seeded by (seed, epoch, rank);
  per batch, one gather of the canvas rows, crop boxes and flips drawn on the device, and
  augment.crop_resize (crop + resize + flip + normalise, batched). No host round trip, no
  per-sample Python. Same crop-area / aspect / flip distributions as the other backends
  (augment.sample_crop_boxes follows DALI's generator); val is the same resize as `cpu`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Batch, Placement, augment_for, loader_workers, plan_share
from fastalex.loaders.augment import epoch_generator, ragged_sizes
from fastalex.loaders.cpu import SampleTable, ShardDecoder, worker_start_method
from fastalex.shards import Manifest

DECODE_BATCH = 512  # images per decode task
CUDA_MARGIN_BYTES = 4 << 30  # left free for the model, activations and cuDNN workspaces
CUDA_MARGIN_FRACTION = 0.2  # ... or this share of the device, whichever is larger
RAM_MARGIN_BYTES = 2 << 30  # left free in RAM when the device is the CPU


def free_bytes(device: torch.device) -> int:
    """Memory that a new allocation on `device` can use: CUDA's free memory, or MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(need: int, device: torch.device, cap_gb: float, split: str) -> None:
    """Refuse (UserError) a decoded split that would not fit, before any memory is taken."""
    gib = need / 2**30
    if cap_gb and need > cap_gb * 2**30:
        raise UserError(
            f"the decoded {split} split needs {gib:.2f} GiB, over --resident-max-gb {cap_gb}; "
            "raise the cap or use --loader dali"
        )
    free = free_bytes(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        margin = max(CUDA_MARGIN_BYTES, int(CUDA_MARGIN_FRACTION * total))
    else:
        margin = RAM_MARGIN_BYTES
    if need > free - margin:
        raise UserError(
            f"the decoded {split} split needs {gib:.2f} GiB but {device} has "
            f"{free / 2**30:.2f} GiB free ({margin / 2**30:.1f} GiB kept for training); "
            "use --loader dali, which decodes each batch as it goes"
        )


def decode_share(
    table: SampleTable,
    ids: np.ndarray,
    device: torch.device,
    workers: int,
    start_method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the samples `ids` with the cpu backend's workers into (N, H, W, 3) uint8 and
    (N, 2) int32 (height, width), both on `device`, in the order of `ids`."""
    height, width = table.canvas_px
    images = torch.empty((len(ids), height, width, 3), dtype=torch.uint8, device=device)
    sizes = torch.empty((len(ids), 2), dtype=torch.int32, device=device)
    batches = [ids[i : i + DECODE_BATCH] for i in range(0, len(ids), DECODE_BATCH)]
    loader = DataLoader(
        ShardDecoder(table),
        batch_size=None,
        sampler=batches,
        num_workers=min(workers, len(batches)),
        pin_memory=device.type == "cuda",
        multiprocessing_context=start_method if workers else None,
    )
    start = 0
    for batch_images, batch_sizes in loader:
        stop = start + len(batch_images)
        images[start:stop].copy_(batch_images, non_blocking=True)
        sizes[start:stop].copy_(batch_sizes, non_blocking=True)
        start = stop
    return images, sizes


class ResidentLoader:
    """Loader protocol over a split decoded once into device memory (see the module docstring)."""

    backend = "resident"

    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        manifest: Manifest,
        placement: Placement,
        first_epoch: int = 0,
    ):
        self.augment = augment_for(cfg, split)
        self.device = torch.device(placement.device)
        self.rank = placement.rank
        self.batch_size = cfg.batch_size
        self.seed = cfg.seed
        self.epoch = first_epoch
        table = SampleTable(Path(cfg.shards), manifest, split, cfg.image_size)
        start, stop, self.steps, self.samples = plan_share(
            manifest.splits[split].samples, cfg.batch_size, placement, self.augment.train
        )
        height, width = table.canvas_px
        check_fits((stop - start) * height * width * 3, self.device, cfg.resident_max_gb, split)
        ids = np.arange(start, stop)
        self.images, sizes = self._decode(cfg, table, ids, manifest, split, placement)
        self.heights, self.widths = sizes[:, 0], sizes[:, 1]
        self.labels = table.labels[ids].to(self.device)
        self.sizes = ragged_sizes(sizes, table.canvas_px)  # None: every image fills the canvas
        self.summary = (
            f"resident: {len(ids)} images held on {self.device} as {height} x {width} "
            f"uint8 canvases ({self.images.numel() / 2**30:.2f} GiB)"
            + (", larger ones scaled down to fit" if table.may_exceed else "")
        )

    def _decode(self, cfg, table, ids, manifest, split, placement):
        if self.device.type == "cuda":
            from fastalex.loaders import dali_usable

            if dali_usable(self.device):
                from fastalex.loaders.dali import decode_split

                return decode_split(cfg, split, manifest, placement, table.canvas_px)
        return decode_share(
            table, ids, self.device, loader_workers(cfg, placement), worker_start_method(placement)
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        generator = epoch_generator(self.seed, self.epoch, self.rank, self.device)
        self.epoch += 1
        count = len(self.labels)
        if self.augment.train:
            order = torch.randperm(count, generator=generator, device=self.device)
        else:
            order = torch.arange(count, device=self.device)
        for step in range(self.steps):
            ids = order[step * self.batch_size : (step + 1) * self.batch_size]
            # On the CPU every core is this op's: no decode workers compete once the split is
            # resident (unlike cpu and dali: augment.one_thread_on_cpu).
            boxes, flips = self.augment.draw(self.heights[ids], self.widths[ids], generator)
            images = self.augment.apply(
                self.images[ids],  # (B, H, W, 3) uint8 gathered on the device
                boxes,
                flips,
                None if self.sizes is None else self.sizes[ids],
            )
            yield Batch(images, self.labels[ids])

    def close(self) -> None:
        self.images = self.labels = self.heights = self.widths = self.sizes = None
