"""The Tiny ImageNet source layout: reading it from a directory or the official zip, fetching the
zip, and `synth`, which writes a stand-in tree in the exact layout.

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
import io
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastalex.errors import UserError

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# The official zip's md5, as ContinualAI's avalanche records it for this URL
# (avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py, TinyImagenet.md5).
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SYNTH_PX = 64  # Tiny ImageNet images are 64x64 RGB JPEGs
SYNTH_GRAY_FRACTION = 0.01  # about 1 % of Tiny ImageNet's JPEGs are single-channel
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


# --- synth: a learnable stand-in in the same layout ---------------------------------------------

SHAPES = ("disc", "square", "diamond", "ring", "cross", "bar", "triangle", "blob")
TEXTURES = 5  # stripe orientations 0, 45, 90, 135 degrees, and plain
HUES = 5


def synth_wnids(classes: int) -> list[str]:
    return [f"n{90000000 + c:08d}" for c in range(classes)]


def _class_traits(label: int) -> tuple[int, int, float]:
    """(shape, texture, hue) of a class: 5 hues x 8 shapes x 5 textures = 200 distinct combinations.
    The hue varies fastest, so a stand-in with few classes is still easy to tell apart."""
    hue_bin = label % HUES
    shape = (label // HUES) % len(SHAPES)
    texture = (label // (HUES * len(SHAPES))) % TEXTURES
    extra = label // (len(SHAPES) * TEXTURES * HUES)  # beyond 200 classes: shift the hue
    return shape, texture, (hue_bin / HUES + extra * 0.618) % 1.0


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


_GRID = (np.mgrid[0:SYNTH_PX, 0:SYNTH_PX].astype(np.float32) + 0.5) / SYNTH_PX  # (2, 64, 64) y, x


def render_image(
    label: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One 64x64 RGB uint8 image of class `label`, and the shape's bounding box (x0, y0, x1, y1)."""
    shape, texture, hue = _class_traits(label)
    size = rng.uniform(0.22, 0.4)
    cy, cx = rng.uniform(size, 1 - size, 2)
    v = (_GRID[0] - cy) / size
    u = (_GRID[1] - cx) / size
    r = np.hypot(u, v)
    masks = {
        "disc": r < 1,
        "square": np.maximum(abs(u), abs(v)) < 0.85,
        "diamond": abs(u) + abs(v) < 1.1,
        "ring": (r < 1) & (r > 0.55),
        "cross": (np.minimum(abs(u), abs(v)) < 0.3) & (np.maximum(abs(u), abs(v)) < 1),
        "bar": (abs(v) < 0.35) & (abs(u) < 1),
        "triangle": (v < 0.8) & (v > 2 * abs(u) - 1.1),
        "blob": r < 0.8 + 0.2 * np.cos(3 * np.arctan2(v, u)),
    }
    mask = masks[SHAPES[shape]]
    if texture < 4:
        angle = texture * np.pi / 4
        stripes = np.sin(9 * (u * np.cos(angle) + v * np.sin(angle)) + rng.uniform(0, 6.3))
        shade = 0.75 + 0.25 * np.sign(stripes)
    else:
        shade = np.ones_like(u)
    fg = _hsv_to_rgb(hue + rng.normal(0, 0.02), rng.uniform(0.6, 1), rng.uniform(0.7, 1))
    bg = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.2, 0.8))
    image = np.where(mask[..., None], fg * shade[..., None], bg)
    image = image + rng.normal(0, 0.06, image.shape)
    pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    box = (
        (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (0, 0, 63, 63)
    )
    return pixels, box


def encode_jpeg(pixels: np.ndarray, gray: bool, quality: int = 90) -> bytes:
    image = Image.fromarray(pixels)
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def synth_class(out: str, label: int, train_per_class: int, seed: int) -> int:
    """Write one class's train images and boxes file; returns the number of images written."""
    wnid = synth_wnids(label + 1)[label]
    folder = Path(out, "train", wnid, "images")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0, label])
    boxes = []
    for i in range(train_per_class):
        pixels, box = render_image(label, rng)
        name = f"{wnid}_{i}.JPEG"
        (folder / name).write_bytes(encode_jpeg(pixels, rng.random() < SYNTH_GRAY_FRACTION))
        boxes.append(f"{name}\t" + "\t".join(map(str, box)))
    (folder.parent / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    return train_per_class


def synth_images(out: str, split: str, labels: list[int], start: int, seed: int) -> list[str]:
    """Write `{split}_{start + i}.JPEG` for each label; returns annotation lines (val only)."""
    folder = Path(out, split, "images")
    rng = np.random.default_rng([seed, 1 if split == "val" else 2, start])
    wnids = synth_wnids(max(labels) + 1) if labels else []
    lines = []
    for i, label in enumerate(labels):
        pixels, box = render_image(label, rng)
        name = f"{split}_{start + i}.JPEG"
        (folder / name).write_bytes(encode_jpeg(pixels, rng.random() < SYNTH_GRAY_FRACTION))
        lines.append(f"{name}\t{wnids[label]}\t" + "\t".join(map(str, box)))
    return lines


def synth(
    out: str | os.PathLike,
    classes: int = 200,
    train_per_class: int = 500,
    val_per_class: int = 50,
    test_images: int = 0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> int:
    """Write a Tiny-ImageNet-layout tree of generated images to `out`; returns the image count.

    Each class is a combination of shape, stripe orientation and hue, drawn at a random position
    and scale over a random background with pixel noise, so a CNN can learn it but not from one
    pixel. Deterministic for a seed, whatever the number of workers.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new directory")
    if classes < 1 or train_per_class < 1 or val_per_class < 0 or test_images < 0:
        raise UserError("synth needs classes >= 1, train-per-class >= 1 and non-negative counts")
    try:
        return _write_synth(
            out, classes, train_per_class, val_per_class, test_images, seed, workers, progress
        )
    except OSError as e:  # unwritable, read-only or full: the user's to fix, not a bug
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
        raise UserError(f"{out}: cannot write there: {e.strerror or e}{where}") from None


def _write_synth(
    out: Path,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    test_images: int,
    seed: int,
    workers: int,
    progress: bool,
) -> int:
    from multiprocessing import get_context

    from tqdm import tqdm

    wnids = synth_wnids(classes)
    for split in ("val", "test"):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (out / "words.txt").write_text(
        "".join(
            f"{w}\tsynthetic {SHAPES[s]}, texture {t}, hue {h:.2f}\n"
            for w, (s, t, h) in zip(wnids, map(_class_traits, range(classes)))
        )
    )
    rng = np.random.default_rng([seed, 3])
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class)).tolist()
    test_labels = rng.integers(0, classes, test_images).tolist()
    chunk = 500
    jobs = [(synth_class, (str(out), c, train_per_class, seed)) for c in range(classes)]
    for split, labels in (("val", val_labels), ("test", test_labels)):
        for start in range(0, len(labels), chunk):
            jobs.append(
                (synth_images, (str(out), split, labels[start : start + chunk], start, seed))
            )
    total = classes * train_per_class + len(val_labels) + len(test_labels)
    annotations: dict[int, list[str]] = {}
    with (
        get_context("fork").Pool(max(1, workers)) as pool,
        tqdm(total=total, unit="img", desc="synth (stand-in data)", disable=not progress) as bar,
    ):
        for number, result in pool.imap_unordered(_run_job, list(enumerate(jobs))):
            if isinstance(result, list):
                annotations[number] = result
                bar.update(len(result))
            else:
                bar.update(result)
    val_lines = [
        line for n in sorted(annotations) for line in annotations[n] if line.startswith("val_")
    ]
    (out / "val" / "val_annotations.txt").write_text("".join(line + "\n" for line in val_lines))
    return total


def _run_job(numbered_job):
    number, (function, args) = numbered_job
    return number, function(*args)
