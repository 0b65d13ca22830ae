"""The Tiny ImageNet layout, in a directory or in the official zip read in place, and
`download_zip`, which fetches that zip (resumable, md5-checked).

The layout: ``wnids.txt`` (the classes, one wnid a line), optionally ``words.txt`` (wnid TAB words),
``train/<wnid>/images/*``, ``val/images/*`` labelled by ``val/val_annotations.txt`` (file TAB wnid
TAB box), ``test/images/*`` (unlabelled: counted, not packed); at the top of SRC, below
``tiny-imagenet-200/`` or in its one subdirectory. Labels index the sorted wnids, as torchvision's
ImageFolder orders them. Its val split is its own: --val-fraction is refused. Imports errors,
base.py, tree.py and shards.hash_file; never torch, DALI or pack. The layout as users see it:
docs/data.md.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from fastalex.errors import UserError
from fastalex.shards import hash_file
from fastalex.sources.base import Layout, SourceKind, SourceRef
from fastalex.sources.tree import TreeReader, check_source_path, zip_names

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# The official zip's md5, as ContinualAI's avalanche records it for this URL
# (avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py, TinyImagenet.md5).
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
DOWNLOAD_CHUNK = 1 << 20


def open_source(path: str | os.PathLike) -> SourceRef:
    """Locate the layout in a directory or zip: at its top, or in its one subdirectory."""
    path = check_source_path(path)
    root = find_root(path)
    if root is None:
        kind = "tree" if os.path.isdir(path) else "zip"
        raise UserError(f"{path}: not a Tiny ImageNet {kind}: missing wnids.txt")
    return SourceRef(path, root)


def find_root(path: str) -> str | None:
    """The prefix under which a directory or zip holds wnids.txt, or None."""
    if os.path.isdir(path):
        for root in ("", "tiny-imagenet-200/"):
            if os.path.isfile(os.path.join(path, root, "wnids.txt")):
                return root
        subdirs = [e.name for e in os.scandir(path) if e.is_dir()]
        if len(subdirs) == 1 and os.path.isfile(os.path.join(path, subdirs[0], "wnids.txt")):
            return subdirs[0] + "/"
        return None
    candidates = [n for n in zip_names(path) if n.rsplit("/", 1)[-1] == "wnids.txt"]
    return min(candidates, key=len)[: -len("wnids.txt")] if candidates else None


def _read_text(source: TreeReader, rel: str) -> str:
    if not source.exists(rel):
        raise UserError(
            f"{source.ref.path}: not a Tiny ImageNet tree: missing {source.ref.root}{rel}"
        )
    return source.read(rel).decode("utf-8", errors="replace")


def read_layout(ref: SourceRef, val_fraction: float = 0.0, seed: int = 0) -> Layout:
    """Classes and the labelled train and val samples of a tree, checked for consistency. The tree
    has its own val split: `val_fraction` must be 0 (`seed` goes unused)."""
    if val_fraction:
        raise UserError(
            f"{ref.path}: a Tiny ImageNet tree has its own val split; drop --val-fraction"
        )
    source = TreeReader(ref)
    try:
        layout = _read_layout(ref, source)
    finally:
        source.close()
    if not layout.val:
        raise UserError(f"{ref.path}: val/val_annotations.txt lists no images")
    return layout


def _read_layout(ref: SourceRef, source: TreeReader) -> Layout:
    wnids = sorted({w.strip() for w in _read_text(source, "wnids.txt").split() if w.strip()})
    if not wnids:
        raise UserError(f"{ref.path}: wnids.txt lists no classes")
    words = {}
    if source.exists("words.txt"):
        for line in _read_text(source, "words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    label_of = {w: i for i, w in enumerate(wnids)}
    train = []
    for wnid in wnids:
        folder = f"train/{wnid}/images"
        names = source.list_dir(folder)
        if not names:
            raise UserError(
                f"{ref.path}: not a Tiny ImageNet tree: no images in {ref.root}{folder}/"
            )
        train += [(f"{folder}/{n}", label_of[wnid]) for n in names]
    val = []
    annotations = _read_text(source, "val/val_annotations.txt")
    for number, line in enumerate(annotations.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in label_of:
            raise UserError(
                f"{ref.path}: val/val_annotations.txt line {number}: expected "
                f"'file<TAB>wnid...' with a wnid from wnids.txt, got {line!r}"
            )
        rel = f"val/images/{fields[0].strip()}"
        if not source.exists(rel):
            raise UserError(
                f"{ref.path}: val/val_annotations.txt line {number} names a missing image {rel}"
            )
        val.append((rel, label_of[fields[1].strip()]))
    classes = tuple((w, words.get(w, "")) for w in wnids)
    return Layout(classes, tuple(train), tuple(val), len(source.list_dir("test/images")))


def download_zip(url: str, cache_dir: Path, md5: str | None = OFFICIAL_MD5, progress=None) -> Path:
    """Fetch `url` into `cache_dir`, resuming a partial download, and check its md5.

    The partial file is `<name>.part`; it is renamed only once complete and verified, so a file
    under the final name is always whole. A transfer that ends short of its Content-Length (a
    dropped connection) keeps the .part and raises UserError saying to re-run, which resumes it;
    only a complete file with the wrong md5 is deleted as corrupt. `progress(done_bytes,
    total_bytes)` is called as it goes.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / (url.rstrip("/").rsplit("/", 1)[-1] or "download.zip")
    if final.is_file() and (md5 is None or hash_file(final, "md5") == md5):
        return final
    part = final.with_name(final.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    total = None  # bytes of the whole file, when the server says (Content-Length)
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if done and response.status != 206:  # server ignored the range: start over
                done = 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length else None
            with open(part, "ab" if done else "wb") as f:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not done:  # 416: the range starts at the end, the .part is complete
            raise UserError(
                f"download of {url} failed ({e}); re-run, or pass a zip/dir you have"
            ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise UserError(
            f"download of {url} failed ({e}); re-run to resume, or pass a zip/dir you already have"
        ) from None
    if total is not None and done < total:  # the server closed early: incomplete, not corrupt
        raise UserError(
            f"download of {url} stopped at {done} of {total} bytes (connection closed); "
            f"{part.name} is kept: re-run to resume"
        )
    if md5 is not None and (got := hash_file(part, "md5")) != md5:
        part.unlink()
        raise UserError(f"{url}: md5 {got}, expected {md5}: the download is corrupt; re-run")
    os.replace(part, final)
    return final


SOURCE = SourceKind("tiny-imagenet", find_root, read_layout, TreeReader)
