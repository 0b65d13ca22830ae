"""`fastalex doctor SHARDS`: what this machine should run, and whether a run of it is data-bound.

Times, in short interleaved windows, the train step in each AMP mode the device runs natively,
eager and compiled, on a synthetic uint8 batch already on the device (no loader: the upper bound),
and each loader's images/s on the pack alone; then hands those figures to auto.py's own
decisions (the ones `fastalex train` makes), through the probe cache that `train` reads too,
so the command it prints is what `train` then runs, with the reasons, the predicted epoch time
and the share of it the model would wait on the loader. Returns one JSON-ready dict; fastalex.cli
prints it. Reasons: docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from fastalex.auto import (
    alone_config,
    decide_here,
    decision_lines,
    resident_budget_bytes,
    resident_need_bytes,
)
from fastalex.config import TrainConfig
from fastalex.loaders import dali_usable
from fastalex.machine import describe_machine
from fastalex.probes import (
    PROBE_WINDOWS,
    Probes,
    loader_key,
    measure_loaders,
    measure_steps,
    step_key,
)
from fastalex.runtime import Runtime, has_native_bf16, resolve_runtime
from fastalex.shards import read_manifest


def amp_modes(runtime: Runtime) -> list[str]:
    """The AMP modes worth timing here: fp32 and the one low precision the device runs natively
    (none on a CPU without native bf16: emulated bf16 is never a candidate)."""
    if runtime.device.type == "cuda":
        return ["off", "bf16" if has_native_bf16(runtime.device) else "fp16"]
    return ["off", "bf16"] if has_native_bf16(runtime.device) else ["off"]


def diagnose(
    cfg: TrainConfig,
    compiled_rows: bool = True,
    windows: int = PROBE_WINDOWS,
    log: Callable[[str], None] = lambda line: None,
    steps: Callable = measure_steps,
    loaders: Callable = measure_loaders,
) -> dict:
    """Every row timed on this machine, the decisions and their prediction (module docstring)."""
    manifest = read_manifest(Path(cfg.shards))
    runtime = resolve_runtime(cfg)
    modes = amp_modes(runtime)
    variants = [(amp, False) for amp in modes] + [(amp, True) for amp in modes]
    timed = [v for v in variants if compiled_rows or not v[1]]
    log(f"doctor: timing {len(timed)} train steps ({', '.join(label(*v) for v in timed)}) ...")
    figures = dict(zip(timed, steps(cfg, runtime, timed, manifest.num_classes, windows=windows)))
    rows = [step_row(variant, figures.get(variant)) for variant in variants]
    if "bf16" not in modes and runtime.device.type == "cpu":
        rows.append(
            {
                "kind": "step",
                "name": "bf16",
                "images_per_s": None,
                "note": "skipped: no native bf16 on this CPU (emulated, never chosen)",
            }
        )
    need = resident_need_bytes(cfg, manifest, runtime.placement)
    budget = resident_budget_bytes(cfg, runtime.device)
    backends = ["cpu"] + (["dali"] if dali_usable(runtime.device) else [])
    backends += ["resident"] if need <= budget else []
    log(f"doctor: timing loaders ({', '.join(backends)}) on {cfg.shards} ...")
    rates = dict(zip(backends, loaders(cfg, runtime, backends, windows=windows)))
    for backend in ("cpu", "dali", "resident"):
        row = {"kind": "loader", "name": backend, "images_per_s": rates.get(backend)}
        if backend not in rates:
            row["note"] = (
                "skipped: DALI not installed"
                if backend == "dali"
                else f"skipped: {need / 2**30:.2f} GiB decoded over the {budget / 2**30:.2f} GiB "
                "budget"
            )
        rows.append(row)
    if not compiled_rows:  # --quick times no compile: say so rather than compile now
        cfg = dataclasses.replace(cfg, compile=False)
    probes = measured_probes(cfg, runtime, manifest, figures, rates, steps, loaders, windows, log)
    decisions = decide_here(cfg, runtime, manifest, probes)
    return {
        "machine": describe_machine(runtime.device),
        "device": str(runtime.device),
        "config": {k: getattr(cfg, k) for k in ("arch", "image_size", "batch_size", "epochs")},
        "rows": rows,
        "decisions": decisions,
        **recommend(cfg, manifest, decisions, figures, rates),
    }


def step_row(variant: tuple[str, bool], figure: dict | None) -> dict:
    row = {"kind": "step", "name": label(*variant), "amp": variant[0], "compiled": variant[1]}
    if figure is not None:
        row.update(figure, note="synthetic uint8 batch on the device: no loader")
    else:
        row.update(images_per_s=None, note="skipped: compiled rows off (--quick)")
    return row


def measured_probes(cfg, runtime, manifest, figures, rates, steps, loaders, windows, log) -> Probes:
    """The user's probe cache with the doctor's figures put under the keys auto.py looks up (so
    a `fastalex train` after it decides from them too), measuring anything else with the
    doctor's own functions."""
    probes = Probes.for_config(cfg, log)
    probes.steps = lambda *args: steps(*args, windows=windows)
    probes.loaders = lambda *args: loaders(*args, windows=windows)
    one = alone_config(cfg, runtime.placement)
    for (amp, compiled), figure in figures.items():
        probes.cache.put(step_key(one, runtime, amp, compiled), figure)
    pack = manifest.splits["train"].shards[0].sha256[:12]
    for backend, rate in rates.items():
        probes.cache.put(loader_key(one, runtime, backend, pack), {"images_per_s": rate})
    return probes


