"""How this process runs a config: the frozen `Runtime` (where it runs, AMP, compile, memory
format) and the device rules that settle what the hardware decides alone.

`resolve_runtime` applies the rules (CUDA: bf16 at compute capability >= 8.0, else fp16 with loss
scaling; always compiled) and refuses impossible combinations; a CPU's `auto` stays float32 and
eager here until auto.py measures it. `Placement` is the process's identity (device, rank, world
size, local world size): one value, carried by the Runtime and handed to the loaders. Imports torch,
the config and machine.py. Reasons: docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.machine import cpu_has_native_bf16

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first CUDA generation with bf16 tensor cores
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Placement(NamedTuple):
    """Where the batches go, which share of the split this process reads, and how many processes
    share this machine's cores (torchrun's LOCAL_WORLD_SIZE)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    def batch_share(self, batch_size: int) -> int:
        """This process's images of a step of the global `batch_size` (a multiple of the world
        size: train() refuses any other)."""
        return batch_size // self.world_size

    def alone(self) -> Placement:
        """This process as if it were the only one (probes, a split decoded whole), its share of
        the machine's cores unchanged."""
        return self._replace(rank=0, world_size=1)


@dataclass(frozen=True)
class Runtime:
    """How this process runs the config: resolved once, passed to every piece."""

    placement: Placement
    amp_dtype: torch.dtype | None  # autocast dtype; None = float32
    channels_last: bool
    compile: bool

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def rank(self) -> int:
        return self.placement.rank

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    @property
    def local_world_size(self) -> int:  # processes on this machine: they share its cores
        return self.placement.local_world_size

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

    def variant(self, amp: str, compiled: bool) -> Runtime:
        """This runtime with another AMP mode and compile setting."""
        return dataclasses.replace(self, amp_dtype=AMP_DTYPES[amp], compile=compiled)

    def alone(self) -> Runtime:
        """This runtime as a single process (Placement.alone)."""
        return dataclasses.replace(self, placement=self.placement.alone())


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability >= 8.0; is_bf16_supported() would also count emulation."""
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (a GPU's tensor cores, a CPU's AVX512-BF16 or
    AMX): where it does not, bf16 is only emulated and never worth measuring."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return cpu_has_native_bf16()


def choose_amp(requested: str, device: torch.device, native_bf16: bool) -> str:
    """ "off", "bf16" or "fp16" for `requested` (cfg.amp) on `device`; `auto` on a CPU is "off"
    until auto.py measures it. UserError for bf16 on a GPU without native bf16."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if native_bf16 else "fp16"
        return "off"
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
    """Device, AMP, memory format and compile by rule; UserError when impossible. A CPU's
    `--amp auto` (fp32 here) and `--compile` unset (off here) are settled by `decide`."""
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
    else:
        device = torch.device("cpu")
    amp = choose_amp(cfg.amp, device, has_native_bf16(device))
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type == "cuda"
    )
    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
    placement = Placement(device, rank, world_size, max(1, local_world_size))
    return Runtime(placement, AMP_DTYPES[amp], channels_last, compiled)


def configure_backends(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 leftovers of AMP
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA sync point: read the clock once the device is done


def describe_device(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return f"{runtime.device} ({torch.cuda.get_device_name(runtime.device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
