"""What several test files share, imported as `helpers` (never from another test file): the one
tiny CPU option set of a training run, the metrics keys that hold timings, a training command
through click, a benchmarks/ script loaded as a module, the processes a test launches (the
process tree under a pid, whether processes still run), and a loader of any backend over the
coded packs with the epoch it yields. Fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastalex.cli import main
from fastalex.config import TrainConfig
from fastalex.loaders import Placement, build_loader

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# A training run that neither probes nor compiles: fp32, eager, the cpu loader with one decode
# worker, on the CPU. A test that needs another setting gives it after these (click keeps the last).
TINY_CPU = (
    "--device",
    "cpu",
    "--amp",
    "off",
    "--no-compile",
    "--loader",
    "cpu",
    "--loader-workers",
    "1",
)
TINY_RUN = (*TINY_CPU, "--batch-size", "32")  # ... at a small batch: what train_cli runs
TINY_DDP = (*TINY_CPU, "--batch-size", "64")  # ... for two processes of 32 (torchrun_command)
# metrics.jsonl keys that hold timings: everything else of a row is exact across runs.
TIMING_KEYS = frozenset(
    {"epoch_s", "train_s", "eval_s", "images_per_s", "loader_wait_s", "loader_wait_pct", "timed_s"}
)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def invoke(*args, **kwargs):
    """`fastalex ARGS...` in this process (click's runner); every argument as a string."""
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def train_args(pack, out, *args) -> tuple:
    """The arguments of `fastalex train PACK --out OUT` with TINY_RUN, then `args`."""
    return ("train", pack, "--out", out, *TINY_RUN, *args)


def train_cli(pack, out, *args):
    """`fastalex train` with train_args(PACK, OUT, *args); asserts exit 0."""
    result = invoke(*train_args(pack, out, *args))
    assert result.exit_code == 0, result.output
    return result


class Decided(Exception):
    """Raised by spy_on_runtime's spy once the runtime is decided: nothing can run on a faked
    GPU."""


def spy_on_runtime(monkeypatch, module, stop: bool) -> list:
    """Replace `module.resolve_runtime` with a spy: the list it returns gets every Runtime
    decided; with `stop`, the spy then raises Decided instead of returning it."""
    decided, real = [], module.resolve_runtime

    def spy(cfg, *args):
        decided.append(real(cfg, *args))
        if stop:
            raise Decided
        return decided[-1]

    monkeypatch.setattr(module, "resolve_runtime", spy)
    return decided


def load_script(name: str):
    """A benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


# --- processes a test launches -------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc's parent links."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def process_starts(pids) -> dict[int, int]:
    """{pid: start time in clock ticks since boot} of the processes running now: a pid's identity
    (a pid reused by another process later has another start time)."""
    return {pid: start for pid in pids if (start := process_start(pid)) is not None}


def process_start(pid: int) -> int | None:
    """The start time of `pid` if it runs now (not a zombie), else None."""
    from pathlib import Path

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else int(fields[19])  # state, starttime (proc(5))


def still_running(starts: dict[int, int], within_s: float = 0.0) -> dict[int, str]:
    """{pid: command line} of the processes of `starts` (process_starts) still running after at
    most `within_s` seconds of waiting for them to end."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + within_s
    while True:
        left = [pid for pid, start in starts.items() if process_start(pid) == start]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    found = {}
    for pid in left:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def torchrun_command(
    pack, out, *args, launcher=("--standalone", "--nproc_per_node", "2"), options=TINY_DDP
) -> list:
    """`torchrun LAUNCHER -m fastalex train PACK --out OUT OPTIONS ARGS` as this Python runs it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "-m",
        "fastalex",
        "train",
        pack,
        "--out",
        out,
        *options,
        *args,
    ]


def free_port() -> int:
    """A TCP port free on the loopback address now (for a test's store or rendezvous)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes a torchrun started (children carrying RANK in their env)."""
    from pathlib import Path

    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            env = dict(
                item.split("=", 1)
                for item in (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


class Launched:
    """A command started in its own process group (`launch`): on any exit from the `with` block,
    and on a timeout, the whole group (ranks, their loader workers) is killed, so a hung test
    leaves no orphans. `communicate(timeout)` fails the test with what the processes printed."""

    def __init__(self, command, **kwargs):
        import subprocess

        self.command = [str(part) for part in command]
        self.process = subprocess.Popen(
            self.command,
            start_new_session=True,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **kwargs,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL the process group and every descendant, found before any dies (torchrun
        starts each rank in a session of its own, outside the group; an orphaned rank would
        also hold the pipes open, so reading them would never end)."""
        import os
        import signal

        below = descendants(self.process.pid)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def communicate(self, timeout: float) -> tuple[str, str]:
        import subprocess

        try:
            return self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            stdout, stderr = self.process.communicate()
            pytest.fail(
                f"{' '.join(self.command)} ran past {timeout} s; killed its process "
                f"group.\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
            )

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


# --- loaders over the coded packs (conftest.py) ---------------------------------------------------

BACKEND_PARAMS = ["cpu", pytest.param("dali", marks=pytest.mark.dali), "resident"]


# "cpu-threads": the cpu backend decoding in threads (--decode threads); "cpu" runs --decode auto.
VARIANTS = {"cpu-threads": {"loader": "cpu", "decode": "threads"}}


CPU = torch.device("cpu")


def needs(backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def make(
    pack_path, backend, split, rank=0, world=1, first_epoch=0, device=CPU, skip_samples=0, **fields
):
    """A loader of rank `rank` of `world`; `batch_size`, when given, is each rank's batch (the
    config holds the global one: batch_size * world)."""
    if "batch_size" in fields:
        fields["batch_size"] *= world
    fields = {"loader": backend, **VARIANTS.get(backend, {}), **fields}
    cfg = TrainConfig(shards=str(pack_path), loader_workers=1, **fields)
    return build_loader(cfg, split, Placement(device, rank, world), first_epoch, skip_samples)


def run_epoch(loader, coded, device=CPU) -> tuple[np.ndarray, int]:
    """The image ids of one epoch, in order, and the number of batches; checks every batch's
    layout and that its labels are its images' classes."""
    ids, batches = [], 0
    for images, labels in loader:
        batches += 1
        assert images.dtype == torch.uint8 and images.device.type == device.type
        assert labels.device.type == device.type
        assert images.shape[1:] == (3, 64, 64)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        found = coded.decode(images)
        np.testing.assert_array_equal(labels.cpu().numpy(), found % coded.classes)
        ids.append(found)
    return np.concatenate(ids), batches


BACKENDS = ["cpu", "dali", "resident"]
PACKS = ["coded_pack", "ramp_pack"]


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def ramp_crops(images: torch.Tensor, slope: float) -> dict[str, np.ndarray]:
    """Crop box (w, h in source pixels) and flip of each ramp_pack output, read from its pixels:
    a resampled linear ramp stays linear, value = 30 + 3 * (source x - 0.5), up to rounding to
    uint8 (averaged over S rows or columns)."""
    size = images.shape[-1]
    pixels = images.double()
    j1, j2 = size // 4, 3 * size // 4  # inner columns: clear of border replication
    red = pixels[:, 0].mean(dim=1)  # (N, S): the x ramp, per output column
    green = pixels[:, 1].mean(dim=2)  # (N, S): the y ramp, per output row
    span_x = (red[:, j2] - red[:, j1]) / slope  # source pixels between the two columns
    span_y = (green[:, j2] - green[:, j1]) / slope
    scale = size / (j2 - j1)
    return {
        "w": (span_x.abs() * scale).numpy(),
        "h": (span_y * scale).numpy(),
        "flipped": (span_x < 0).numpy(),
    }
