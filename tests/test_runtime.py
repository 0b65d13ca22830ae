"""The device rules of runtime.py: AMP per device (with the GPU faked), loss scaling, the
compile plan, the process's placement."""

from __future__ import annotations

import pytest

from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.runtime import resolve_runtime


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


def test_a_placement_shares_the_global_batch_and_stands_alone_for_a_probe():
    runtime = resolve_runtime(TrainConfig(device="cpu", batch_size=256), 3, 4, 3, 4)
    assert runtime.placement.batch_share(256) == 64
    alone = runtime.alone()
    assert (alone.rank, alone.world_size, alone.local_world_size) == (0, 1, 4)
    assert alone.placement.batch_share(256) == 256
