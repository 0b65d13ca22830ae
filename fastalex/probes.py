"""Short measured windows of this machine, and the cache that keeps their figures.

`measure_steps` times train steps of a config on a synthetic uint8 batch (built by step.py, never a
copy of it); `measure_loaders` times each backend's train loader alone. Windows are interleaved
across the variants after an untimed warm-up, so a slow spell falls on every variant. `Probes` is
the seam auto.py and doctor.py measure through: figures come from the cache when every key is
there, else are measured together and cached; a figure far from its cached twin is measured once
more. A key names everything that changes a figure. Imports torch, runtime, machine, step and the
loaders. Reasons: docs/defaults.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastalex.config import TrainConfig
from fastalex.loaders import build_loader
from fastalex.machine import machine_key
from fastalex.runtime import Runtime, synchronize
from fastalex.step import build_training, make_train_step

PROBE_WINDOWS = 3  # timed windows per variant, interleaved (a slow spell falls on every variant)
PROBE_WARMUP_STEPS = 2  # untimed: the compile (step 1), first momentum buffers (step 2)
PROBE_WINDOW_STEPS = 2  # steps per timed window
PROBE_LOADER_BATCHES = 4  # batches per loader window (after one untimed batch)
# A fresh figure further than this factor from the cached one of the same key was taken in a
# noisy spell (or the cached one was): measured once more, and the second measurement kept.
TWIN_TOLERANCE = 1.3
# 3: keys name threads, world size, compile mode and memory format; windows of several steps.
CACHE_VERSION = 3
StepVariant = tuple[str, bool]  # (amp: "off"/"bf16"/"fp16", compiled)


def synthetic_batch(
    batch_size: int,
    image_size: int,
    num_classes: int,
    device: torch.device,
    memory_format: torch.memory_format,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch as the step receives a loader's: (N, 3, S, S) uint8 pixels in
    `memory_format` (the model normalises them, so a timed step includes that op) and (N,) int64
    labels in 0..num_classes-1, on `device`, drawn from `generator` (on that device)."""
    shape = (batch_size, 3, image_size, image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), device=device, generator=generator)
    return images.contiguous(memory_format=memory_format), labels


def probe_steps(variants: int) -> int:
    """Train steps a probe of `variants` runs: the warm-up and every window's steps, each."""
    return variants * (PROBE_WARMUP_STEPS + PROBE_WINDOWS * PROBE_WINDOW_STEPS)