def label(amp: str, compiled: bool) -> str:
    return f"{'fp32' if amp == 'off' else amp} {'compiled' if compiled else 'eager'}"


def recommend(cfg, manifest, decisions: dict, figures: dict, rates: dict) -> dict:
    """The command the decisions imply, and what it predicts where its rows were timed."""
    amp, compiled = decisions["amp"]["chose"], decisions["compile"]["chose"]
    loader = decisions["loader"]["chose"]
    command = (
        f"fastalex train {cfg.shards} --amp {amp} --{'' if compiled else 'no-'}compile "
        f"--loader {loader}"
    )
    defaults = TrainConfig()
    for name in ("arch", "image_size", "batch_size", "epochs", "device"):
        if getattr(cfg, name) != getattr(defaults, name):
            command += f" --{name.replace('_', '-')} {getattr(cfg, name)}"
    step = figures.get((amp, compiled))
    step_img_s = step["images_per_s"] if step else None
    loader_img_s = rates.get(loader)
    known = [r for r in (step_img_s, loader_img_s) if r]
    predicted = min(known) if known else None
    return {
        "recommended": {"amp": amp, "compile": compiled, "loader": loader, "command": command},
        "upper_bound_img_s": max(f["images_per_s"] for f in figures.values()),
        "predicted_img_s": predicted,
        "predicted_epoch_s": manifest.splits["train"].samples / predicted if predicted else None,
        "loader_wait_pct": (
            max(0.0, 100.0 * (1 - loader_img_s / step_img_s))
            if step_img_s and loader_img_s
            else None
        ),
    }


def format_report(report: dict) -> str:
    """One table of every row, then each decision with its reason, the command and its
    prediction."""
    m = report["machine"]
    flags = ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f") if m.get(f)) or "none"
    lines = [
        f"machine: {m.get('gpu') or m['cpu']} ({m['cores']} cores; flags: {flags}); "
        f"{report['config']['arch']} at {report['config']['image_size']} px, batch "
        f"{report['config']['batch_size']}",
        "",
        f"{'row':<24} {'images/s':>10} {'compile s':>10}  note",
    ]
    for row in report["rows"]:
        rate = "-" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}"
        compile_s = f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else ""
        name = f"{row['kind']}: {row['name']}"
        lines.append(f"{name:<24} {rate:>10} {compile_s:>10}  {row.get('note', '')}")
    lines += ["", *decision_lines(report["decisions"])]
    lines += [
        "",
        f"recommended: {report['recommended']['command']}",
        "(what `fastalex train` with --amp/--compile/--loader auto decides from these figures)",
    ]
    if report["predicted_img_s"]:
        wait = report["loader_wait_pct"]
        lines.append(
            f"predicted: {report['predicted_img_s']:.0f} images/s, "
            f"{report['predicted_epoch_s']:.1f} s per epoch"
            + (
                f"; the model would wait on the loader {wait:.0f} % of it"
                if wait is not None
                else ""
            )
            + f" (upper bound without a loader: {report['upper_bound_img_s']:.0f} images/s)"
        )
    return "\n".join(lines)


def doctor_config(shards: str, **fields) -> TrainConfig:
    """The fast recipe on this pack, with the given fields replaced (what the command passes)."""
    return dataclasses.replace(TrainConfig(), shards=str(shards), **fields)
