"""What this machine is: the CPU (model, the flags that decide speed, usable cores), the GPU, the
library versions and the code version. One record, shared by a run's config/summary, the probe
cache's keys, `fastalex doctor` and the benchmarks' report (benchmarks/report.py).

Imports torch and the config only; reads /proc/cpuinfo and asks git, nothing else.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from fastalex.config import default_workers

SPEED_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f")  # tell apart CPUs /proc names alike
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # bf16 arithmetic in hardware, not emulated
# Versions recorded beside torch, DALI and Python.
VERSIONED = ("pillow", "simplejpeg", "numpy", "opencv-python-headless", "ffcv")
# What limits the instruction sets the CPU kernels use: torch's (and inductor's) and OpenCV's.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "OPENCV_CPU_DISABLE")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split()[2:])
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): `--amp bf16` runs
    there without emulation (whether it is faster, only a measurement says)."""
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or "unknown CPU"


def describe_machine(device: torch.device | None = None) -> dict:
    """The machine as a run records it: two CPUs /proc names alike are told apart by the flags
    that decide speed (AMX, AVX512-BF16, AVX512F) and the cores this process may use."""
    flags = cpu_flags()
    machine = {
        "cpu": cpu_model(),
        "cores": default_workers(),
        **{flag: flag in flags for flag in SPEED_FLAGS},
    }
    if device is not None and device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def machine_key(device: torch.device) -> str:
    """The machine in one line: the probe cache's key part (a figure belongs to its machine)."""
    m = describe_machine(device)
    flags = ",".join(f for f in SPEED_FLAGS if m[f])
    return f"{m.get('gpu') or m['cpu']} [{flags}] x{m['cores']}"


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_sha(short: bool = True) -> str:
    """The fastalex checkout's commit ("unknown" outside git); "+dirty" when files changed."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return (sha[:7] if short else sha) + ("+dirty" if dirty else "")


def library_versions() -> dict:
    """Installed versions of what a figure depends on: DALI (any nvidia-dali-* build) and
    VERSIONED, None where absent."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            found["dali"] = dist.version
        elif name in VERSIONED:
            found[name] = dist.version
    return {"dali": found.get("dali"), **{name: found.get(name) for name in VERSIONED}}


def versions(device: torch.device) -> dict:
    """torch, Python, DALI, CUDA and cuDNN versions as a run's summary records them."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dali": library_versions()["dali"],
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }


def machine_record(device: torch.device) -> dict:
    """Everything a benchmark figure depends on: describe_machine, the GPU count and driver,
    every library version, the instruction set torch's CPU kernels use and the environment that
    limits torch's and OpenCV's (ISA_LIMITS), the commit and whether the tree was dirty."""
    cuda = device.type == "cuda"
    driver = None
    if cuda:
        try:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            driver = (done.stdout.strip().splitlines() or [None])[0]
        except (OSError, subprocess.SubprocessError):
            driver = None
    sha = git_sha(short=False)
    return {
        **describe_machine(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver": driver,
        **versions(device),
        **{k: v for k, v in library_versions().items() if k != "dali"},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name.lower(): os.environ.get(name) for name in ISA_LIMITS},
        "git_sha": None if sha == "unknown" else sha.removesuffix("+dirty"),
        "git_dirty": sha == "unknown" or sha.endswith("+dirty"),
    }
