"""What every backend's loader shares: its fields, `__len__`, each pass's epoch and first step,
and the seeds of the global epoch order and of each global step's augmentation.

Imports torch, the loader contract (fastalex.loaders) and host.py; never a backend. A backend
subclasses `BaseLoader` and implements `__iter__` (one pass: the next epoch) and `close`. Train
global step s covers global positions [s*G, (s+1)*G) of the epoch order, G = batch_size *
world_size; rank r takes [s*G + r*b, s*G + (r+1)*b). Seeds are hashes of their keys: reproducible
anywhere, independent. Reasons: docs/loaders.md.
"""

from __future__ import annotations

import hashlib

import torch

from fastalex.config import TrainConfig
from fastalex.loaders.contract import Placement, augment_for, plan_share
from fastalex.loaders.host import keep_large_blocks_in_heap
from fastalex.shards import Manifest


def stream_seed(*keys: object) -> int:
    """A 63-bit seed for `keys` (e.g. seed, epoch, rank): independent streams, reproducible
    anywhere."""
    digest = hashlib.sha256(":".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: (seed, epoch, rank)."""
    return stream_seed(seed, epoch, rank)


def seeded_generator(seed: int, device: torch.device | None = None) -> torch.Generator:
    """A torch.Generator on `device` (default the CPU) seeded with `seed`."""
    return torch.Generator(device=device or "cpu").manual_seed(seed)


def epoch_order(seed: int, epoch: int, samples: int) -> torch.Tensor:
    """(samples,) int64 on the CPU: the global train order of `epoch`, a function of (seed,
    epoch) only, so it does not depend on the rank or the number of processes."""
    generator = seeded_generator(stream_seed("order", seed, epoch))
    return torch.randperm(samples, generator=generator)


def step_generator(
    seed: int, epoch: int, step: int, device: torch.device | None = None
) -> torch.Generator:
    """The generator of global step `step`'s augmentation draws, on `device`: every rank draws the
    whole global batch's and keeps its slice (Augment.draw's `offset`), so a sample's crop and flip
    depend on its global position only."""
    return seeded_generator(stream_seed("augment", seed, epoch, step), device)


def epoch_generator(
    seed: int, epoch: int, rank: int, device: torch.device | None = None
) -> torch.Generator:
    """The generator of one rank's epoch, on `device` (default the CPU)."""
    return seeded_generator(epoch_seed(seed, epoch, rank), device)


class BaseLoader:
    """The Loader protocol's shared part: the transform, where batches go, this rank's share and
    the epoch the next pass yields (`first_epoch` first)."""

    resplits = True  # the global order and a sample cursor: any world size resumes it

    backend: str
    summary: str

    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        manifest: Manifest,
        placement: Placement,
        first_epoch: int = 0,
        skip_samples: int = 0,
    ):
        self.augment = augment_for(cfg, split)
        self.train = self.augment.train
        self.device = torch.device(placement.device)
        self.rank = placement.rank
        self.world_size = placement.world_size
        self.batch_size = placement.batch_share(cfg.batch_size)  # this process's images a step
        self.seed = cfg.seed
        self.epoch = first_epoch
        self.share = plan_share(
            manifest.splits[split].samples, self.batch_size, placement, self.train
        )
        self.samples = self.share.samples  # this rank's samples per epoch
        self.total = manifest.splits[split].samples  # the whole split's
        self.global_batch = self.batch_size * placement.world_size  # G: samples per global step
        self._skip_steps = self._check_skip(skip_samples)
        if self.device.type == "cpu":
            keep_large_blocks_in_heap()  # every batch a fresh host tensor: reuse freed blocks

    def _check_skip(self, skip_samples: int) -> int:
        """Global steps the first pass skips: skip_samples / G (ValueError unless a whole number
        of this epoch's steps, or on val)."""
        if not skip_samples:
            return 0
        if not self.train:
            raise ValueError("skip_samples applies to the train split only")
        steps, remainder = divmod(skip_samples, self.global_batch)
        if remainder or not 0 <= steps <= len(self):
            raise ValueError(
                f"skip_samples {skip_samples} is not a whole number of the epoch's {len(self)} "
                f"global batches of {self.global_batch}"
            )
        return steps

    def __len__(self) -> int:
        return self.share.steps

    def next_pass(self) -> tuple[int, int]:
        """(epoch, first global step) of this pass: the first pass starts after the skipped
        steps, every later one at step 0 of the following epoch."""
        epoch, first = self.epoch, self._skip_steps
        self.epoch += 1
        self._skip_steps = 0
        return epoch, first

    def rank_positions(self, step: int) -> slice:
        """This rank's slice of the epoch order at global train step `step`."""
        start = step * self.global_batch + self.rank * self.batch_size
        return slice(start, start + self.batch_size)

    def train_plan(self, epoch: int, first: int) -> list[tuple[int, torch.Tensor]]:
        """(global step, this rank's (b,) int64 sample ids on the CPU) for each train step of
        `epoch` from `first`."""
        order = epoch_order(self.seed, epoch, self.total)
        return [(step, order[self.rank_positions(step)]) for step in range(first, len(self))]

    def step_generator(self, epoch: int, step: int, device: torch.device | None = None):
        """The augmentation generator of global step `step` of `epoch`, on `device`."""
        return step_generator(self.seed, epoch, step, device)

    def close(self) -> None:
        """Release workers, pipelines and memory; the loader is not used again."""

    def __del__(self):
        self.close()
