"""`fastalex doctor SHARDS`: what this machine should run, and whether a run of it is data-bound.

Times, in short interleaved windows, the train step in each AMP mode, eager and compiled, on a
synthetic uint8 batch already on the device (no loader: the upper bound), and each loader's
images/s on the pack alone; then recommends the `fastalex train` options by the rules
`--amp/--compile/--loader auto` apply (runtime.py), with the predicted epoch time and the share of
it the model would wait on the loader (loader and step assumed to overlap). Returns one
JSON-ready dict; cli.py prints it. Imports the config, runtime's probes and the shard manifest.
Reasons: docs/defaults.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from fastalex.config import TrainConfig
from fastalex.runtime import (
    PROBE_WINDOWS,
    choose_cpu_amp,
    compile_saving_s,
    cuda_has_native_bf16,
    describe_machine,
    measure_loaders,
    measure_steps,
    planned_steps,
    resident_budget_bytes,
    resident_need_bytes,
    resolve_runtime,
)
from fastalex.shards import read_manifest


def amp_modes(device) -> list[str]:
    """The AMP modes worth timing here: fp32 and the one low precision the device runs natively."""
    if device.type == "cuda":
        return ["off", "bf16" if cuda_has_native_bf16(device) else "fp16"]
    return ["off", "bf16"]


def diagnose(
    cfg: TrainConfig,
    compiled_rows: bool = True,
    windows: int = PROBE_WINDOWS,
    log: Callable[[str], None] = lambda line: None,
    steps: Callable = measure_steps,
    loaders: Callable = measure_loaders,
) -> dict:
    """Every row timed on this machine, the recommendation and its prediction (module docstring)."""
    from fastalex.loaders import dali_usable

    manifest = read_manifest(Path(cfg.shards))
    runtime = resolve_runtime(cfg)
    modes = amp_modes(runtime.device)
    variants = [(amp, False) for amp in modes] + [(amp, True) for amp in modes]
    timed = [v for v in variants if compiled_rows or not v[1]]
    log(f"doctor: timing {len(timed)} train steps ({', '.join(label(*v) for v in timed)}) ...")
    figures = dict(zip(timed, steps(cfg, runtime, timed, manifest.num_classes, windows=windows)))
    rows = []
    for variant in variants:
        row = {"kind": "step", "name": label(*variant), "amp": variant[0], "compiled": variant[1]}
        if variant in figures:
            row.update(figures[variant], note="synthetic uint8 batch on the device: no loader")
        else:
            row.update(images_per_s=None, note="skipped: compiled rows off (--quick)")
        rows.append(row)
    need = resident_need_bytes(cfg, manifest, runtime.device, 1, 1)
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
    return {
        "machine": describe_machine(runtime.device),
        "device": str(runtime.device),
        "config": {k: getattr(cfg, k) for k in ("arch", "image_size", "batch_size", "epochs")},
        "rows": rows,
        **recommend(cfg, runtime, manifest, figures, rates, need <= budget),
    }


def label(amp: str, compiled: bool) -> str:
    return f"{'fp32' if amp == 'off' else amp} {'compiled' if compiled else 'eager'}"


def recommend(cfg, runtime, manifest, figures: dict, rates: dict, resident_fits: bool) -> dict:
    """The options `auto` would pick from these figures, the command, and what it predicts."""
    rate = {v: f["images_per_s"] for v, f in figures.items()}
    if runtime.device.type == "cuda":
        amp, compiled = runtime.amp, True
    else:
        amp = choose_cpu_amp(rate[("off", False)], rate[("bf16", False)])
        compiled = False
        if (amp, True) in figures:
            planned = planned_steps(cfg, manifest.splits["train"].samples, 1)
            compiled = (
                compile_saving_s(
                    rate[(amp, False)],
                    rate[(amp, True)],
                    figures[(amp, True)]["compile_s"],
                    planned * cfg.batch_size,
                )
                > 0
            )
    loader = "resident" if resident_fits else max(rates, key=rates.get)
    step_img_s, loader_img_s = rate[(amp, compiled)], rates[loader]
    predicted = min(step_img_s, loader_img_s)
    command = (
        f"fastalex train {cfg.shards} --amp {amp} --{'' if compiled else 'no-'}compile "
        f"--loader {loader}"
    )
    defaults = TrainConfig()
    for name in ("arch", "image_size", "batch_size", "epochs", "device"):
        if getattr(cfg, name) != getattr(defaults, name):
            command += f" --{name.replace('_', '-')} {getattr(cfg, name)}"
    return {
        "recommended": {"amp": amp, "compile": compiled, "loader": loader, "command": command},
        "upper_bound_img_s": max(rate.values()),
        "predicted_img_s": predicted,
        "predicted_epoch_s": manifest.splits["train"].samples / predicted,
        "loader_wait_pct": max(0.0, 100.0 * (1 - loader_img_s / step_img_s)),
    }


def format_report(report: dict) -> str:
    """One table of every row, then the recommendation and its prediction."""
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
    lines += [
        "",
        f"recommended: {report['recommended']['command']}",
        f"predicted: {report['predicted_img_s']:.0f} images/s, "
        f"{report['predicted_epoch_s']:.1f} s per epoch; the model would wait on the loader "
        f"{report['loader_wait_pct']:.0f} % of it (upper bound without a loader: "
        f"{report['upper_bound_img_s']:.0f} images/s)",
    ]
    return "\n".join(lines)


def doctor_config(shards: str, **fields) -> TrainConfig:
    """The fast recipe on this pack, with the given fields replaced (what the command passes)."""
    return dataclasses.replace(TrainConfig(), shards=str(shards), **fields)
