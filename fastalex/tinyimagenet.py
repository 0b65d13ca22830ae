"""The Tiny ImageNet source layout: reading it from a directory or the official zip, and fetching
the zip. (`fastalex/synth.py` writes a stand-in tree in the exact layout.)

Imports neither torch nor DALI. The layout (as in the official ``tiny-imagenet-200.zip``)::

    wnids.txt                         one wnid per line: the classes
    words.txt                         wnid <TAB> words (may list many more wnids than wnids.txt)
    train/<wnid>/images/*.JPEG        training images of class <wnid>
    train/<wnid>/<wnid>_boxes.txt     file <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    val/images/*.JPEG
    val/val_annotations.txt           file <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    test/images/*.JPEG                unlabelled

Labels are indices into the sorted wnids, as torchvision's ImageFolder orders them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastalex.errors import UserError

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# The official zip's md5, as ContinualAI's avalanche records it for this URL
# (avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py, TinyImagenet.md5).
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
DOWNLOAD_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceRef:
    """A picklable handle on a source tree: a directory, or a zip read in place."""

    path: str  # the directory or the zip file
    root: str  # prefix of the tree inside it ("" or "tiny-imagenet-200/"), '/'-separated
    layout: str = "tiny-imagenet"  # which reader: "tiny-imagenet" or "imagefolder" (imagefolder.py)

    @property
    def is_zip(self) -> bool:
        return not os.path.isdir(self.path)


class Source:
    """Read access to the files of a layout, by '/'-separated path relative to its root."""

    def __init__(self, ref: SourceRef):
        self.ref = ref
        self._zip = zipfile.ZipFile(ref.path) if ref.is_zip else None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def read(self, rel: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self.ref.root + rel)
        with open(os.path.join(self.ref.path, self.ref.root, rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        if self._zip is not None:
            try:
                self._zip.getinfo(self.ref.root + rel)
                return True
            except KeyError:
                return False
        return os.path.isfile(os.path.join(self.ref.path, self.ref.root, rel))

    def size(self, rel: str) -> int:
        """Bytes of file `rel` (uncompressed, in a zip), read from the directory entry."""
        if self._zip is not None:
            return self._zip.getinfo(self.ref.root + rel).file_size
        return os.path.getsize(os.path.join(self.ref.path, self.ref.root, rel))

    def has_dir(self, rel: str) -> bool:
        """Whether directory `rel` exists (in a zip: whether any member lies below it)."""
        if self._zip is not None:
            prefix = self.ref.root + rel.rstrip("/") + "/"
            return any(n.startswith(prefix) for n in self._zip.namelist())
        return os.path.isdir(os.path.join(self.ref.path, self.ref.root, rel))

    def walk_files(self, rel: str) -> list[str]:
        """Paths relative to `rel` of every file below directory `rel`, at any depth, sorted;
        hidden files and directories left out. The same list for a directory and its zip."""
        if self._zip is not None:
            prefix = self.ref.root + rel.rstrip("/") + "/"
            found = (n[len(prefix) :] for n in self._zip.namelist() if n.startswith(prefix))
            return sorted(
                n
                for n in found
                if n and not n.endswith("/") and not any(p.startswith(".") for p in n.split("/"))
            )
        top = os.path.join(self.ref.path, self.ref.root, rel)
        found, seen = [], set()
        for folder, dirs, files in os.walk(top, followlinks=True):  # as torchvision's ImageFolder
            real = os.path.realpath(folder)
            if real in seen:  # a symlink loop: each directory once
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            below = os.path.relpath(folder, top).replace(os.sep, "/")
            below = "" if below == "." else below + "/"
            found += [
                below + f
                for f in files
                if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
            ]
        return sorted(found)

    def list_dir(self, rel: str) -> list[str]:
        """Names of the files directly inside directory `rel`, sorted; hidden files left out."""
        if self._zip is not None:
            prefix = self.ref.root + rel.rstrip("/") + "/"
            names = (n[len(prefix) :] for n in self._zip.namelist() if n.startswith(prefix))
            return sorted(n for n in names if n and "/" not in n and not n.startswith("."))
        full = os.path.join(self.ref.path, self.ref.root, rel)
        if not os.path.isdir(full):
            return []
        return sorted(
            e.name for e in os.scandir(full) if e.is_file() and not e.name.startswith(".")
        )


def open_source(path: str | os.PathLike) -> SourceRef:
    """Locate the layout in a directory or zip: at its top, or in its one subdirectory."""
    path = check_source_path(path)
    root = find_tiny_root(path)
    if root is None:
        kind = "tree" if os.path.isdir(path) else "zip"
        raise UserError(f"{path}: not a Tiny ImageNet {kind}: missing wnids.txt")
    return SourceRef(path, root)


def check_source_path(path: str | os.PathLike) -> str:
    """`path` as a string, once it is known to be a directory or a readable zip."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        zip_names(path)
    return path


def zip_names(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a directory or a readable zip ({e})") from None


def find_tiny_root(path: str) -> str | None:
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


@dataclass(frozen=True)
class Layout:
    classes: tuple[tuple[str, str], ...]  # (wnid, words) in label order
    train: tuple[tuple[str, int], ...]  # (relative path, label)
    val: tuple[tuple[str, int], ...]
    test_images: int  # unlabelled, not packed
    skipped: tuple[str, ...] = ()  # other files not packed, one line each, for the manifest


def _read_text(source: Source, rel: str) -> str:
    if not source.exists(rel):
        raise UserError(
            f"{source.ref.path}: not a Tiny ImageNet tree: missing {source.ref.root}{rel}"
        )
    return source.read(rel).decode("utf-8", errors="replace")


def read_layout(ref: SourceRef) -> Layout:
    """Classes and the labelled train and val samples of a tree, checked for consistency."""
    source = Source(ref)
    try:
        return _read_layout(ref, source)
    finally:
        source.close()


def _read_layout(ref: SourceRef, source: Source) -> Layout:
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
    if final.is_file() and (md5 is None or _md5(final) == md5):
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
    if md5 is not None and (got := _md5(part)) != md5:
        part.unlink()
        raise UserError(f"{url}: md5 {got}, expected {md5}: the download is corrupt; re-run")
    os.replace(part, final)
    return final


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
