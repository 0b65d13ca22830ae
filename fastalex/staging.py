"""A pack's staging area, ``OUT/.staging/``: what lets a killed pack resume.

Each finished shard's tar and index sit beside its record, ``<shard>.json`` (the worker's
`ShardResult` and the index's sha256), renamed into place last; ``plan.json`` holds the
`fingerprint` of what the shards were written for (source, classes, settings, a digest of the
plan). `resume` keeps the recorded shards that still hash as recorded when the fingerprint is the
same, and empties the staging area, saying why, when it is not. Imports the shard format only.
Reasons: docs/data.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

from fastalex.shards import ShardInfo, hash_file, shard_name

PLAN_FILE = "plan.json"  # the fingerprint of the plan the staged shards were written for


class ShardResult(NamedTuple):
    """What a pack worker made of one shard: its manifest entry and what the manifest counts."""

    split: str
    info: ShardInfo
    rejected: list[dict]  # {"path", "reason"}
    image_px: tuple[int, int]  # largest stored (height, width)
    counts: dict[str, int]  # how many stored images were transcoded, resized, reoriented


def differences(old: dict, new: dict) -> list[str]:
    return [
        f"{key} {old.get(key, 'unset')} -> {new.get(key, 'unset')}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def fingerprint(stamp: dict, settings: dict, plan) -> dict:
    """What staged shards are written for: `stamp` (the source, its classes), the `settings` and a
    digest of the plan (every item's name, label, shard and key)."""
    digest = hashlib.sha256()
    for shard in plan:
        digest.update(f"{shard.split} {shard.number}\n".encode())
        for position, rel, label in shard.items:
            digest.update(f"{position} {label} {rel}\n".encode())
    return {"source": {**stamp, "plan": digest.hexdigest()}, "pack": settings}


def record_path(tar: Path) -> Path:
    return tar.with_suffix(".json")


def write_record(tar: Path, result: ShardResult) -> None:
    """The shard's record, written after its tar and index and renamed into place: a shard
    without one is unfinished. Holds the result and the sha256 of the index too."""
    record = {
        **result._asdict(),
        "info": dataclasses.asdict(result.info),
        "index_sha256": hash_file(tar.with_suffix(".idx")),
    }
    part = record_path(tar).with_suffix(".json.part")
    part.write_text(json.dumps(record))
    os.replace(part, record_path(tar))


def read_record(tar: Path) -> ShardResult | None:
    """The recorded result of a staged shard whose tar and index still hash as recorded."""
    try:
        record = json.loads(record_path(tar).read_text())
        info = ShardInfo(**record["info"])
        if (
            tar.stat().st_size != info.bytes
            or hash_file(tar) != info.sha256
            or hash_file(tar.with_suffix(".idx")) != record["index_sha256"]
        ):
            return None
        px = tuple(record["image_px"])
        return ShardResult(record["split"], info, record["rejected"], px, record["counts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume(staging: Path, fingerprint: dict, plan, progress: bool) -> dict[int, ShardResult]:
    """{plan index: result} of the shards a killed run left staged for this very plan; every
    other staged file is removed. A staging area for another plan is emptied, saying why."""
    done: dict[int, ShardResult] = {}
    try:
        old = json.loads((staging / PLAN_FILE).read_text())
    except (OSError, ValueError):
        old = None
    if old == fingerprint:
        for index, shard in enumerate(plan):
            result = read_record(staging / shard_name(shard.split, shard.number))
            if result is not None:
                done[index] = result
    elif old is not None and isinstance(old, dict):
        changed = differences(old.get("source", {}), fingerprint["source"])
        changed += differences(old.get("pack", {}), fingerprint["pack"])
        changed = [c.split(" ", 1)[0] for c in changed] or ["unreadable plan"]
        print(
            f"pack: {staging.parent}: starting over, the staged shards were for another "
            f"{' / '.join(changed[:4])}",
            file=sys.stderr,
        )
    kept = {
        f"{stem}{suffix}"
        for index in done
        for stem in [shard_name(plan[index].split, plan[index].number)[: -len(".tar")]]
        for suffix in (".tar", ".idx", ".json")
    }
    for stale in staging.iterdir():
        if stale.name not in kept:
            stale.unlink()
    part = staging / (PLAN_FILE + ".part")
    part.write_text(json.dumps(fingerprint))
    os.replace(part, staging / PLAN_FILE)
    if done and progress:
        print(f"pack: resuming, {len(done)} of {len(plan)} shards kept", file=sys.stderr)
    return done
