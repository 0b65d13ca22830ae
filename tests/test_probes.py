"""The probes: what a step probe feeds, the cache's keys, and a figure far from its cached twin
measured again (the measurements are injected: no real timing is asserted)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from fastalex.config import TrainConfig
from fastalex.probes import (
    PROBE_WARMUP_STEPS,
    PROBE_WINDOW_STEPS,
    ProbeCache,
    Probes,
    measure_steps,
    step_key,
)
from fastalex.runtime import resolve_runtime

CPU = resolve_runtime(TrainConfig(device="cpu"))
FIXED = dict(device="cpu", batch_size=32, epochs=1, compile=False, loader="cpu")


def test_step_probe_times_a_uint8_batch_as_a_loader_hands_it_over(monkeypatch):
    """measure_steps feeds each step (N, 3, S, S) uint8 pixels in the runtime's memory format,
    so the model's normalisation is inside the timed step, and labels of the run's classes."""
    import fastalex.probes

    seen = []
    monkeypatch.setattr(
        fastalex.probes,
        "build_training",
        lambda *a, **k: types.SimpleNamespace(model=None, optimizer=None, scaler=None),
    )
    monkeypatch.setattr(
        fastalex.probes,
        "make_train_step",
        lambda *a: lambda images, labels: seen.append((images, labels)),
    )
    cfg = TrainConfig(**{**FIXED, "batch_size": 6, "image_size": 40})
    for runtime in (CPU, dataclasses.replace(CPU, channels_last=True)):
        seen.clear()
        figures = measure_steps(cfg, runtime, [("off", False)], num_classes=7, windows=1)
        warm, window = PROBE_WARMUP_STEPS, PROBE_WINDOW_STEPS
        assert figures[0]["images_per_s"] > 0 and len(seen) == warm + window  # one window
        images, labels = seen[-1]
        assert images.shape == (6, 3, 40, 40) and images.dtype == torch.uint8
        assert images.is_contiguous(memory_format=runtime.memory_format)
        assert images.float().std() > 50  # random pixels over 0..255
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 7


def test_a_step_key_names_threads_world_size_compile_mode_and_layout(monkeypatch):
    cfg = TrainConfig(**FIXED)
    base = step_key(cfg, CPU, "off", True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert step_key(cfg, CPU, "off", True) != base  # one thread under torchrun, all without
    monkeypatch.undo()
    ddp = resolve_runtime(TrainConfig(device="cpu"), 0, 2, 0, 2)
    assert step_key(cfg, ddp, "off", True) != base
    assert "compiled step" in base and "compiled model" in step_key(cfg, CPU, "fp16", True)
    channels_last = dataclasses.replace(CPU, channels_last=True)
    assert step_key(cfg, channels_last, "off", True) != base
    assert step_key(cfg, CPU, "off", False) != base


@pytest.mark.parametrize(
    "cached, first, second, kept", [(100.0, 300.0, 250.0, 250.0), (110.0, 100.0, None, 100.0)]
)
def test_a_figure_far_from_its_cached_twin_is_measured_again(cached, first, second, kept):
    """The cache holds 100 img/s; a fresh probe says 300 (far): measured once more and the second
    figure kept. A fresh 100 against a cached 110 is near: kept, measured once."""
    cache = ProbeCache(None)
    cache.put("k", {"images_per_s": cached})
    answers = [[{"images_per_s": first}], [{"images_per_s": second}]]

    def measure():
        return answers.pop(0)

    found, source = Probes(cache, read_cache=False).figures(["k"], measure, "a step")
    assert source == "probe" and found[0]["images_per_s"] == kept
    assert len(answers) == (0 if second else 1)
    assert cache.get("k")["images_per_s"] == kept
