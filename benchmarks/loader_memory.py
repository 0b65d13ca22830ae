"""Peak memory of one loader over a pack: the figure that says whether a loader's memory is bounded
by the batch or by the pack's largest image (a pack of mixed-size photos, say).

    python benchmarks/loader_memory.py --data PACK --loader cpu [--image-size 64] [--epochs 2]

Builds the loader as `fastalex train` would on the CPU, runs its train split for --epochs epochs
and prints one JSON line: the loader, the pack's largest stored image, the canvas it decodes onto,
images/s of the last epoch, and the peak resident set size of this process and of its largest
child (the `cpu` loader's decode workers), in MiB, from getrusage. Shared memory the workers
write (the `cpu` loader's ring) counts in the RSS of the processes that touch it. One loader per
process: ru_maxrss is a process's lifetime peak, so loaders measured in one process would hide
each other.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastalex.config import TrainConfig  # noqa: E402
from fastalex.loaders import Placement, build_loader, canvas_px  # noqa: E402
from fastalex.shards import read_manifest  # noqa: E402


def peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a pack (fastalex pack OUT)")
    parser.add_argument("--loader", choices=("cpu", "dali", "resident"), default="cpu")
    parser.add_argument("--image-size", type=int, default=64, help="px, the model's input")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="train epochs to run (>= 1)")
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        shards=args.data,
        loader=args.loader,
        image_size=args.image_size,
        batch_size=args.batch_size,
        arch="alexnet64" if args.image_size < 63 else TrainConfig.arch,
    )
    largest = tuple(read_manifest(Path(args.data)).splits["train"].image_px)
    baseline = peak_mib(resource.RUSAGE_SELF)
    loader = build_loader(cfg, "train", Placement(torch.device("cpu")))
    rate = 0.0
    for _ in range(max(1, args.epochs)):
        started, images = time.perf_counter(), 0
        for batch in loader:
            images += len(batch.labels)
        rate = images / (time.perf_counter() - started)
    loader.close()
    print(
        json.dumps(
            {
                "loader": loader.backend,
                "summary": loader.summary,
                "largest_image_px": largest,
                "canvas_px": canvas_px(largest, args.image_size),
                "batch_size": args.batch_size,
                "images_per_s_last_epoch": round(rate),
                "peak_rss_mib": round(peak_mib(resource.RUSAGE_SELF)),
                "peak_rss_before_loader_mib": round(baseline),
                "peak_rss_largest_child_mib": round(peak_mib(resource.RUSAGE_CHILDREN)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
