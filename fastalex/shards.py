"""The on-disk pack format: shard writer, index reader, manifest, and the integrity checks.

Imports neither torch nor DALI (the packer, `verify` and every loader share this module, and it must
stay importable anywhere). This docstring is the format specification.

Format version 1
----------------
A pack is one directory::

    manifest.json          written last; a directory without it is not a finished pack
    train-000000.tar       POSIX (USTAR) tar, WebDataset layout
    train-000000.idx       DALI webdataset index of that tar
    ...
    val-000000.tar / .idx

Tar: each sample is two consecutive regular-file members sharing one key, ``<key>.jpg`` (JPEG bytes:
the source JPEG's, unchanged, unless pack transcoded, downscaled or turned it upright, as counted
per split in the manifest) and ``<key>.cls`` (the label as ASCII decimal, zero-padded to
``LABEL_DIGITS`` so every label member has the same size). The key is the sample's position in its
split after the pack-time shuffle, ``KEY_DIGITS`` decimal digits. Members carry mode 0644, uid/gid
0, empty owner names and mtime 0, so the same inputs give byte-identical tars. Each member is a
512-byte header followed by its data padded to 512 bytes; the archive ends with two zero blocks,
padded to tarfile's 10240-byte record. Any tar tool, the ``webdataset`` library and DALI read it
unchanged.

Index (DALI's webdataset index, version ``v1.2``, text): the first line is ``v1.2 <samples>``; then
one line per sample listing, for each member, ``<ext> <data_offset> <size> <member_name>``, where
``data_offset`` is the byte offset of the member's data (its header's offset + 512). Byte-identical
to DALI's own ``wds2idx`` output for these tars.

Manifest (JSON): ``format_version``; ``classes`` as ``[wnid, words]`` in label order (sorted wnids,
or sorted class directory names for an ImageFolder tree; words may be empty); per split ``samples``,
``image_px`` (the largest stored height and the largest stored width, which need not be one
image's), ``shards`` (each with ``name``, ``samples``, ``bytes``, ``sha256``), and ``transcoded``,
``resized``, ``reoriented`` (how many stored images were converted from another format, downscaled
to ``max_side``, turned upright from an EXIF orientation; 0 when absent); ``source`` (``path``,
``kind`` dir|zip, ``root``, ``layout`` tiny-imagenet|imagefolder, which is tiny-imagenet when
absent, and a zip's ``bytes``); ``pack``, the settings (``seed``, ``shard_size``, ``max_side``: no
stored image's longer side exceeds it, 0 = no bound; ``jpeg_quality``, ``transcode``,
``val_fraction``, ``max_pixels``; older packs hold the first two only); ``rejected`` (``path``,
``reason``) and ``skipped``.

Version policy: a reader refuses any other ``format_version``. A change that a reader of this
version would misread (the tar, the index, a field's meaning) bumps it; a new manifest field does
not, and every reader treats a missing one as the default named above.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastalex.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"  # DALI 2.4 fn.readers.webdataset's index format (this module's docstring)
KEY_DIGITS = 8  # up to 10^8 samples per split
LABEL_DIGITS = 6  # up to 10^6 classes
ASCII_ZERO = 48  # ord("0"): label digits are ASCII
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240
SPLITS = ("train", "val")
HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name of the tar, relative to the pack directory
    samples: int
    bytes: int
    sha256: str

    @property
    def index_name(self) -> str:
        return self.name[: -len(".tar")] + ".idx"


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    image_px: tuple[int, int]  # largest stored height and largest stored width of the split
    shards: tuple[ShardInfo, ...]
    transcoded: int = 0  # stored images converted to JPEG from another format
    resized: int = 0  # stored images downscaled to the pack's max_side
    reoriented: int = 0  # stored images turned upright from their EXIF orientation


@dataclass(frozen=True)
class Manifest:
    classes: tuple[tuple[str, str], ...]  # (wnid, words) in label order
    splits: dict[str, SplitInfo]
    source: dict
    pack: dict
    rejected: tuple[dict, ...] = ()
    skipped: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class ShardIndex:
    """Byte ranges of one shard's samples, as numpy arrays of length `samples`."""

    jpg_offsets: np.ndarray
    jpg_sizes: np.ndarray
    cls_offsets: np.ndarray
    cls_sizes: np.ndarray
    names: list[str] = field(default_factory=list)  # keys, in tar order

    def __len__(self) -> int:
        return len(self.jpg_offsets)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(position: int) -> str:
    return f"{position:0{KEY_DIGITS}d}"


