"""Source -> shards: parallel, every image checked (header first, then a full decode) once before
it is written, each source unit read once, atomic, resumable.

Imports sources/ (every layout through one `Reader`; pack names none), images.py and the shard
format, never torch or DALI. Each item goes through `images.prepare_image`: a whole, upright JPEG
within ``max_side`` is stored byte-identical; other formats are transcoded, larger images
downscaled, and headers over ``max_pixels`` rejected before any decode. `plan_shards` is
deterministic: whole read units (a parquet row group, a file) go to shards in a seeded order, items
are shuffled within each shard. A pack is staged in ``OUT/.staging/`` (staging.py: a record per
finished shard, so a pack killed at any point and run again keeps them) and moved into place when
every shard is written, the manifest last. The order guarantees: docs/data.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import zipfile
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastalex.config import PackConfig
from fastalex.errors import UserError
from fastalex.images import Rejected, check_jpeg, max_file_bytes, prepare_image
from fastalex.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    Manifest,
    SplitInfo,
    check_shard,
    iter_shard,
    read_index,
    read_manifest,
    sample_key,
    shard_name,
    write_manifest,
    write_shard,
)
from fastalex.sources import Layout, Reader, SourceRef, open_reader, read_layout
from fastalex.staging import ShardResult, differences, fingerprint, resume, write_record

STAGING = ".staging"
PACK_FILE = re.compile(r"^(train|val)-\d{6}\.(tar|idx)(\.part)?$|^manifest\.json(\.part)?$")
PROGRESS_EVERY = 64  # images between updates of the shared progress counter
IN_FLIGHT_PER_WORKER = 2  # shards submitted ahead per worker: the pool never holds the whole plan
READ_ERRORS = (Rejected, OSError, zipfile.BadZipFile, zlib.error, EOFError)  # a bad file, not a bug
COUNTS = ("transcoded", "resized", "reoriented")  # per split, in the manifest


_progress = None  # multiprocessing.Value shared with the workers
_sources: dict[SourceRef, Reader] = {}  # one open reader per source, per worker


def _init_worker(progress) -> None:
    global _progress
    _progress = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us


def _bump(count: int) -> None:
    with _progress.get_lock():
        _progress.value += count


class ShardPlan(NamedTuple):
    split: str
    number: int
    items: list  # (position, item, label) in the order written; position = key in the split


def pack_shard(ref: SourceRef, staging: str, shard: ShardPlan, cfg: PackConfig) -> ShardResult:
    """Check, convert where needed (`prepare_image`) and write one shard, then its record."""
    source = _sources.get(ref) or _sources.setdefault(ref, open_reader(ref))
    source.prefetch([rel for _, rel, _ in shard.items])  # whole units: each read this once
    rejected = []
    max_px = [0, 0]
    counts = dict.fromkeys(COUNTS, 0)
    max_bytes = max_file_bytes(cfg.max_pixels)

    def samples():
        pending = 0
        for position, rel, label in shard.items:
            try:
                if (size := source.size(rel)) > max_bytes:
                    raise Rejected(f"{size} bytes, more than an image of max_pixels can need")
                stored = prepare_image(
                    source.read(rel), cfg.max_side, cfg.jpeg_quality, cfg.transcode, cfg.max_pixels
                )
            except READ_ERRORS as e:
                if cfg.strict:
                    raise UserError(f"{ref.path}: {ref.root}{rel}: {e} (--strict)") from None
                rejected.append({"path": ref.root + rel, "reason": str(e)})
            else:
                max_px[0], max_px[1] = max(max_px[0], stored.height), max(max_px[1], stored.width)
                for name in COUNTS:
                    counts[name] += getattr(stored, name)
                yield sample_key(position), stored.jpeg, label
            pending += 1
            if pending == PROGRESS_EVERY:
                _bump(pending)
                pending = 0
        _bump(pending)

    tar = Path(staging) / shard_name(shard.split, shard.number)
    info = write_shard(tar, samples())
    result = ShardResult(shard.split, info, rejected, (max_px[0], max_px[1]), counts)
    write_record(tar, result)
    return result


def plan_shards(layout: Layout, cfg: PackConfig, unit_of) -> list[ShardPlan]:
    """The shards of each split, deterministic for a layout, `unit_of` and settings: the split's
    read units (`unit_of(item)`, items of one unit in layout order) are put in a seeded random
    order and cut into about ``shard_size`` items a shard, each unit whole in one shard (a unit
    larger than a shard makes a larger shard); the items of each shard are then shuffled (seeded).
    Where every item is its own unit this is a global shuffle."""
    plan = []
    for split_number, (split, samples) in enumerate((("train", layout.train), ("val", layout.val))):
        units: dict = {}
        for i, (rel, _) in enumerate(samples):
            units.setdefault(unit_of(rel), []).append(i)
        groups = list(units.values())
        order = np.random.default_rng([cfg.seed, split_number]).permutation(len(groups))
        sizes = np.array([len(groups[g]) for g in order], dtype=np.int64)
        count = -(-len(samples) // cfg.shard_size)
        middles = np.cumsum(sizes) - sizes / 2  # a unit goes where its middle item falls
        shard_of = np.minimum(count - 1, (middles * count / max(1, len(samples))).astype(np.int64))
        bounds = np.searchsorted(shard_of, np.arange(count + 1))
        position = numbered = 0
        for number in range(count):
            members = [i for g in order[bounds[number] : bounds[number + 1]] for i in groups[g]]
            if not members:  # units larger than a shard leave some cut points empty
                continue
            shuffle = np.random.default_rng([cfg.seed, split_number, number])
            members = [members[k] for k in shuffle.permutation(len(members))]
            items = [(position + k, *samples[i]) for k, i in enumerate(members)]
            plan.append(ShardPlan(split, numbered, items))
            position += len(members)
            numbered += 1
    return plan


def prepare_out(out: Path, source: dict, cfg: PackConfig) -> bool:
    """Check OUT can take this pack; False when it already holds this very pack (nothing to do)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
            changed = differences({**LEGACY_SOURCE, **old.source}, source)
            changed += differences(old.pack, _pack_settings(cfg))
        except UserError:
            changed = ["unreadable manifest"]
        if not changed and not cfg.overwrite:
            return False
        if not cfg.overwrite:
            raise UserError(
                f"{out}: holds a different pack ({'; '.join(changed[:3])}); pass --overwrite to "
                "replace it"
            )
    elif out.is_dir():
        foreign = [
            e.name for e in os.scandir(out) if e.name != STAGING and not PACK_FILE.match(e.name)
        ]
        if foreign:
            raise UserError(
                f"{out}: not empty and not a pack (holds {foreign[0]!r}); choose another OUT"
            )
    try:
        (out / STAGING).mkdir(parents=True, exist_ok=True)
        probe = out / STAGING / "probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror})") from None
    return True


