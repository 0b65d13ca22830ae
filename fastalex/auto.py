"""Every `auto` of a run decided here: by rule where the hardware settles it, by the probes
(probes.py) where it does not, each decision {"chose", "by", "reason", figures...}.

AMP: CUDA by compute capability; a CPU without native bf16 keeps float32 by rule (bf16 there is
emulated, never probed); else bf16 only when measured AMP_MARGIN faster. Compile: CUDA always; a
CPU only where the measured gain over the planned steps repays the compile. Loader: `resident`
when the decoded splits fit, else `dali` on a GPU, else the faster of `dali` and `cpu`. `train`
and `doctor` call these same functions. Imports runtime, machine, probes and the loaders.
Reasons and thresholds: docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fastalex.config import TrainConfig
from fastalex.distributed import RANK0_ALONE_S, from_rank0
from fastalex.loaders import canvas_px, dali_usable
from fastalex.probes import (
    PROBE_LOADER_BATCHES,
    PROBE_WINDOWS,
    Probes,
    loader_key,
    measure_loaders,
    measure_steps,
    probe_steps,
    step_key,
)
from fastalex.runtime import Placement, Runtime, has_native_bf16

AMP_MARGIN = 1.10  # bf16 is kept on a CPU only when its probe is >= 10 % faster than fp32
RESIDENT_RAM_SHARE = 0.5  # on a CPU the decoded splits may take half of the free RAM
# Timing a compile costs a compile, so on a CPU it is probed only where it could pay: where the
# best compiled gain recorded on a CPU (COMPILE_GAIN_MAX: bf16 at 227 px on the Intel Xeon,
# 65.7 / 43.1 img/s) over the whole eager run would save more than the cheapest cold compile
# recorded (COMPILE_COLD_MIN_S: 15.9 s, same run; 18-45 s on the 2-core EPYC). Figures in
# benchmarks/results/throughput.jsonl and docs/defaults.md; cached figures are always used.
COMPILE_GAIN_MAX = 1.53
COMPILE_COLD_MIN_S = 15.9
# Emulated bf16 on an AVX2-only AMD EPYC (Zen 3) ran at 3.9 img/s against fp32's 156 (0.03x),
# docs/defaults.md: a CPU without native bf16 keeps float32 without measuring.


def choose_cpu_amp(fp32_img_s: float, bf16_img_s: float) -> str:
    """bf16 only when it measured at least AMP_MARGIN times fp32's rate, else "off"."""
    return "bf16" if bf16_img_s >= AMP_MARGIN * fp32_img_s else "off"


def compile_saving_s(
    eager_img_s: float, compiled_img_s: float, compile_s: float, images: int
) -> float:
    """Seconds a compile saves over `images` training images, its own cost counted (< 0: loses)."""
    return images * (1 / eager_img_s - 1 / compiled_img_s) - compile_s


