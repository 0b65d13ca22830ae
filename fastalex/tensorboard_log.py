"""`--tensorboard`: the run's scalars as TensorBoard event files in RUN/tensorboard.

Imports torch's SummaryWriter (which needs the optional ``tensorboard`` package) only when a run
asks for it. Per log interval (x = global step): train/loss, train/images_per_s, lr. Per epoch
(x = epoch): every number of the metrics row (train and val loss, top-1/top-5, lr, images/s,
loader wait) under ``epoch/<name>``. Only rank 0 writes. Reading them: docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

from fastalex.errors import UserError

INSTALL = "pip install 'fastalex[tensorboard]' (or pip install tensorboard)"


class Board:
    """A SummaryWriter on RUN/tensorboard; every write is flushed at epoch end."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def interval(self, step: int, loss: float, images_per_s: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)
        self.writer.add_scalar("lr", lr, step)

    def epoch(self, row: dict) -> None:
        for name, value in row.items():
            if name != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{name}", value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
