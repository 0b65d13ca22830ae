"""How this process runs a config: device, autocast dtype, loss scaling, memory format, compile
plan; and the facts about the machine a run records (device name, versions, git sha).

Imports torch and the config; never data, model or trainer code. ``resolve_runtime`` is the one
place that turns ``--device``/``--amp``/``--channels-last``/``--compile`` into decisions, and it
refuses impossible combinations with a UserError.

AMP. ``--amp auto`` is bf16 where the hardware computes bf16 natively and fast, else fp16 with a
GradScaler on CUDA and fp32 on a CPU. That means: a CUDA device of compute capability >= 8.0 (Ampere
on; ``torch.cuda.is_bf16_supported()`` also says yes for older GPUs that only emulate bf16, where
cuDNN falls back to slow kernels and inductor skips bf16 graphs), or a CPU with AMX-BF16
(`cpu_bf16_pays`: on a CPU with AVX512-BF16 but no AMX the bf16 step measured slower than fp32;
`--amp bf16` still runs there). ``--amp bf16`` on a GPU without it is an error; ``--amp fp16`` runs
anywhere, on the CPU through the very code the CUDA fp16 path uses (``GradScaler("cpu")``, fused SGD
taking the scale and the inf flag), so CI exercises it.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from fastalex.config import TrainConfig
from fastalex.errors import UserError

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first CUDA generation with bf16 tensor cores


@dataclass(frozen=True)
class Runtime:
    """How this process runs the config: resolved once, passed to every piece."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None = float32
    channels_last: bool
    compile: bool
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine: they share its cores

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def grad_scaler(self) -> bool:  # fp16 needs loss scaling; bf16 has float32's range
        return self.amp_dtype == torch.float16

    @property
    def amp(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def compile_whole_step(self) -> bool:
        """One compiled function for forward, backward and SGD (CPU, one process, no loss
        scaling: dynamo does not trace into GradScaler), else the model alone."""
        return (
            self.compile
            and self.device.type == "cpu"
            and self.world_size == 1
            and not self.grad_scaler
        )

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split()[2:])
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): `--amp bf16` runs
    there without emulation."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast makes this CPU's train step faster, so `--amp auto` picks it: with
    AMX-BF16 (tile matrix units) it does, the compiled alexnet64 step at 64 px 470 ms against 682
    in fp32 on one core of an AMX Xeon; with AVX512-BF16 alone it does not, 155 against 220 img/s
    on a Xeon that has no AMX (benchmarks/results: the model group of each machine)."""
    return "amx_bf16" in cpu_flags()


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability >= 8.0; is_bf16_supported() would also count emulation."""
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def choose_amp(requested: str, device: torch.device, native_bf16: bool) -> str:
    """ "off", "bf16" or "fp16" for `requested` (cfg.amp) on `device`; UserError for bf16 where
    the device has no native bf16 on CUDA."""
    if requested == "auto":
        if native_bf16:
            return "bf16"
        return "fp16" if device.type == "cuda" else "off"
    if requested == "bf16" and device.type == "cuda" and not native_bf16:
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(
            f"--amp bf16: {name} (compute capability {major}.{minor}) has no native "
            "bf16, only slow emulation; use --amp fp16 or auto"
        )
    return requested


def resolve_runtime(
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    local_world_size: int = 1,
) -> Runtime:
    """Device, AMP, memory format and compile for this process; UserError when impossible."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError(
            f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device; "
            "use --device cpu"
        )
    if cfg.device == "cuda" or (cfg.device == "auto" and cuda):
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} "
                "visible; start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        native_bf16 = cuda_has_native_bf16(device)
    else:
        device = torch.device("cpu")
        native_bf16 = cpu_bf16_pays()
    amp = choose_amp(cfg.amp, device, native_bf16)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type == "cuda"
    )
    return Runtime(
        device, amp_dtype, channels_last, cfg.compile, rank, world_size, max(1, local_world_size)
    )


def configure_backends(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 leftovers of AMP
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return f"{runtime.device} ({torch.cuda.get_device_name(runtime.device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def git_sha(short: bool = True) -> str:
    """The fastalex checkout's commit ("unknown" outside git); "+dirty" when files changed."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha[:7] if short else sha) + ("+dirty" if dirty else "")


def versions(runtime: Runtime) -> dict:
    from importlib import metadata

    dali = next(
        (
            d.version
            for d in metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")
        ),
        None,
    )
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dali": dali,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if runtime.device.type == "cuda" else None,
    }
