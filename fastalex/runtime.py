"""How this process runs a config (device, AMP, compile, loader), and the machine a run records.

Every `auto` is decided here. `resolve_runtime` applies the rules the hardware settles (CUDA: bf16
at compute capability >= 8.0, else fp16 with loss scaling; always compiled) and refuses impossible
combinations; `decide` settles the rest by short measured probes (a CPU's AMP and compile; the
loader when the split does not stay resident), each decision with its reason and figures, probe
figures cached per machine in a small JSON, rank 0 deciding for every rank. An explicit option
skips its probe. Imports torch and the config; train.py and the loaders only lazily, inside the
default measurements (doctor.py reuses them). Reasons and thresholds: docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastalex.config import TrainConfig, default_workers
from fastalex.errors import UserError

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first CUDA generation with bf16 tensor cores
AMP_MARGIN = 1.10  # bf16 is kept on a CPU only when its probe is >= 10 % faster than fp32
RESIDENT_RAM_SHARE = 0.5  # on a CPU the decoded splits may take half of the free RAM
# Timing a compile costs a compile, so on a CPU it is probed only where it could pay: where the
# best compiled gain recorded on a CPU (COMPILE_GAIN_MAX: bf16 at 227 px on the Intel Xeon,
# 65.7 / 43.1 img/s) over the whole eager run would save more than the cheapest cold compile
# recorded (COMPILE_COLD_MIN_S: 15.9 s, same run; 18-45 s on the 2-core EPYC). Figures in
# benchmarks/results/throughput.jsonl and docs/defaults.md; cached figures are always used.
COMPILE_GAIN_MAX = 1.53
COMPILE_COLD_MIN_S = 15.9
PROBE_WINDOWS = 3  # timed windows per variant, interleaved (a slow spell falls on every variant)
PROBE_WINDOW_STEPS = 1  # steps per window (after one untimed warm-up step per variant)
PROBE_LOADER_BATCHES = 4  # batches per loader window (after one untimed batch)
# 2: the step probes feed uint8 pixels, which the model normalises inside the timed step; figures
# of version 1 timed float inputs, without that op, and are measured again.
CACHE_VERSION = 2
StepVariant = tuple[str, bool]  # (amp: "off"/"bf16"/"fp16", compiled)


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

    def variant(self, amp: str, compiled: bool) -> Runtime:
        """This runtime with another AMP mode and compile setting."""
        return dataclasses.replace(self, amp_dtype=AMP_DTYPES[amp], compile=compiled)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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
        **{flag: flag in flags for flag in ("amx_bf16", "avx512_bf16", "avx512f")},
    }
    if device is not None and device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability >= 8.0; is_bf16_supported() would also count emulation."""
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def choose_amp(requested: str, device: torch.device, native_bf16: bool) -> str:
    """ "off", "bf16" or "fp16" for `requested` (cfg.amp) on `device`; `auto` on a CPU is "off"
    until `decide` measures it. UserError for bf16 on a GPU without native bf16."""
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
        native_bf16 = cuda_has_native_bf16(device)
    else:
        device = torch.device("cpu")
        native_bf16 = cpu_has_native_bf16()
    amp = choose_amp(cfg.amp, device, native_bf16)
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type == "cuda"
    )
    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
    return Runtime(
        device,
        AMP_DTYPES[amp],
        channels_last,
        compiled,
        rank,
        world_size,
        max(1, local_world_size),
    )


# --- measuring: the default probes (tests inject their own) ---------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA sync point: read the clock once the device is done


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


def measure_steps(
    cfg: TrainConfig,
    runtime: Runtime,
    variants: list[StepVariant],
    num_classes: int,
    clock: Callable[[], float] = time.perf_counter,
    windows: int = PROBE_WINDOWS,
) -> list[dict]:
    """Train steps of cfg's model at its batch and image size on a synthetic uint8 batch
    (synthetic_batch), one process, per variant: {"images_per_s": median of `windows`
    interleaved windows, "compile_s": the first call's time beyond a steady step (compiled
    variants)}. Built by fastalex.train, never a copy."""
    from fastalex.train import build_training, make_train_step

    single = dataclasses.replace(runtime, rank=0, world_size=1)
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
            steps[-1](images, labels)  # warm-up: the compile, first allocations
            synchronize(runtime.device)
            first_s.append(clock() - start)
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
    """Images/s of each backend's train loader alone, this process's share of the cores,
    windows of PROBE_LOADER_BATCHES batches interleaved across the backends."""
    from fastalex.loaders import Placement, build_loader

    placement = Placement(runtime.device, 0, 1, runtime.local_world_size)
    loaders, streams = [], []
    try:
        for backend in backends:
            loaders.append(
                build_loader(dataclasses.replace(cfg, loader=backend), "train", placement)
            )
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