def planned_steps(cfg: TrainConfig, train_samples: int, world_size: int) -> int:
    """Train steps the run will take: full batches of each rank's share (cfg.batch_size is the
    global batch), cfg.epochs of them, capped by cfg.max_steps."""
    steps = cfg.epochs * ((train_samples // world_size) // (cfg.batch_size // world_size))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def step_figures(cfg, rt, variants, planned, num_classes, probes) -> tuple | None:
    """Cached or measured figures of `variants` for one process of `rt` (its share of the global
    batch, timed alone); None when not cached and the run is no longer than the probe (nothing
    measured could pay back what measuring costs)."""
    one = alone_config(cfg, rt.placement)
    keys = [step_key(one, rt, amp, compiled) for amp, compiled in variants]
    if probes.cached(keys) is None:
        if planned <= probe_steps(len(variants)):
            return None
    measure = probes.steps or measure_steps
    names = ", ".join(f"{amp} {'compiled' if c else 'eager'}" for amp, c in variants)
    return probes.figures(
        keys, lambda: measure(one, rt, list(variants), num_classes), f"train steps ({names})"
    )


def alone_config(cfg: TrainConfig, placement: Placement) -> TrainConfig:
    """cfg as one process of `placement` would run alone: a probe times that process's share of
    the global batch (its images/s are that process's)."""
    return dataclasses.replace(cfg, batch_size=placement.batch_share(cfg.batch_size))


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
    if not has_native_bf16(rt.device):
        return {
            "chose": "off",
            "by": "rule",
            "reason": "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 would be emulated, "
            "far slower than fp32, so it is not measured",
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
    images = planned * rt.placement.batch_share(cfg.batch_size)  # this process's, at its rate
    eager_s = images / eager_img_s
    best_saving_s = eager_s * (1 - 1 / COMPILE_GAIN_MAX)
    cached = probes.cached([step_key(alone_config(cfg, rt.placement), rt, amp, True)]) is not None
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
    if found is None:  # the eager figure was cached, the pair's probe is longer than the run
        return {
            "chose": False,
            "by": "rule",
            "planned_steps": planned,
            "reason": f"a run of {planned} steps is no longer than the compile probe: eager",
        }
    (eager_fig, compiled_fig), source = found
    saving = compile_saving_s(
        eager_fig["images_per_s"],
        compiled_fig["images_per_s"],
        compiled_fig["compile_s"],
        images,
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


def resident_need_bytes(cfg: TrainConfig, manifest, placement: Placement) -> int:
    """Bytes the resident loader would hold on this device (a GPU: this rank's) or machine (a
    CPU: every local rank's): the whole train split (any rank may draw any sample of the global
    order) and this rank's share of val."""
    total = 0
    for split in ("train", "val"):
        info = manifest.splits[split]
        height, width = canvas_px(info.image_px, cfg.image_size)
        held = info.samples if split == "train" else -(-info.samples // placement.world_size)
        total += held * height * width * 3
    return total * (placement.local_world_size if placement.device.type == "cpu" else 1)


def resident_budget_bytes(cfg: TrainConfig, device: torch.device, free_bytes=None) -> int:
    """What the resident loader may take: RESIDENT_RAM_SHARE of the free RAM on a CPU (and no
    more than the resident loader's own check leaves), the free device memory less the
    resident loader's margin on a GPU; never over --resident-max-gb."""
    from fastalex.loaders import resident  # the backend (and its decoder) only when asked

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
    cfg: TrainConfig, placement: Placement, manifest, probes: Probes, planned: int = 0
) -> dict:
    if cfg.loader != "auto":
        return {"chose": cfg.loader, "by": "explicit", "reason": f"--loader {cfg.loader}"}
    device = placement.device
    need = resident_need_bytes(cfg, manifest, placement)
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
    one = alone_config(cfg, placement)
    pack = manifest.splits["train"].shards[0].sha256[:12]
    rt = Runtime(placement, None, False, False)
    keys = [loader_key(one, rt, backend, pack) for backend in backends]
    measure = probes.loaders or measure_loaders
    found, source = probes.figures(
        keys,
        lambda: [{"images_per_s": r} for r in measure(one, rt, backends)],
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


def decide_here(
    cfg: TrainConfig, rt: Runtime, manifest, probes: Probes, recorded: dict | None = None
) -> dict:
    """Every decision of this process, each {"chose", "by", "reason", figures...}: what `train`
    runs and what `doctor` recommends (with the figures it measured in `probes`). `recorded`:
    decisions already made (a resume keeps its run's: rundir.kept_decisions), taken as they are."""
    recorded = recorded or {}
    planned = planned_steps(cfg, manifest.splits["train"].samples, rt.world_size)
    amp = recorded.get("amp") or decide_amp(cfg, rt, planned, manifest.num_classes, probes)
    compiled = recorded.get("compile") or decide_compile(
        cfg, rt.variant(amp["chose"], False), amp["chose"], planned, manifest.num_classes, probes
    )
    loader = recorded.get("loader") or decide_loader(cfg, rt.placement, manifest, probes, planned)
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
    recorded: dict | None = None,
) -> tuple[TrainConfig, Runtime, dict]:
    """Every `auto` of cfg settled: (cfg with amp/compile/loader explicit, the runtime that runs
    them, the decisions). Under DDP rank 0 decides and broadcasts (a collective: every rank calls
    it), so ranks never disagree; its log lines come once, from rank 0. `recorded`: decisions
    kept as they are (decide_here)."""
    probes = probes or Probes.for_config(cfg, log)
    # rank 0 decides (it alone probes) and the others follow, waiting as long as probes take
    budget_s = max(cfg.collective_timeout_s, RANK0_ALONE_S)
    decisions = from_rank0(
        runtime,
        lambda: decide_here(cfg, runtime, manifest, probes, recorded),
        "the `auto` options",
        budget_s,
    )
    amp, compiled = decisions["amp"]["chose"], decisions["compile"]["chose"]
    cfg = dataclasses.replace(cfg, amp=amp, compile=compiled, loader=decisions["loader"]["chose"])
    return cfg, runtime.variant(amp, compiled), decisions


def loader_for(cfg: TrainConfig, placement: Placement, manifest) -> str:
    """The backend of `--loader` for a loader built outside a run (eval, tools, benchmarks):
    decide_loader with the probe cache."""
    return decide_loader(cfg, placement, manifest, Probes.for_config(cfg))["chose"]
