"""Runtime decisions: AMP per device (with the GPU faked), loss scaling and the compile plan."""

from __future__ import annotations

import pytest
import torch

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.runtime import resolve_runtime


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible CUDA device of the given compute capability; torch's own bf16 check says yes
    whatever the capability, as it does for GPUs that only emulate bf16."""

    def install(capability: tuple[int, int], name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return install


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_auto_amp_is_fp16_with_loss_scaling_on_gpus_without_native_bf16(fake_gpu, capability):
    fake_gpu(capability, "Tesla T4")
    runtime = resolve_runtime(TrainConfig(device="cuda", amp="auto"))
    assert runtime.amp == "fp16" and runtime.grad_scaler


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
def test_auto_amp_is_bf16_on_gpus_with_native_bf16(fake_gpu, capability):
    fake_gpu(capability)
    runtime = resolve_runtime(TrainConfig(device="cuda", amp="auto"))
    assert runtime.amp == "bf16" and not runtime.grad_scaler
    assert runtime.channels_last  # auto: on for CUDA


def test_bf16_on_a_gpu_that_only_emulates_it_is_a_clear_error(fake_gpu):
    fake_gpu((7, 5), "Tesla T4")
    with pytest.raises(UserError, match=r"Tesla T4 \(compute capability 7.5\).*--amp fp16"):
        resolve_runtime(TrainConfig(device="cuda", amp="bf16"))


def test_fp16_runs_on_the_cpu_with_a_grad_scaler_and_the_model_compiled_alone():
    runtime = resolve_runtime(TrainConfig(device="cpu", amp="fp16", compile=True))
    assert runtime.device.type == "cpu" and runtime.amp == "fp16" and runtime.grad_scaler
    assert not runtime.compile_whole_step  # dynamo does not trace into GradScaler
    bf16 = resolve_runtime(TrainConfig(device="cpu", amp="bf16", compile=True))
    assert bf16.compile_whole_step and not bf16.grad_scaler


def test_local_world_size_is_kept_for_the_loaders():
    runtime = resolve_runtime(TrainConfig(device="cpu"), 1, 4, 1, local_world_size=2)
    assert (runtime.rank, runtime.world_size, runtime.local_world_size) == (1, 4, 2)


@pytest.mark.parametrize(
    "flags, auto",
    [
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bf16"),
        ({"avx512f", "avx512_bf16"}, "off"),
        ({"avx2"}, "off"),
    ],
)
def test_auto_amp_on_the_cpu_is_bf16_only_where_it_measured_faster(monkeypatch, flags, auto):
    """AMX makes the bf16 step faster; AVX512-BF16 alone made it slower (0.7x fp32)."""
    monkeypatch.setattr("fastalex.runtime.cpu_flags", lambda: flags)
    assert resolve_runtime(TrainConfig(device="cpu", amp="auto")).amp == auto
    assert resolve_runtime(TrainConfig(device="cpu", amp="bf16")).amp == "bf16"
