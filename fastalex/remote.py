"""Packs on object storage: `local_pack(url_or_path, cache_dir)` -> the directory of a pack on this
node, staging an ``s3://``, ``gs://``, ``http(s)://`` (any fsspec URL) pack into the cache first.

The remote manifest is read first; each shard it lists (tar and index) is downloaded in parallel to
a temporary name, its sha256 checked against the manifest while it streams, and renamed into place;
the manifest is written last, so a killed or failed staging never leaves a pack that looks finished.
A shard already staged for the same sha256 (``.staged.json`` records each one's size and mtime) is
kept, so a later run, or a changed remote pack, fetches only what differs. One process per node
stages a pack (a file lock beside it); the others wait and reuse it. A local path is returned as it
is. Credentials and endpoints are fsspec's and the storage library's own (``AWS_*``,
``FSSPEC_S3_ENDPOINT_URL``...). Imports fsspec (extra ``[remote]``), filelock, tqdm, shards.py;
never torch or DALI. How to use it: docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastalex.errors import UserError
from fastalex.shards import MANIFEST, SPLITS, Manifest, ShardInfo, check_shard, read_manifest

URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
STAGED = ".staged.json"  # in a staged pack: {shard name: [sha256, bytes, mtime_ns]}
INCOMING = ".incoming"  # in a staged pack: the remote manifest while its shards are fetched
CHUNK = 4 << 20  # bytes per read of a download
DOWNLOADS = 8  # shards fetched at once: object stores serve parallel requests best


def is_remote(path: str | os.PathLike) -> bool:
    match = URL.match(os.fspath(path))
    return bool(match) and match.group(1).lower() != "file"


def cache_name(url: str) -> str:
    """A directory name for `url` in the cache: readable, and unique by a hash of the URL."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")[-80:]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def local_pack(url_or_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The pack at `url_or_path` as a local directory: a path as it is (``file://`` stripped), a
    remote URL staged below `cache_dir` (module docstring) and checked."""
    text = os.fspath(url_or_path)
    if not is_remote(text):
        return Path(text[len("file://") :] if text.startswith("file://") else text)
    try:
        import fsspec
    except ImportError:
        raise UserError(
            f"{text}: reading a pack from a URL needs fsspec: pip install 'fastalex[remote]'"
        ) from None
    from filelock import FileLock

    url = text.rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown scheme, or its library missing
        raise UserError(f"{url}: cannot open ({e})") from None
    local = Path(cache_dir) / cache_name(url)
    local.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        _stage(fs, root, url, local)
    return local


def _stage(fs, root: str, url: str, local: Path) -> None:
    incoming = local / INCOMING
    incoming.mkdir(exist_ok=True)
    for stale in local.glob("*.part-*"):  # a staging killed part-way
        stale.unlink()
    try:
        (incoming / MANIFEST).write_bytes(_read(fs, f"{root}/{MANIFEST}", url, MANIFEST))
    except FileNotFoundError:
        raise UserError(f"{url}: no {MANIFEST} there (not a finished pack)") from None
    manifest = read_manifest(incoming)
    shards = [shard for split in SPLITS for shard in manifest.splits[split].shards]
    staged = _read_staged(local)
    missing = [s for s in shards if not _is_staged(local, s, staged.get(s.name))]
    if missing or (local / MANIFEST).read_bytes() != (incoming / MANIFEST).read_bytes():
        (local / MANIFEST).unlink(missing_ok=True)  # unfinished from here on
    if missing:
        _download(fs, root, url, local, missing, staged)
    os.replace(incoming / MANIFEST, local / MANIFEST)
    incoming.rmdir()
    _check(local, manifest, url)


def _read(fs, path: str, url: str, name: str) -> bytes:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as e:  # the storage libraries raise their own kinds
        raise UserError(f"{url}/{name}: cannot read ({e})") from None


def _read_staged(local: Path) -> dict:
    try:
        return json.loads((local / STAGED).read_text())
    except (OSError, ValueError):
        return {}


def _is_staged(local: Path, shard: ShardInfo, record) -> bool:
    """Whether the shard's tar and index are here as downloaded for this very sha256."""
    try:
        stat = (local / shard.name).stat()
    except OSError:
        return False
    return (
        (local / shard.index_name).is_file()
        and stat.st_size == shard.bytes
        and record == [shard.sha256, shard.bytes, stat.st_mtime_ns]
    )


def _download(fs, root: str, url: str, local: Path, shards: list[ShardInfo], staged: dict):
    """Fetch `shards`, DOWNLOADS at a time, with a tqdm bar of the bytes; the first failure stops
    the others and ends the staging, naming its shard."""
    from tqdm import tqdm

    lock, stop = threading.Lock(), threading.Event()
    total = sum(s.bytes for s in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"staging {len(shards)} shards") as bar:

        def fetch(shard: ShardInfo) -> None:
            def progress(count: int) -> None:
                if stop.is_set():
                    raise InterruptedError
                with lock:
                    bar.update(count)

            _fetch(fs, root, url, local, shard, progress)
            with lock:
                staged[shard.name] = [
                    shard.sha256,
                    shard.bytes,
                    (local / shard.name).stat().st_mtime_ns,
                ]
                _write_staged(local, staged)

        pool = ThreadPoolExecutor(min(DOWNLOADS, len(shards)))
        try:
            for job in [pool.submit(fetch, shard) for shard in shards]:
                job.result()
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def _fetch(fs, root: str, url: str, local: Path, shard: ShardInfo, progress) -> None:
    """One shard's index, then its tar to a temporary name, hashed as it streams, renamed into
    place only when its size and sha256 are the manifest's."""
    part = local / f"{shard.name}.part-{os.getpid()}"
    digest, size = hashlib.sha256(), 0
    try:
        index = _read(fs, f"{root}/{shard.index_name}", url, shard.index_name)
        with fs.open(f"{root}/{shard.name}", "rb") as source, open(part, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                progress(len(chunk))
        if size != shard.bytes or digest.hexdigest() != shard.sha256:
            raise UserError(
                f"{url}/{shard.name}: {size} bytes, sha256 {digest.hexdigest()[:16]}...; the "
                f"manifest says {shard.bytes} bytes, {shard.sha256[:16]}...: the remote shard is "
                "corrupt or was changed after packing; not used"
            )
        index_part = local / f"{shard.index_name}.part-{os.getpid()}"
        index_part.write_bytes(index)
        os.replace(index_part, local / shard.index_name)
        os.replace(part, local / shard.name)
    except FileNotFoundError:
        raise UserError(
            f"{url}: {shard.name} or its index missing (the manifest lists it)"
        ) from None
    except (UserError, InterruptedError):
        raise
    except Exception as e:  # the storage libraries raise their own kinds; a full disk here
        raise UserError(f"{url}/{shard.name}: cannot stage it ({e})") from None
    finally:
        part.unlink(missing_ok=True)


def _write_staged(local: Path, staged: dict) -> None:
    part = local / f"{STAGED}.part-{os.getpid()}"
    part.write_text(json.dumps(staged))
    os.replace(part, local / STAGED)


def _check(local: Path, manifest: Manifest, url: str) -> None:
    """Each staged index against its tar (sizes, offsets): the hashes were checked on download."""
    for split in SPLITS:
        for shard in manifest.splits[split].shards:
            problems = check_shard(local, shard, rehash=False)
            if problems:
                raise UserError(f"{url}: staged into {local}, but {problems[0]}")