LEGACY_SOURCE = {"layout": "tiny-imagenet"}  # what a manifest that names no layout was packed from


def _pack_settings(cfg: PackConfig) -> dict:
    """The settings that decide a pack's bytes (with the source): equal ones make a re-run a
    no-op."""
    return {
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "max_side": cfg.max_side,
        "jpeg_quality": cfg.jpeg_quality,
        "transcode": cfg.transcode,
        "val_fraction": cfg.val_fraction,
        "max_pixels": cfg.max_pixels,
    }


def describe_source(ref: SourceRef) -> dict:
    path = os.path.abspath(ref.path)
    entry = {
        "path": path,
        "kind": "zip" if ref.is_zip else "dir",
        "root": ref.root,
        "layout": ref.layout,
    }
    if ref.is_zip:
        entry["bytes"] = os.path.getsize(path)
    return entry


def pack(
    ref: SourceRef, out: str | os.PathLike, cfg: PackConfig, progress: bool = True
) -> tuple[Manifest, bool]:
    """Pack the train and val splits of `ref` into `out`; returns the manifest and whether it was
    written (False: `out` already held this very pack, same source and settings, left as it was).
    Shards a killed run left staged for the same plan are kept where they hash as recorded.
    """
    out = Path(out)
    layout = read_layout(ref, cfg.val_fraction, cfg.seed)
    source = describe_source(ref)
    created = not out.exists()
    if not prepare_out(out, source, cfg):
        return read_manifest(out), False
    staging = out / STAGING
    reader = open_reader(ref)
    try:
        plan = plan_shards(layout, cfg, reader.unit)
    finally:
        reader.close()
    try:
        stamp = {**source, "classes": [list(c) for c in layout.classes]}
        if ref.is_zip:  # its size is in `source`; its mtime stands for its content too
            stamp["mtime_ns"] = os.stat(ref.path).st_mtime_ns
        done = resume(staging, fingerprint(stamp, _pack_settings(cfg), plan), plan, progress)
        results = _write_shards(ref, layout, cfg, staging, plan, done, progress)
        manifest = _build_manifest(layout, source, cfg, results)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    _move_into_place(staging, out)
    write_manifest(out, manifest)
    return manifest, True


