"""The `resident` backend: the split decoded once into device memory, augmented there every epoch.

Imports torch, numpy, decode.py and augment.py; DALI only through dali.py, lazily. First use
decodes the split onto uint8 (N, H, W, 3) canvases on the device (nvJPEG through DALI on CUDA when
DALI is installed, else decode.py's workers), after checking the bytes against free memory and
--resident-max-gb; every epoch then gathers, crops, resizes and flips on the device (uint8 out)
with no host round trip. Reasons and measurements: docs/loaders.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders.augment import ragged_sizes
from fastalex.loaders.base import BaseLoader, epoch_order
from fastalex.loaders.contract import Batch, Placement, loader_workers
from fastalex.loaders.decode import SampleTable, ShardDecoder
from fastalex.loaders.host import one_thread_on_cpu
from fastalex.loaders.shm import run_label, semaphores_named, sweep_stale_segments
from fastalex.loaders.workers import end_with_this_process, worker_start_method
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


def check_fits(
    need: int, device: torch.device, cap_gb: float, split: str, holders: int = 1
) -> None:
    """Refuse (UserError) a decoded split that would not fit, before any memory is taken:
    `need` bytes in each of `holders` processes sharing the device's memory."""
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
    if need * holders > free - margin:
        each = f" in each of {holders} processes" if holders > 1 else ""
        raise UserError(
            f"the decoded {split} split needs {gib:.2f} GiB{each} but {device} has "
            f"{free / 2**30:.2f} GiB free ({margin / 2**30:.1f} GiB kept for training); "
            "use --loader dali, which decodes each batch as it goes"
        )


def decode_share(
    table: SampleTable,
    ids: np.ndarray,
    device: torch.device,
    workers: int,
    start_method: str | None = None,
    run: str = "run",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the samples `ids` with decode.py's workers into (N, H, W, 3) uint8 and
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
        worker_init_fn=end_with_this_process(),
    )
    start = 0
    with semaphores_named(run):  # the workers' queues
        decoded = iter(loader)
    for batch_images, batch_sizes in decoded:
        stop = start + len(batch_images)
        images[start:stop].copy_(batch_images, non_blocking=True)
        sizes[start:stop].copy_(batch_sizes, non_blocking=True)
        start = stop
    return images, sizes


class ResidentLoader(BaseLoader):
    """Loader protocol over a split decoded once into device memory (see the module docstring).
    Train holds the whole split (any rank may take any sample of the global order); val holds
    this rank's share."""

    backend = "resident"

    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        manifest: Manifest,
        placement: Placement,
        first_epoch: int = 0,
        skip_samples: int = 0,
    ):
        super().__init__(cfg, split, manifest, placement, first_epoch, skip_samples)
        table = SampleTable(Path(cfg.shards), manifest, split, cfg.image_size)
        start, stop = (0, self.total) if self.train else (self.share.start, self.share.stop)
        height, width = table.canvas_px
        # On the CPU device every process of this machine holds its part in the same RAM.
        holders = placement.local_world_size if self.device.type == "cpu" else 1
        need = (stop - start) * height * width * 3
        check_fits(need, self.device, cfg.resident_max_gb, split, holders)
        ids = np.arange(start, stop)
        held = placement.alone() if self.train else placement
        self.crop_threads = loader_workers(cfg, placement)  # the CPU device: this rank's cores
        self.images, sizes = self._decode(cfg, table, ids, manifest, split, held)
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
            from fastalex.loaders.contract import dali_usable

            if dali_usable(self.device):
                from fastalex.loaders.dali import decode_split

                return decode_split(cfg, split, manifest, placement, table.canvas_px)
        workers = loader_workers(cfg, placement)
        return decode_share(
            table, ids, self.device, workers, worker_start_method(), run_label(cfg.out)
        )

    def __iter__(self):
        epoch, first = self.next_pass()
        if self.train:  # rows of the held split are global sample ids
            order = epoch_order(self.seed, epoch, self.total).to(self.device)
            plan = [(step, order[self.rank_positions(step)]) for step in range(first, len(self))]
        else:  # rows of the held share, in order
            rows = torch.arange(len(self.labels), device=self.device)
            plan = [
                (None, rows[i : i + self.batch_size]) for i in range(0, len(rows), self.batch_size)
            ]
        for step, ids in plan:
            generator = None if step is None else self.step_generator(epoch, step, self.device)
            # On the CPU torch's small ops run on one thread (host.one_thread_on_cpu: its idle
            # OpenMP threads would spin on the cores) and the crop on crop_threads of its own,
            # reading the held rows in place; on CUDA the rows are gathered there.
            with one_thread_on_cpu(self.device):
                boxes, flips = self.augment.draw(
                    self.heights[ids],
                    self.widths[ids],
                    generator,
                    self.rank * self.batch_size,
                    self.global_batch,
                )
                images = self.augment.apply(
                    self.images,
                    boxes,
                    flips,
                    None if self.sizes is None else self.sizes[ids],
                    ids,
                    self.crop_threads,
                )
            yield Batch(images, self.labels[ids])

    def close(self) -> None:
        self.images = self.labels = self.heights = self.widths = self.sizes = None
        sweep_stale_segments()  # what processes that died before this one left