def encode_label(label: int) -> bytes:
    return f"{label:0{LABEL_DIGITS}d}".encode()


def decode_label(data: bytes) -> int:
    return int(data)


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int, multiple: int) -> bytes:
    return b"\0" * (-size % multiple)


def write_shard(tar_path: Path, samples: Iterable[tuple[str, bytes, int]]) -> ShardInfo:
    """Write (key, jpeg_bytes, label) samples as a tar at `tar_path` and its index beside it.

    Both files are written to temporary names and renamed at the end, index first, so a crash never
    leaves a tar without its index. Returns the tar's size and sha256 for the manifest.
    """
    tar_path = Path(tar_path)
    idx_path = tar_path.with_suffix(".idx")
    tmp_tar = tar_path.with_name(tar_path.name + ".part")
    digest = hashlib.sha256()
    lines: list[str] = []
    offset = 0
    with open(tmp_tar, "wb") as tar:

        def put(chunk: bytes) -> None:
            nonlocal offset
            tar.write(chunk)
            digest.update(chunk)
            offset += len(chunk)

        for key, jpeg, label in samples:
            parts = []
            for ext, data in (("jpg", jpeg), ("cls", encode_label(label))):
                member = f"{key}.{ext}"
                header = _member_header(member, len(data))
                put(header)
                parts.append(f"{ext} {offset} {len(data)} {member}")
                put(data + _padding(len(data), BLOCK))
            lines.append(" ".join(parts))
        put(b"\0" * (2 * BLOCK))
        put(_padding(offset, RECORD))
        tar.flush()
        os.fsync(tar.fileno())
    tmp_idx = idx_path.with_name(idx_path.name + ".part")
    tmp_idx.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp_idx, idx_path)
    os.replace(tmp_tar, tar_path)
    return ShardInfo(tar_path.name, len(lines), offset, digest.hexdigest())


