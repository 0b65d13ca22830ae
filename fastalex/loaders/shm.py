"""Shared-memory segments the loaders create: named per run and process, unlinked when done, and
swept after a crash.

Imports numpy only. A segment is the file ``fastalex-<run>-<pid>-<n>`` in SHM_DIR (the temporary
directory where there is none), made and named by the process that owns it, and mapped by name in
its workers. The owner unlinks it on `unlink()`, on garbage collection and at interpreter exit;
a SIGKILLed owner cannot, so `sweep_stale_segments` (run before a new ring is made) unlinks every
segment whose owner pid no longer runs. Reasons: docs/loaders.md.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import weakref
from pathlib import Path

import numpy as np

SHM_DIR = "/dev/shm"  # tmpfs: Docker's default size is 64 MB
PREFIX = "fastalex-"
_numbers = itertools.count()


def shm_dir() -> Path:
    return Path(SHM_DIR) if os.path.isdir(SHM_DIR) else Path(tempfile.gettempdir())


def free_shared_memory() -> int | None:
    """Bytes free where the segments live (None: it cannot be read)."""
    try:
        stat = os.statvfs(shm_dir())
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def run_label(out: str) -> str:
    """The run's name for segment names: its folder's name, reduced to [A-Za-z0-9_.], or "run"."""
    label = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(out).name)[:40] if out else ""
    return label or "run"


def owner_pid(name: str) -> int | None:
    """The pid in a segment name ``fastalex-<run>-<pid>-<n>``; None for any other name."""
    parts = name.rsplit("-", 2)
    if not name.startswith(PREFIX) or len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_stale_segments(directory: Path | None = None) -> list[Path]:
    """Unlink the segments whose owner process is gone (a crashed run's); the paths unlinked. A
    reused pid keeps its segment until that process ends too."""
    swept = []
    for path in (directory or shm_dir()).glob(PREFIX + "*"):
        pid = owner_pid(path.name)
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another process swept it first
            continue
        swept.append(path)
    return swept


def _unlink_if_owner(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker that inherited the finaliser
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class SharedSegment:
    """A uint8 array of `shape` in a named shared-memory file created by this process."""

    def __init__(self, run: str, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.path = shm_dir() / f"{PREFIX}{run}-{os.getpid()}-{next(_numbers)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(1, int(np.prod(self.shape))))
        finally:
            os.close(fd)
        self._unlink = weakref.finalize(self, _unlink_if_owner, self.path, os.getpid())

    def unlink(self) -> None:
        """Remove the name now; mappings already made stay valid until unmapped."""
        self._unlink()


def map_segment(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """The segment at `path` mapped read-write as a uint8 array of `shape` (in any process)."""
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=tuple(shape))