# --- the probe cache --------------------------------------------------------------------------


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


# --- deciding every `auto` ------------------------------------------------------------------


def choose_cpu_amp(fp32_img_s: float, bf16_img_s: float) -> str:
    """bf16 only when it measured at least AMP_MARGIN times fp32's rate, else "off"."""
    return "bf16" if bf16_img_s >= AMP_MARGIN * fp32_img_s else "off"


def compile_saving_s(
    eager_img_s: float, compiled_img_s: float, compile_s: float, images: int
) -> float:
    """Seconds a compile saves over `images` training images, its own cost counted (< 0: loses)."""
    return images * (1 / eager_img_s - 1 / compiled_img_s) - compile_s


def planned_steps(cfg: TrainConfig, train_samples: int, world_size: int) -> int:
    """Train steps the run will take: full batches of each rank's share, cfg.epochs of them,
    capped by cfg.max_steps."""
    steps = cfg.epochs * ((train_samples // world_size) // cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def probe_steps(variants: int) -> int:
    """Train steps a probe of `variants` runs: one warm-up and every window's steps each."""
    return variants * (1 + PROBE_WINDOWS * PROBE_WINDOW_STEPS)


def machine_key(device: torch.device) -> str:
    m = describe_machine(device)
    flags = ",".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f") if m[f])
    return f"{m.get('gpu') or m['cpu']} [{flags}] x{m['cores']}"


@dataclass
class Probes:
    """What `decide` measures with and where it keeps the figures; tests inject their own
    measurements (None: this module's measure_steps / measure_loaders, resident's free_bytes)."""

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
        """(figures per key, "cache" or "probe"): all from the cache, else measured together."""
        cached = self.cached(keys)
        if cached is not None:
            return cached, "cache"
        self.log(f"auto: measuring {what} ...")
        measured = measure()
        for key, entry in zip(keys, measured):
            self.cache.put(key, entry)
        return measured, "probe"


def step_key(cfg: TrainConfig, device: torch.device, amp: str, compiled: bool) -> str:
    return (
        f"step|{machine_key(device)}|torch {torch.__version__}|{device.type}|{cfg.arch}|"
        f"{cfg.image_size}px|batch {cfg.batch_size}|{amp}|{'compiled' if compiled else 'eager'}"
    )


def step_figures(cfg, rt, variants, planned, num_classes, probes) -> tuple | None:
    """Cached or measured figures of `variants`; None when not cached and the run is no
    longer than the probe (nothing measured could pay back what measuring costs)."""
    keys = [step_key(cfg, rt.device, amp, compiled) for amp, compiled in variants]
    if probes.cached(keys) is None:
        if planned <= probe_steps(len(variants)):
            return None
    measure = probes.steps or measure_steps
    names = ", ".join(f"{amp} {'compiled' if c else 'eager'}" for amp, c in variants)
    return probes.figures(
        keys, lambda: measure(cfg, rt, list(variants), num_classes), f"train steps ({names})"
    )


def decide_amp(cfg: TrainConfig, rt: Runtime, planned: int, num_classes: int, probes) -> dict:
    if cfg.amp != "auto":
        return {"chose": cfg.amp, "by": "explicit", "reason": f"--amp {cfg.amp}"}
    if rt.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(rt.device)
        native = "native bf16" if rt.amp == "bf16" else "no native bf16: fp16 + loss scaling"
        return {
            "chose": rt.amp,
            "by": "rule",
            "reason": f"compute capability {major}.{minor}, {native}",
        }
    found = step_figures(cfg, rt, [("off", False), ("bf16", False)], planned, num_classes, probes)
    if found is None:
        return {
            "chose": "off",
            "by": "rule",
            "planned_steps": planned,
            "reason": f"a run of {planned} steps is no longer than the probe: fp32 unmeasured",
        }
    (fp32, bf16), source = found
    fp32_img_s, bf16_img_s = fp32["images_per_s"], bf16["images_per_s"]
    chose = choose_cpu_amp(fp32_img_s, bf16_img_s)
    return {
        "chose": chose,
        "by": source,
        "reason": f"eager bf16 ran at {bf16_img_s / fp32_img_s:.2f}x fp32; bf16 is kept only at "
        f">= {AMP_MARGIN:.2f}x",
        "fp32_img_s": fp32_img_s,
        "bf16_img_s": bf16_img_s,
    }


def decide_compile(
    cfg: TrainConfig, rt: Runtime, amp: str, planned: int, num_classes: int, probes
) -> dict:
    if cfg.compile is not None:
        return {
            "chose": cfg.compile,
            "by": "explicit",
            "reason": "--compile" if cfg.compile else "--no-compile",
        }
    if rt.device.type == "cuda":
        return {"chose": True, "by": "rule", "reason": "CUDA: always compiled"}
    eager = step_figures(cfg, rt, [(amp, False)], planned, num_classes, probes)
    if eager is None:
        return {
            "chose": False,
            "by": "rule",
            "planned_steps": planned,
            "reason": f"a run of {planned} steps is no longer than the probe: eager",
        }
    eager_img_s = eager[0][0]["images_per_s"]
    eager_s = planned * cfg.batch_size / eager_img_s
    best_saving_s = eager_s * (1 - 1 / COMPILE_GAIN_MAX)
    cached = probes.cached([step_key(cfg, rt.device, amp, True)]) is not None
    if not cached and best_saving_s < COMPILE_COLD_MIN_S:
        return {
            "chose": False,
            "by": "rule",
            "eager_img_s": eager_img_s,
            "eager_run_s": eager_s,
            "reason": f"the whole run takes ~{eager_s:.0f} s eager: even a {COMPILE_GAIN_MAX}x "
            f"compiled gain would save {best_saving_s:.0f} s, under the {COMPILE_COLD_MIN_S} s "
            "the cheapest cold compile has cost, so compiling is not probed",
        }
    found = step_figures(cfg, rt, [(amp, False), (amp, True)], planned, num_classes, probes)
    (eager_fig, compiled_fig), source = found
    saving = compile_saving_s(
        eager_fig["images_per_s"],
        compiled_fig["images_per_s"],
        compiled_fig["compile_s"],
        planned * cfg.batch_size,
    )
    return {
        "chose": saving > 0,
        "by": source,
        "reason": f"over {planned} steps compiling {'saves' if saving > 0 else 'loses'} "
        f"{abs(saving):.1f} s, its {compiled_fig['compile_s']:.1f} s compile counted",
        "eager_img_s": eager_fig["images_per_s"],
        "compiled_img_s": compiled_fig["images_per_s"],
        "compile_s": compiled_fig["compile_s"],
        "planned_steps": planned,
    }


def resident_need_bytes(cfg: TrainConfig, manifest, device, world_size, local_world_size) -> int:
    """Bytes the resident loader would hold on this device (a GPU: this rank's) or machine (a
    CPU: every local rank's): the whole train split (any rank may draw any sample of the global
    order) and this rank's share of val."""
    from fastalex.loaders import canvas_px

    total = 0
    for split in ("train", "val"):
        info = manifest.splits[split]
        height, width = canvas_px(info.image_px, cfg.image_size)
        held = info.samples if split == "train" else -(-info.samples // world_size)
        total += held * height * width * 3
    return total * (local_world_size if device.type == "cpu" else 1)


def resident_budget_bytes(cfg: TrainConfig, device: torch.device, free_bytes=None) -> int:
    """What the resident loader may take: RESIDENT_RAM_SHARE of the free RAM on a CPU (and no
    more than the resident loader's own check leaves), the free device memory less the
    resident loader's margin on a GPU; never over --resident-max-gb."""
    from fastalex.loaders import resident

    free = (free_bytes or resident.free_bytes)(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = free - max(resident.CUDA_MARGIN_BYTES, int(resident.CUDA_MARGIN_FRACTION * total))
    else:
        budget = min(int(RESIDENT_RAM_SHARE * free), free - resident.RAM_MARGIN_BYTES)
    if cfg.resident_max_gb:
        budget = min(budget, int(cfg.resident_max_gb * 2**30))
    return max(0, budget)


def decide_loader(
    cfg: TrainConfig, device, world_size: int, local_world_size: int, manifest, probes, planned=0
) -> dict:
    if cfg.loader != "auto":
        return {"chose": cfg.loader, "by": "explicit", "reason": f"--loader {cfg.loader}"}
    from fastalex.loaders import dali_usable

    need = resident_need_bytes(cfg, manifest, device, world_size, local_world_size)
    budget = resident_budget_bytes(cfg, device, probes.free_bytes)
    sizes = {"resident_need_gib": need / 2**30, "resident_budget_gib": budget / 2**30}
    where = "device memory" if device.type == "cuda" else f"{RESIDENT_RAM_SHARE:.0%} of free RAM"
    if need <= budget:
        return {
            "chose": "resident",
            "by": "rule",
            **sizes,
            "reason": f"the decoded splits ({need / 2**30:.2f} GiB) fit the budget "
            f"({budget / 2**30:.2f} GiB: {where})",
        }
    too_big = f"the decoded splits ({need / 2**30:.2f} GiB) exceed {where} ({budget / 2**30:.2f})"
    dali = dali_usable(device)
    if device.type == "cuda" or not dali:
        chose = "dali" if dali else "cpu"
        why = "DALI decodes on the GPU" if dali else "DALI is not installed"
        return {"chose": chose, "by": "rule", **sizes, "reason": f"{too_big}; {why}"}
    backends = ["dali", "cpu"]
    if planned and planned <= len(backends) * (1 + PROBE_WINDOWS * PROBE_LOADER_BATCHES):
        return {
            "chose": "cpu",
            "by": "rule",
            **sizes,
            "reason": f"{too_big}; a run of {planned} steps is no longer than the probe",
        }
    pack = manifest.splits["train"].shards[0].sha256[:12]
    keys = [
        f"loader|{machine_key(device)}|{backend}|pack {pack}|{cfg.image_size}px|batch "
        f"{cfg.batch_size}|workers {cfg.loader_workers}|local {local_world_size}"
        for backend in backends
    ]
    rt = Runtime(device, None, False, False, 0, 1, local_world_size)
    measure = probes.loaders or measure_loaders
    found, source = probes.figures(
        keys,
        lambda: [{"images_per_s": r} for r in measure(cfg, rt, backends)],
        "loaders (dali, cpu)",
    )
    rates = {b: f["images_per_s"] for b, f in zip(backends, found)}
    chose = max(backends, key=lambda b: rates[b])
    return {
        "chose": chose,
        "by": source,
        **sizes,
        "dali_img_s": rates["dali"],
        "cpu_img_s": rates["cpu"],
        "reason": f"{too_big}; {chose} measured faster",
    }


def decide_here(cfg: TrainConfig, rt: Runtime, manifest, probes: Probes) -> dict:
    """Every decision of this process, each {"chose", "by", "reason", figures...}."""
    planned = planned_steps(cfg, manifest.splits["train"].samples, rt.world_size)
    amp = decide_amp(cfg, rt, planned, manifest.num_classes, probes)
    compiled = decide_compile(
        cfg, rt.variant(amp["chose"], False), amp["chose"], planned, manifest.num_classes, probes
    )
    loader = decide_loader(
        cfg, rt.device, rt.world_size, rt.local_world_size, manifest, probes, planned
    )
    return {"amp": amp, "compile": compiled, "loader": loader}


def decision_lines(decisions: dict) -> list[str]:
    """One log line per decision: what it chose, by what (explicit, rule, probe, cache), why.
    The trainer logs them once the loaders are built, so an error in the options or the pack
    stays a one-line message."""
    lines = []
    for name, d in decisions.items():
        shown = {True: "on", False: "off"}.get(d["chose"], d["chose"])
        lines.append(f"auto {name}: {shown} ({d['by']}: {d['reason']})")
    return lines


def decide(
    cfg: TrainConfig,
    runtime: Runtime,
    manifest,
    log: Callable[[str], None] = lambda line: None,
    probes: Probes | None = None,
) -> tuple[TrainConfig, Runtime, dict]:
    """Every `auto` of cfg settled: (cfg with amp/compile/loader explicit, the runtime that runs
    them, the decisions). Under DDP rank 0 decides and broadcasts (a collective: every rank calls
    it), so ranks never disagree; its log lines come once, from rank 0."""
    import torch.distributed as dist

    probes = probes or Probes.for_config(cfg, log)
    if runtime.world_size > 1 and dist.is_initialized():
        box: list = [None]
        if runtime.rank == 0:
            try:
                box = [decide_here(cfg, runtime, manifest, probes)]
            except Exception as e:  # the other ranks hear of it rather than wait forever
                dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise UserError(f"rank 0 could not decide the `auto` options: {box[0]}")
        decisions = box[0]
    else:
        decisions = decide_here(cfg, runtime, manifest, probes)
    amp, compiled = decisions["amp"]["chose"], decisions["compile"]["chose"]
    cfg = dataclasses.replace(cfg, amp=amp, compile=compiled, loader=decisions["loader"]["chose"])
    return cfg, runtime.variant(amp, compiled), decisions


def decide_loader_backend(cfg: TrainConfig, placement, manifest) -> str:
    """`--loader auto` for a loader built outside a run (eval, benchmarks): decide_loader with
    the probe cache."""
    decision = decide_loader(
        cfg,
        placement.device,
        placement.world_size,
        placement.local_world_size,
        manifest,
        Probes.for_config(cfg),
    )
    return decision["chose"]


def configure_backends(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 leftovers of AMP
        torch.backends.cudnn.allow_tf32 = True


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
