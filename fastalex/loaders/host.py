"""Process-wide host settings for running the augmentation on the CPU device.

Imports torch and ctypes only. `one_thread_on_cpu`: the `cpu` and `dali` (CPU-only mode) backends,
whose decode workers or threads already fill the cores; `keep_large_blocks_in_heap`: BaseLoader,
for every backend on the CPU device.
Reasons and measurements: docs/loaders.md.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters
HEAP_BLOCK_MAX = 1 << 30  # bytes: allocations up to this size come from (and return to) the heap


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device):
    """Run the main process's per-batch work with one intra-op thread when the device is the CPU:
    the decode workers already fill the cores, and after any parallel op OpenMP's idle threads
    spin-wait, burning the workers' CPU."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def keep_large_blocks_in_heap() -> None:
    """Let glibc malloc reuse freed large blocks instead of unmapping them (Linux only; a no-op
    elsewhere). Process-wide: raises the mmap and trim thresholds to HEAP_BLOCK_MAX.

    On the CPU device every batch is a fresh tensor, and glibc serves blocks over its mmap
    threshold with fresh mappings, so each batch would page-fault its whole output in. The cost:
    freed memory stays in the process (its peak is kept), which a training process wants anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, HEAP_BLOCK_MAX)
