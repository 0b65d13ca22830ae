"""The pack group: images/s of `fastalex.pack.pack` over a source tree (or the zip as given).

One row, ``pack``: each call packs the whole source into a fresh directory (train + val, every JPEG
fully decoded, written and hashed); the warm-up pack fills the page cache, and the packs of one
window are deleted before the next window's, outside the timed region.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from bench_data import Data, need
from harness import Subject


def rows(args, data: Data, workdir: Path) -> dict:
    return {"pack": lambda: pack_row(args, data, workdir)}


def pack_row(args, data: Data, workdir: Path) -> Subject:
    from fastalex.config import PackConfig
    from fastalex.pack import pack
    from fastalex.sources.tinyimagenet import open_source

    ref = open_source(need(data, "source"))
    cfg = PackConfig(shard_size=16 if args.quick else PackConfig.shard_size)
    made: list[Path] = []
    counter = iter(range(1 << 30))
    images = [0]  # of the last pack, for the note

    def advance() -> int:
        out = workdir / f"pack-{next(counter)}"  # a fresh directory: pack() skips an existing pack
        manifest, _ = pack(ref, out, cfg, progress=False)
        made.append(out)
        images[0] = sum(split.samples for split in manifest.splits.values()) + len(
            manifest.rejected
        )
        return images[0]

    def reset() -> None:
        while made:
            shutil.rmtree(made.pop())

    def finish(row: dict) -> None:
        row["note"] = f"{images[0]} images (train + val) {row['note']}"

    return Subject(
        advance=advance,
        reset=reset,
        close=reset,
        finish=finish,
        info={
            "config": dataclasses.asdict(cfg),
            "note": f"from a {'zip' if ref.is_zip else 'directory'}, {cfg.processes} processes; "
            "every JPEG fully decoded, written and hashed; one pack per call",
        },
    )