def _write_shards(
    ref: SourceRef, layout: Layout, cfg: PackConfig, staging: Path, plan, done, progress: bool
) -> list[ShardResult]:
    """Run pack_shard over the plan's unfinished shards on a process pool, at most
    IN_FLIGHT_PER_WORKER shards per worker submitted at a time, with a progress bar fed by the
    workers. A worker's exception, a dead worker (killed, out of memory) or Ctrl-C stops every
    worker at once and ends in one UserError (or the KeyboardInterrupt)."""
    from tqdm import tqdm

    results = dict(done)
    todo = iter([i for i in range(len(plan)) if i not in done])
    workers = max(1, min(cfg.processes, len(plan) - len(done)))
    context = get_context("fork")
    counter = context.Value("q", sum(r.info.samples + len(r.rejected) for r in done.values()))
    pool = ProcessPoolExecutor(workers, context, _init_worker, (counter,))
    in_flight: dict = {}
    total = len(layout.train) + len(layout.val)
    failed = True
    try:
        with tqdm(total=total, unit="img", desc="pack", disable=not progress) as bar:
            while True:
                while len(in_flight) < IN_FLIGHT_PER_WORKER * workers:
                    index = next(todo, None)
                    if index is None:
                        break
                    job = pool.submit(pack_shard, ref, str(staging), plan[index], cfg)
                    in_flight[job] = index
                if not in_flight:
                    break
                finished, _ = wait(in_flight, timeout=0.2, return_when=FIRST_COMPLETED)
                bar.update(counter.get_obj().value - bar.n)  # unlocked: a dead worker may hold it
                for job in finished:
                    results[in_flight.pop(job)] = job.result()  # re-raises a worker's UserError
        failed = False
    except BrokenProcessPool:
        raise UserError(
            f"{ref.path}: a pack worker died (killed, or out of memory: try fewer --workers or a "
            "smaller --shard-size); the pack stopped"
        ) from None
    except OSError as e:  # the staging disk: full, gone, read-only
        raise UserError(f"{staging.parent}: cannot write a shard ({e.strerror or e})") from None
    finally:
        if failed:
            for process in list((pool._processes or {}).values()):
                process.kill()  # no worker outlives the pack, none blocks its shutdown
        pool.shutdown(wait=True, cancel_futures=True)
    return [results[i] for i in range(len(plan))]


def _build_manifest(layout: Layout, source: dict, cfg: PackConfig, results) -> Manifest:
    splits = {}
    for split in ("train", "val"):
        mine = [r for r in results if r.split == split]
        infos = tuple(r.info for r in mine)
        samples = sum(info.samples for info in infos)
        if samples == 0:
            raise UserError(f"{source['path']}: every {split} image was rejected; nothing to pack")
        image_px = (max(r.image_px[0] for r in mine), max(r.image_px[1] for r in mine))
        counts = {name: sum(r.counts[name] for r in mine) for name in COUNTS}
        splits[split] = SplitInfo(samples, image_px, infos, **counts)
    skipped = (
        (f"test: {layout.test_images} unlabelled images, not packed",) if layout.test_images else ()
    )
    skipped += layout.skipped
    return Manifest(
        classes=layout.classes,
        splits=splits,
        source=source,
        pack=_pack_settings(cfg),
        rejected=tuple(rejection for r in results for rejection in r.rejected),
        skipped=skipped,
        format_version=FORMAT_VERSION,
    )


def _move_into_place(staging: Path, out: Path) -> None:
    """Retire any old manifest first (the pack is unfinished from here on), then swap the shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    new = {p.name for p in staging.iterdir() if p.suffix in (".tar", ".idx")}
    for old in out.iterdir():
        if old.name not in new and old.name != STAGING and PACK_FILE.match(old.name):
            old.unlink()
    for name in sorted(new):
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def verify_pack(
    directory: str | os.PathLike, decode_per_shard: int = 32, seed: int = 0
) -> list[str]:
    """Every problem found in a pack (empty = sound): the manifest, each shard's size and sha256,
    each index against its tar, and a full decode of `decode_per_shard` random images per shard."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    rng = np.random.default_rng(seed)
    problems = []
    for split in SPLITS:
        for shard in manifest.splits[split].shards:
            found = check_shard(directory, shard)
            problems += found
            if found:
                continue
            index = read_index(directory / shard.index_name)
            picks = np.sort(
                rng.choice(len(index), min(decode_per_shard, len(index)), replace=False)
            )
            for i, (data, label) in enumerate(iter_shard(directory / shard.name, index, picks)):
                try:
                    check_jpeg(data)
                except Rejected as e:
                    problems.append(f"{shard.name}: sample {index.names[picks[i]]}: {e}")
                if not 0 <= label < manifest.num_classes:
                    problems.append(f"{shard.name}: sample {index.names[picks[i]]}: label {label}")
    return problems


def summarize(manifest: Manifest) -> str:
    """A few lines for the terminal: counts, shards, rejections."""
    lines = []
    for split, info in manifest.splits.items():
        size = sum(s.bytes for s in info.shards) / 1e6
        done = [f"{info.transcoded} transcoded to JPEG"] if info.transcoded else []
        if info.resized:
            done.append(f"{info.resized} downscaled to --max-side {manifest.pack.get('max_side')}")
        if info.reoriented:
            done.append(f"{info.reoriented} turned upright (EXIF orientation)")
        lines.append(
            f"{split}: {info.samples} images in {len(info.shards)} shards ({size:.1f} MB), up to "
            f"{info.image_px[1]}x{info.image_px[0]} px" + "".join(f"; {d}" for d in done)
        )
    lines.append(f"classes: {manifest.num_classes}")
    for note in manifest.skipped:
        lines.append(f"skipped {note}")
    if manifest.rejected:
        lines.append(f"rejected {len(manifest.rejected)} files (listed in {MANIFEST}):")
        lines += [f"  {r['path']}: {r['reason']}" for r in manifest.rejected[:10]]
        if len(manifest.rejected) > 10:
            lines.append(f"  ... and {len(manifest.rejected) - 10} more")
    return "\n".join(lines)
