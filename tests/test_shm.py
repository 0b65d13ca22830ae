"""Shared-memory names and the sweep: a name tells its owner apart from every other process (a
restarted container's same pid included), and the sweep unlinks only what a provably gone owner
left, never what another pid namespace's process may still hold."""

from __future__ import annotations

import itertools
import os

from fastalex.loaders import shm
from fastalex.loaders.shm import Owner, owner_part, sweep_stale_segments, this_owner


def dead_pid() -> int:
    """A pid no process has: one past the kernel's largest (kill(2) answers ESRCH), so no test
    process needs starting."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read()) + 1
    except OSError:
        return 2**22 + 1  # Linux's PID_MAX_LIMIT on 64-bit machines, plus one


def ring(owner: Owner) -> str:
    return f"{owner_part('run', owner)}-0"


def test_the_sweep_unlinks_only_what_a_provably_gone_owner_left(tmp_path):
    me, dead, other = this_owner(), dead_pid(), "0" * 8  # other: another process's token
    elsewhere = str(int(me.namespace) + 1) if me.namespace.isdigit() else "1"  # a fake inode
    files = {  # kind -> (file name, swept)
        "a dead owner's ring": (ring(me._replace(pid=dead, token=other)), True),
        "its semaphore": (f"sem.{owner_part('run', me._replace(pid=dead))}-sem-ab_cd123", True),
        "a previous boot's": (ring(me._replace(boot="0" * len(me.boot), pid=1)), True),
        "a predecessor's with this pid": (ring(me._replace(token=other)), True),
        "a live owner's": (ring(me._replace(pid=os.getppid(), token=other)), False),
        "mine": (ring(me), False),
        "another namespace's, pid dead here": (
            ring(me._replace(namespace=elsewhere, pid=dead)),
            False,
        ),
        "another namespace's, this pid": (
            ring(me._replace(namespace=elsewhere, token=other)),
            False,
        ),
        "named before owners": (f"fastalex-run-{dead}-0", False),
        "not ours": ("torch_123_456", False),
        "another program's semaphore": ("sem.mp-ab_cd123", False),
    }
    for name, _ in files.values():
        (tmp_path / name).write_bytes(b"x")
    swept = {path.name for path in sweep_stale_segments(tmp_path)}
    assert swept == {name for name, gone in files.values() if gone}
    left = {path.name for path in tmp_path.iterdir()}
    assert left == {name for name, gone in files.values() if not gone}


def test_two_processes_with_one_pid_make_distinct_rings(tmp_path, monkeypatch):
    """A restarted container whose trainer gets its predecessor's pid, /dev/shm kept: the new
    ring does not collide with the old one's name (O_EXCL would refuse it)."""
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    rings = []
    for _ in range(2):  # each a fresh process: its own owner, numbering from 0
        monkeypatch.setattr(shm, "_owner", None, raising=False)
        monkeypatch.setattr(shm, "_numbers", itertools.count())
        rings.append(shm.SharedSegment("run", (4,)))
    assert rings[0].path != rings[1].path and all(ring.path.exists() for ring in rings)
    assert shm.parse_owner(rings[0].path.name).pid == 4242


def test_an_owner_is_read_back_from_its_names():
    me = this_owner()
    assert shm.parse_owner(owner_part("my.run_1") + "-3") == me
    assert shm.parse_owner("sem." + owner_part("r") + "-sem-x_y12345") == me
    assert me == Owner(me.boot, me.namespace, os.getpid(), me.token)