def measure_steps(
    cfg: TrainConfig,
    runtime: Runtime,
    variants: list[StepVariant],
    num_classes: int,
    clock: Callable[[], float] = time.perf_counter,
    windows: int = PROBE_WINDOWS,
) -> list[dict]:
    """Train steps of cfg's model at cfg.batch_size (the images of one process's step) and image
    size, one process, per variant: {"images_per_s": median of `windows` interleaved windows of
    PROBE_WINDOW_STEPS steps, "compile_s": the first call's time beyond a steady step (compiled
    variants)}."""
    single = runtime.alone()
    steps, first_s = [], []
    generator = torch.Generator(runtime.device).manual_seed(0)
    images, labels = synthetic_batch(
        cfg.batch_size,
        cfg.image_size,
        num_classes,
        runtime.device,
        runtime.memory_format,
        generator,
    )
    with torch.random.fork_rng(devices=[]):  # the run's own seeding is not touched
        for amp, compiled in variants:
            rt = single.variant(amp, compiled)
            t = build_training(cfg, num_classes, rt, steps_per_epoch=1_000_000)
            steps.append(make_train_step(t.model, t.optimizer, t.scaler, cfg, rt))
            synchronize(runtime.device)
            start = clock()
            steps[-1](images, labels)  # the compile, first allocations
            synchronize(runtime.device)
            first_s.append(clock() - start)
            for _ in range(PROBE_WARMUP_STEPS - 1):
                steps[-1](images, labels)
        rates: list[list[float]] = [[] for _ in variants]
        for round_index in range(windows):
            for i in range(len(variants)):
                i = (i + round_index) % len(variants)  # rotate who goes first
                synchronize(runtime.device)
                start = clock()
                for _ in range(PROBE_WINDOW_STEPS):
                    steps[i](images, labels)
                synchronize(runtime.device)
                rates[i].append(PROBE_WINDOW_STEPS * cfg.batch_size / max(clock() - start, 1e-9))
    if any(compiled for _, compiled in variants):
        torch._dynamo.reset()  # the probe's graphs do not outlive it
    figures = []
    for (_, compiled), rate, first in zip(variants, rates, first_s):
        median = sorted(rate)[len(rate) // 2]
        entry = {"images_per_s": median}
        if compiled:
            entry["compile_s"] = max(0.0, first - cfg.batch_size / median)
        figures.append(entry)
    return figures


def measure_loaders(
    cfg: TrainConfig,
    runtime: Runtime,
    backends: list[str],
    clock: Callable[[], float] = time.perf_counter,
    windows: int = PROBE_WINDOWS,
) -> list[float]:
    """Images/s of each backend's train loader alone at cfg.batch_size (one process's batch),
    this process's share of the cores, windows of PROBE_LOADER_BATCHES batches interleaved."""
    placement = runtime.placement.alone()
    loaders, streams = [], []
    try:
        for backend in backends:
            loaders.append(build_loader(replace(cfg, loader=backend), "train", placement))
            streams.append(_endless(loaders[-1]))
            next(streams[-1])  # start-up: workers forked, pipeline built
        rates: list[list[float]] = [[] for _ in backends]
        for round_index in range(windows):
            for i in range(len(backends)):
                i = (i + round_index) % len(backends)
                synchronize(runtime.device)
                start, images = clock(), 0
                for _ in range(PROBE_LOADER_BATCHES):
                    images += len(next(streams[i]).labels)
                synchronize(runtime.device)
                rates[i].append(images / max(clock() - start, 1e-9))
    finally:
        for stream in streams:
            stream.close()
        for loader in loaders:
            loader.close()
    return [sorted(rate)[len(rate) // 2] for rate in rates]


def _endless(loader):
    while True:
        yield from loader


def step_key(cfg: TrainConfig, rt: Runtime, amp: str, compiled: bool) -> str:
    """Everything that changes a step probe's figure: the machine, torch, the threads and the
    processes sharing the machine, the model and its input, the precision, the compile mode."""
    variant = rt.variant(amp, compiled)
    mode = "eager"
    if compiled:
        mode = "compiled step" if variant.alone().compile_whole_step else "compiled model"
    layout = "channels_last" if rt.channels_last else "contiguous"
    return (
        f"step|{machine_key(rt.device)}|torch {torch.__version__}|{rt.device.type}|"
        f"threads {torch.get_num_threads()}|world {rt.world_size} local {rt.local_world_size}|"
        f"{cfg.arch}|{cfg.image_size}px|batch {cfg.batch_size}|{layout}|{amp}|{mode}"
    )


def loader_key(cfg: TrainConfig, rt: Runtime, backend: str, pack: str) -> str:
    """Everything that changes a loader probe's figure."""
    return (
        f"loader|{machine_key(rt.device)}|{backend}|pack {pack}|{cfg.image_size}px|batch "
        f"{cfg.batch_size}|workers {cfg.loader_workers}|decode {cfg.decode}|"
        f"local {rt.local_world_size}"
    )


def probe_cache_file() -> Path:
    """The user's cache directory as the XDG spec names it: $XDG_CACHE_HOME/fastalex, else
    ~/.cache/fastalex."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fastalex" / "probes.json"


class ProbeCache:
    """Probe figures by key, in a small JSON file (None: in memory only, for this process)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.entries = path, {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = data["entries"]
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries = {}  # unreadable: measured again and rewritten

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, figures: dict) -> None:
        self.entries[key] = figures
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1))
        os.replace(tmp, self.path)


def far_apart(new: dict, old: dict | None) -> bool:
    """Whether two figures of one key differ by more than TWIN_TOLERANCE."""
    if not old:
        return False
    a, b = new["images_per_s"], old["images_per_s"]
    return max(a, b) > TWIN_TOLERANCE * min(a, b)


@dataclass
class Probes:
    """What auto.py measures with and where it keeps the figures; tests and doctor inject their
    own measurements (None: this module's measure_steps / measure_loaders, resident's
    free_bytes)."""

    cache: ProbeCache
    read_cache: bool = True  # False (--no-probe-cache): measure again, refreshing the cache
    log: Callable[[str], None] = lambda line: None
    steps: Callable | None = None  # (cfg, runtime, variants, num_classes) -> [figures]
    loaders: Callable | None = None  # (cfg, runtime, backends) -> [images/s]
    free_bytes: Callable[[torch.device], int] | None = None

    @classmethod
    def for_config(cls, cfg: TrainConfig, log: Callable[[str], None] = lambda line: None):
        return cls(ProbeCache(probe_cache_file()), read_cache=cfg.probe_cache, log=log)

    def cached(self, keys: list[str]) -> list | None:
        """The cached figures of every key; None when one is missing or the cache is not read."""
        if not self.read_cache:
            return None
        entries = [self.cache.get(key) for key in keys]
        return entries if all(entry is not None for entry in entries) else None

    def figures(self, keys: list[str], measure: Callable[[], list], what: str) -> tuple:
        """(figures per key, "cache" or "probe"): all from the cache, else measured together;
        measured once more when a figure is far from the cache's figure of the same key."""
        cached = self.cached(keys)
        if cached is not None:
            return cached, "cache"
        self.log(f"auto: measuring {what} ...")
        measured = measure()
        if any(far_apart(new, self.cache.get(key)) for key, new in zip(keys, measured)):
            self.log(f"auto: {what} measured far from the cached figures; measuring again ...")
            measured = measure()
        for key, entry in zip(keys, measured):
            self.cache.put(key, entry)
        return measured, "probe"
