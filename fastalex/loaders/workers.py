"""Decode worker processes' lives: how they start, and that none outlives the process that owns
them (the loader's, a rank).

Imports torch (whether a process group exists) and shm.py. `worker_start_method`: fork, or
forkserver beside a process group. `end_with_owner`: the DataLoader worker_init_fn of every decode
worker: once the owner has ended, by any signal, an exception or a clean exit, the worker unlinks
the owner's ring and ends (and with the last worker its forkserver and resource tracker, which
then unlinks the owner's queue semaphores). Reasons: docs/loaders.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import signal
import threading
import time

import torch

from fastalex.loaders.shm import process_alive

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: signal this process when its parent thread ends
POLL_S = 0.5  # where pidfd_open is missing (Linux < 5.3): how often the owner is looked for


def worker_start_method() -> str | None:
    """How decode workers start: fork (the DataLoader's default, fastest) while this process has
    no process group; forkserver once it has one, whose threads a fork would copy mid-operation
    (a forked worker deadlocked in Python's after-fork code beside gloo's threads). Decided by
    the group itself, not by a placement: a rank that decodes as if alone still has the group."""
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    return "forkserver" if grouped else None


def end_with_this_process(segments: tuple[str, ...] = ()) -> functools.partial:
    """The worker_init_fn tying decode workers to this process (and its shared-memory
    `segments`, which the workers unlink if this process dies first)."""
    return functools.partial(end_with_owner, os.getpid(), tuple(segments))


def end_with_owner(owner: int, segments: tuple[str, ...], worker_id: int) -> None:
    """In a decode worker: end it, unlinking `segments`, once process `owner` has ended.

    A forkserver's child never sees its owner end by itself: its parent is the forkserver, which
    the torch DataLoader's watchdog checks, and the forkserver lives as long as any child holds
    its "alive" pipe. So a thread waits on the owner's pidfd and kills the worker when it fires.
    Beside it, the kernel's parent-death signal where the parent is a forkserver (single-threaded;
    the signal follows the thread that forked, so a fork from one of the owner's threads is left
    to the pidfd alone)."""
    if os.getppid() != owner:
        set_parent_death_signal(signal.SIGKILL)
    threading.Thread(
        target=end_after, args=(owner, segments), name="fastalex-owner-watch", daemon=True
    ).start()


def end_after(owner: int, segments: tuple[str, ...]) -> None:
    wait_for_exit(owner)
    for path in segments:  # provably the dead owner's: it made them for these workers
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for_exit(pid: int) -> None:
    """Return once process `pid` has ended (at once if it already has)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here: look every POLL_S
        while process_alive(pid):
            time.sleep(POLL_S)
        return
    try:
        select.select([fd], [], [])  # a pidfd is readable once its process has ended
    finally:
        os.close(fd)


def set_parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG, signum) through libc (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
