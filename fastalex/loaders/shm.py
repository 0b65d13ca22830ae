"""What the loaders leave in shared memory: ring segments and their workers' queue semaphores,
named per run and per owner process, unlinked when done, and swept after a crash.

Imports numpy only. A segment is the file ``fastalex-<run>-<boot>-<pidns>-<pid>-<token>-<n>`` in
SHM_DIR (the temporary directory where there is none): the owner's boot id, pid-namespace inode,
pid and a random token of the process, so no two processes' names collide (a restarted container
with the same pid included). The owner unlinks it on `unlink()`, on garbage collection and at
exit; the semaphores of queues made under `semaphores_named` carry the same owner part. A
SIGKILLed owner cannot clean up, so `sweep_stale_segments` unlinks what a provably gone owner left
(`owner_gone`), never what another pid namespace's live process may hold. Reasons: docs/loaders.md.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import re
import secrets
import tempfile
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

SHM_DIR = "/dev/shm"  # tmpfs: Docker's default size is 64 MB
PREFIX = "fastalex-"
SEMAPHORE_FILE = "sem."  # glibc keeps the POSIX semaphore /NAME as the file sem.NAME in /dev/shm
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # Linux: a fresh random id at every boot
PID_NAMESPACE = "/proc/self/ns/pid"  # its inode number names this process's pid namespace
UNKNOWN = "x"  # a boot id or namespace this platform does not tell
_numbers = itertools.count()


class Owner(NamedTuple):
    """The process a name belongs to: boot id, pid-namespace inode, pid, random token."""

    boot: str
    namespace: str
    pid: int
    token: str


_owner: Owner | None = None


def this_owner() -> Owner:
    """This process's Owner (a forked child gets its own on first use)."""
    global _owner
    if _owner is None or _owner.pid != os.getpid():
        try:
            with open(BOOT_ID) as f:
                boot = re.sub(r"[^0-9a-f]", "", f.read().lower()) or UNKNOWN
        except OSError:
            boot = UNKNOWN
        try:
            namespace = str(os.stat(PID_NAMESPACE).st_ino)
        except OSError:
            namespace = UNKNOWN
        _owner = Owner(boot, namespace, os.getpid(), secrets.token_hex(4))
    return _owner


def owner_part(run: str, owner: Owner | None = None) -> str:
    """``fastalex-<run>-<boot>-<pidns>-<pid>-<token>``: the start of every name `owner` makes."""
    boot, namespace, pid, token = owner or this_owner()
    return f"{PREFIX}{run}-{boot}-{namespace}-{pid}-{token}"


def parse_owner(name: str) -> Owner | None:
    """The Owner in a segment's or semaphore's file name; None for any other name (another
    program's, or one named before owners carried a boot id and a namespace)."""
    name = name.removeprefix(SEMAPHORE_FILE)
    parts = name.split("-", 6)
    if not name.startswith(PREFIX) or len(parts) != 7:
        return None
    _, _, boot, namespace, pid, token, _ = parts
    if not (re.fullmatch(r"[0-9a-f]+|x", boot) and re.fullmatch(r"\d+|x", namespace)):
        return None
    if not (pid.isdigit() and re.fullmatch(r"[0-9a-f]{8}", token)):
        return None
    return Owner(boot, namespace, int(pid), token)


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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def owner_gone(owner: Owner, me: Owner | None = None) -> bool:
    """Whether `owner` has provably ended, seen from `me` (this process): it ran in an earlier
    boot; or in this boot and pid namespace, and either its pid no longer runs or that pid is
    now this process (a predecessor's, e.g. a restarted container's). An owner of another pid
    namespace of this boot may be alive (its pid means nothing here): never gone."""
    me = me or this_owner()
    if owner == me:
        return False
    if UNKNOWN not in (owner.boot, me.boot) and owner.boot != me.boot:
        return True
    if owner.boot != me.boot or owner.namespace != me.namespace:
        return False
    return owner.pid == me.pid or not process_alive(owner.pid)


def sweep_stale_segments(directory: Path | None = None) -> list[Path]:
    """Unlink the segments and semaphores whose owner is provably gone (`owner_gone`: a crashed
    run's); the paths unlinked. A name whose owner may live, or that is not ours, is left."""
    directory = directory or shm_dir()
    swept = []
    for pattern in (PREFIX + "*", SEMAPHORE_FILE + PREFIX + "*"):
        for path in directory.glob(pattern):
            owner = parse_owner(path.name)
            if owner is None or not owner_gone(owner):
                continue
            try:
                path.unlink()
            except FileNotFoundError:  # another process swept it first
                continue
            swept.append(path)
    return swept


@contextlib.contextmanager
def semaphores_named(run: str):
    """Name the POSIX semaphores this process makes inside the block (multiprocessing's locks
    and queues under forkserver or spawn, left in SHM_DIR until unlinked) for the run and this
    owner, so a sweep can tell whose they are. CPython keeps their prefix ("/mp") in the current
    process's private `_config`; where it is missing, names stay Python's."""
    config = getattr(multiprocessing.current_process(), "_config", None)
    if not isinstance(config, dict) or "semprefix" not in config:
        yield
        return
    before = config["semprefix"]
    config["semprefix"] = f"/{owner_part(run)}-sem"
    try:
        yield
    finally:
        config["semprefix"] = before


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
        self.path = shm_dir() / f"{owner_part(run)}-{next(_numbers)}"
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