def read_index(idx_path: Path) -> ShardIndex:
    """Parse a v1.2 index written by `write_shard` (members `jpg` and `cls` per sample)."""
    text = Path(idx_path).read_text().splitlines()
    if not text:
        raise UserError(f"{idx_path}: empty index")
    head = text[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != len(text) - 1:
        raise UserError(f"{idx_path}: malformed index header {text[0]!r}")
    count = len(text) - 1
    cols = np.zeros((4, count), dtype=np.int64)
    names = []
    for i, line in enumerate(text[1:]):
        fields = line.split()
        members = {fields[j]: fields[j + 1 : j + 4] for j in range(0, len(fields), 4)}
        if len(fields) % 4 or set(members) != {"jpg", "cls"}:
            raise UserError(f"{idx_path}: line {i + 2} is not a jpg+cls sample")
        jpg, cls = members["jpg"], members["cls"]
        cols[:, i] = int(jpg[0]), int(jpg[1]), int(cls[0]), int(cls[1])
        names.append(jpg[2].rsplit(".", 1)[0])
    return ShardIndex(cols[0], cols[1], cols[2], cols[3], names)


def iter_shard(
    tar_path: Path, index: ShardIndex, positions: Iterable[int] | None = None
) -> Iterator[tuple[bytes, int]]:
    """(jpeg_bytes, label) of each sample (or of those at `positions`), by random access."""
    with open(tar_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for i in range(len(index)) if positions is None else positions:
            jo, js = index.jpg_offsets[i], index.jpg_sizes[i]
            co, cs = index.cls_offsets[i], index.cls_sizes[i]
            yield m[jo : jo + js], decode_label(m[co : co + cs])


def hash_file(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (`algorithm`: a hashlib name), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically write manifest.json: the last file of a pack, which marks it finished."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump(asdict(manifest), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: Path) -> Manifest:
    """Load and check a pack's manifest; raise UserError naming the problem otherwise."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        if kind := _source_kind(Path(directory)):
            raise UserError(
                f"{directory}: {kind}, not a pack; pack it first with `fastalex pack {directory} "
                "OUT`, then give OUT"
            )
        raise UserError(
            f"{directory}: no {MANIFEST} (not a finished pack); run `fastalex pack SRC {directory}`"
        )
    try:
        raw = json.loads(path.read_text())
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(
                f"{path}: pack format version {version}, this fastalex reads version "
                f"{FORMAT_VERSION}; re-pack with this version"
            )
        splits = {
            name: SplitInfo(
                samples=s["samples"],
                image_px=tuple(s["image_px"]),
                shards=tuple(ShardInfo(**shard) for shard in s["shards"]),
                transcoded=s.get("transcoded", 0),
                resized=s.get("resized", 0),
                reoriented=s.get("reoriented", 0),
            )
            for name, s in raw["splits"].items()
        }
        return Manifest(
            classes=tuple(tuple(c) for c in raw["classes"]),
            splits=splits,
            source=raw["source"],
            pack=raw["pack"],
            rejected=tuple(raw.get("rejected", ())),
            skipped=tuple(raw.get("skipped", ())),
            format_version=version,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: malformed manifest ({e})") from None


def _source_kind(path: Path) -> str | None:
    """What a path that is not a pack looks like, when it looks like something pack reads."""
    if path.is_file() and path.suffix.lower() == ".zip":
        return "a zip (of a source tree?)"
    if not path.is_dir():
        return None
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for top in (path, path / "tiny-imagenet-200", *(subdirs if len(subdirs) == 1 else ())):
        if (top / "wnids.txt").is_file():
            return "a source tree (Tiny ImageNet layout)"
        if (top / "train").is_dir():
            return "a source tree (ImageFolder layout)"
    return None


def check_shard(directory: Path, shard: ShardInfo, rehash: bool = True) -> list[str]:
    """Problems with one shard against its manifest entry and its index (empty list = sound)."""
    tar_path = Path(directory) / shard.name
    if not tar_path.is_file():
        return [f"{shard.name}: missing"]
    problems = []
    size = tar_path.stat().st_size
    if size != shard.bytes:
        problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
    elif rehash and hash_file(tar_path) != shard.sha256:
        problems.append(f"{shard.name}: sha256 differs from the manifest (modified or corrupt)")
    try:
        index = read_index(Path(directory) / shard.index_name)
    except (OSError, UserError) as e:
        return problems + [f"{shard.index_name}: {e}"]
    if len(index) != shard.samples:
        problems.append(f"{shard.index_name}: {len(index)} samples, manifest says {shard.samples}")
    ends = np.concatenate(
        [index.jpg_offsets + index.jpg_sizes, index.cls_offsets + index.cls_sizes]
    )
    if len(ends) and ends.max() > size:
        problems.append(f"{shard.index_name}: offsets beyond the end of {shard.name} (truncated?)")
    return problems


def check_pack(directory: Path, manifest: Manifest, splits: Iterable[str] = SPLITS) -> None:
    """Refuse (UserError) a pack whose shards do not match the manifest: sizes and sha256."""
    problems = []
    for split in splits:
        for shard in manifest.splits[split].shards:
            problems += check_shard(directory, shard)
    if problems:
        raise UserError(
            f"{directory}: pack does not match its manifest: {'; '.join(problems)}; "
            f"run `fastalex verify {directory}` for details, then re-pack"
        )
