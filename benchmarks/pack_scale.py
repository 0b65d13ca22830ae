"""Pack at scale: images/s, peak memory and bytes read per source byte of `fastalex.pack.pack` over
a generated Hugging Face parquet snapshot (docs/benchmarks.md, "Packing at scale").

    python benchmarks/pack_scale.py --images 200000 --workdir /tmp/pack-scale

The source: `--images` JPEGs of `--px` px (cycled from 2,000 distinct stand-in images, so that
generating it takes seconds, not the hour 200,000 renders would), labels sorted by class as many Hub
files are, in row groups of `--row-group` rows, 90 % in train files of up to 50,000 rows and 10 % in
one valid file. The pack runs in a forked child (fastalex already imported); what it and its
workers read is /proc/self/io's ``rchar`` (bytes through read calls, page cache or not) counted
once the child is reaped; peak RSS is the largest of those processes (`os.wait4`'s ``ru_maxrss``).
Appends one JSON line to benchmarks/results/pack_scale.jsonl. Imports fastalex, pyarrow, numpy;
torch only after the timed pack (for the machine record).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DISTINCT = 2000  # distinct images the source cycles through
FILE_ROWS = 50_000  # rows per train parquet file, as the Hub splits large sets into several files


def write_source(root: Path, images: int, px: int, classes: int, row_group: int) -> int:
    """The snapshot at `root` (kept when its stamp matches); returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from fastalex.synth import encode_jpeg, render_image

    stamp = {"images": images, "px": px, "classes": classes, "row_group": row_group}
    if (root / "stamp.json").is_file() and json.loads((root / "stamp.json").read_text()) == stamp:
        return source_bytes(root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = []
    for i in range(DISTINCT):
        pixels = render_image(i % classes, rng)[0]  # (64, 64, 3) uint8
        if px != 64:
            pixels = np.asarray(Image.fromarray(pixels).resize((px, px), Image.BILINEAR))
        pool.append(encode_jpeg(pixels, False, 90))
    labels = np.sort(np.arange(images) % classes)  # sorted by class
    valid = np.zeros(images, bool)
    valid[rng.permutation(images)[: images // 10]] = True
    features = {"image": {"_type": "Image"}, "label": {"names": [f"c{c}" for c in range(classes)]}}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def write(path: Path, rows: np.ndarray) -> None:
        table = pa.table(
            {
                "image": pa.array(
                    [{"bytes": pool[r % DISTINCT], "path": f"{r}.jpg"} for r in rows], struct
                ),
                "label": pa.array(labels[rows], pa.int64()),
            }
        ).replace_schema_metadata(meta)
        pq.write_table(table, path, row_group_size=row_group)

    train = np.flatnonzero(~valid)
    parts = max(1, -(-len(train) // FILE_ROWS))
    for part, rows in enumerate(np.array_split(train, parts)):
        write(root / "data" / f"train-{part:05d}-of-{parts:05d}.parquet", rows)
    write(root / "data" / "valid-00000-of-00001.parquet", np.flatnonzero(valid))
    (root / "stamp.json").write_text(json.dumps(stamp))
    return source_bytes(root)


def source_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def warm_up(src: Path, out: Path, workers: int) -> None:
    from fastalex.config import PackConfig
    from fastalex.pack import pack
    from fastalex.sources import detect_source

    shutil.rmtree(out, ignore_errors=True)
    pack(detect_source(src), out, PackConfig(shard_size=100, workers=workers), progress=False)


def measure_pack(src: Path, out: Path, shard_size: int, workers: int) -> dict:
    """Pack in a forked child; its wall time, what it and its workers read, their peak RSS."""
    from fastalex.config import PackConfig
    from fastalex.pack import pack
    from fastalex.sources import detect_source

    shutil.rmtree(out, ignore_errors=True)
    cfg = PackConfig(shard_size=shard_size, workers=workers)
    read_before, start = rchar(), time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            pack(detect_source(src), out, cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the exit status
            print(f"pack failed: {e}", file=sys.stderr)
            code = 1
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit("the pack failed")
    return {
        "seconds": seconds,
        "read_bytes": rchar() - read_before,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "workers": cfg.processes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--px", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--row-group", type=int, default=100, help="rows per parquet row group")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=0, help="0 = every core")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fastalex-pack-scale"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "pack_scale.jsonl")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    src, out = args.workdir / "source", args.workdir / "shards"
    started = time.perf_counter()
    total = write_source(src, args.images, args.px, args.classes, args.row_group)
    print(
        f"source: {args.images} images, {total / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s"
    )
    # A small pack first, in this process: the modules pack imports lazily (PIL, simplejpeg, tqdm,
    # the pool) are then loaded before the fork, so `rchar` counts the source, not .pyc files.
    write_source(args.workdir / "warm", 400, args.px, 4, args.row_group)
    warm_up(args.workdir / "warm", args.workdir / "warm-shards", args.workers)
    got = measure_pack(src, out, args.shard_size, args.workers)
    shards = sum(p.stat().st_size for p in out.glob("*.tar"))
    row = {
        "bench": "pack_scale",
        "images": args.images,
        "px": args.px,
        "row_group": args.row_group,
        "shard_size": args.shard_size,
        "source_bytes": total,
        "shard_bytes": shards,
        "images_per_s": args.images / got["seconds"],
        "read_per_source_byte": got["read_bytes"] / total,
        **got,
    }
    import torch  # after the pack: its import would swell the measured child
    from report import machine_info

    row["machine"] = machine_info(torch.device("cpu"))
    row["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(
        f"pack: {row['images_per_s']:.0f} images/s ({got['seconds']:.0f} s, {got['workers']} "
        f"workers), peak RSS {got['peak_rss_mib']:.0f} MiB (largest process), read "
        f"{got['read_bytes'] / 1e6:.1f} MB = {row['read_per_source_byte']:.3f} x the source"
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
