"""Where a loader's CPU time goes: per batch, the wall time, the main process's CPU time (all its
threads) and its decode workers' CPU time, over a stream of batches of one loader on the CPU.

    python benchmarks/loader_share.py --data SHARDS [--backend cpu] [--decode auto]
        [--image-size 64] [--batches 80] [--warmup 10] [--rounds 3]

The profile docs/loaders.md quotes ("the main process's share of a batch"). It reads the workers'
CPU time from /proc (Linux), so it runs one process with forked workers, and it imports only the
loader API that every version of fastalex since the split has (`build_loader`, `Placement`,
`TrainConfig`): run it with PYTHONPATH pointing at another checkout to profile that version
side by side. Each run appends one JSON line per round to benchmarks/results/loader_share.jsonl
(--no-record: none). Timing is meaningful only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from report import machine_info

from fastalex.config import TrainConfig
from fastalex.loaders import Placement, build_loader

RESULTS = Path(__file__).resolve().parent / "results" / "loader_share.jsonl"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's living children (its decode workers)."""
    me, total = os.getpid(), 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid; utime and stime are fields 14 and 15 of stat
            total += (int(fields[11]) + int(fields[12])) * TICK_S
    return total


def profile(loader, batches: int, warmup: int) -> dict:
    """Stream `warmup` untimed then `batches` timed batches; per-batch figures in ms."""
    stream = iter(())
    done = 0

    def take():
        nonlocal stream
        try:
            return next(stream)
        except StopIteration:
            stream = iter(loader)
            return next(stream)

    for _ in range(warmup):
        take()
    wall, main, workers = time.perf_counter(), time.process_time(), children_cpu_s()
    for _ in range(batches):
        done += len(take().labels)
    wall = time.perf_counter() - wall
    main = time.process_time() - main
    workers = children_cpu_s() - workers
    return {
        "images_per_s": done / wall,
        "wall_ms_per_batch": 1000 * wall / batches,
        "main_cpu_ms_per_batch": 1000 * main / batches,
        "workers_cpu_ms_per_batch": 1000 * workers / batches,
        "main_busy": main / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a pack (fastalex pack's output)")
    p.add_argument("--backend", default="cpu", choices=("cpu", "resident", "dali"))
    p.add_argument("--decode", default="auto", choices=("auto", "processes", "threads"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=80, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches before each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--label", default="", help="a name for this version in the record")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    cfg = TrainConfig(
        shards=str(args.data),
        loader=args.backend,
        decode=args.decode,
        image_size=args.image_size,
        batch_size=args.batch_size,
    )
    device = torch.device("cpu")
    loader = build_loader(cfg, "train", Placement(device))
    print(f"{args.label or 'this checkout'}: {loader.summary}")
    machine = machine_info(device)
    env = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "OPENCV_CPU_DISABLE")}
    try:
        for round_ in range(args.rounds):
            row = profile(loader, args.batches, args.warmup)
            busy = 100 * row["main_busy"]
            print(
                f"  round {round_ + 1}: {row['images_per_s']:,.0f} img/s, per batch: wall "
                f"{row['wall_ms_per_batch']:.1f} ms, main process "
                f"{row['main_cpu_ms_per_batch']:.1f} CPU-ms ({busy:.0f} % busy), "
                f"workers {row['workers_cpu_ms_per_batch']:.1f} CPU-ms"
            )
            if not args.no_record:
                record = {
                    **row,
                    "label": args.label,
                    "round": round_ + 1,
                    "backend": args.backend,
                    "summary": loader.summary,
                    "image_size": args.image_size,
                    "batch_size": args.batch_size,
                    "batches": args.batches,
                    "env": env,
                    "machine": machine,
                }
                with RESULTS.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    finally:
        loader.close()


if __name__ == "__main__":
    main()
