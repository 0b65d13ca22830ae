"""`fastalex doctor`: every row timed on a tiny pack, the recommendation its figures imply, and
that recommendation equal to what `fastalex train` decides (CPU and CUDA rules)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastalex.auto import decide
from fastalex.cli import main
from fastalex.doctor import diagnose, doctor_config
from fastalex.machine import cpu_has_native_bf16
from fastalex.probes import ProbeCache, Probes
from fastalex.runtime import resolve_runtime
from fastalex.shards import read_manifest

STEP_ROWS = {"fp32 eager", "bf16 eager", "fp32 compiled", "bf16 compiled"}


def test_doctor_times_every_row_on_a_tiny_pack_and_writes_them_as_json(synth_pack, tmp_path):
    report_path = tmp_path / "doctor.json"
    result = CliRunner().invoke(
        main,
        [
            "doctor",
            str(synth_pack),
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--loader-workers",
            "1",
            "--quick",  # one window per row, no compile: seconds
            "--json",
            str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    rows = {(row["kind"], row["name"]): row for row in report["rows"]}
    steps = STEP_ROWS if cpu_has_native_bf16() else {"fp32 eager", "fp32 compiled", "bf16"}
    assert {("step", name) for name in steps} | {
        ("loader", name) for name in ("cpu", "dali", "resident")
    } == rows.keys()
    for name in ("fp32 eager", "bf16 eager") if cpu_has_native_bf16() else ("fp32 eager",):
        assert rows[("step", name)]["images_per_s"] > 0
    assert rows[("step", "fp32 compiled")]["note"].startswith("skipped")  # --quick
    assert rows[("loader", "cpu")]["images_per_s"] > 0
    assert rows[("loader", "resident")]["images_per_s"] > 0  # the tiny pack fits
    assert report["recommended"]["command"].startswith(f"fastalex train {synth_pack} --amp ")
    assert report["predicted_epoch_s"] > 0 and 0 <= report["loader_wait_pct"] <= 100
    assert {"cpu", "cores", "amx_bf16"} <= report["machine"].keys()
    assert "recommended: fastalex train" in result.output  # the table, printed
    assert "doctor: timing" in result.output  # progress


@pytest.mark.parametrize(
    "bf16, compiled, amp, compile_flag",
    [(150.0, 400.0, "bf16", "--compile"), (105.0, 101.0, "off", "--no-compile")],
)
def test_doctor_recommends_what_its_figures_favour(
    synth_pack, native_bf16, bf16, compiled, amp, compile_flag
):
    native_bf16(True)
    rates = {("off", False): 100.0, ("bf16", False): bf16, ("off", True): 101.0}
    rates[("bf16", True)] = compiled

    def steps(cfg, runtime, variants, num_classes, windows):
        return [
            {"images_per_s": rates[v], **({"compile_s": 5.0} if v[1] else {})} for v in variants
        ]

    def loaders(cfg, runtime, backends, windows):
        return [{"cpu": 50.0, "dali": 40.0, "resident": 200.0}[b] for b in backends]

    cfg = doctor_config(synth_pack, device="cpu", epochs=100, batch_size=8, image_size=32)
    report = diagnose(cfg, steps=steps, loaders=loaders)
    command = report["recommended"]["command"]
    assert f"--amp {amp} {compile_flag} --loader resident" in command
    step = rates[(amp, compile_flag == "--compile")]
    assert report["predicted_img_s"] == min(step, 200.0)
    assert report["loader_wait_pct"] == pytest.approx(max(0.0, 100 * (1 - 200.0 / step)))


def never(*args, **kwargs):
    raise AssertionError("train measured what doctor had measured")


def fake_steps(rates: dict, timed: list | None = None):
    """A measure_steps stand-in for doctor (windows=) and train alike: images/s per variant."""

    def steps(cfg, runtime, variants, num_classes, windows=3):
        if timed is not None:
            timed.extend(variants)
        return [
            {"images_per_s": rates[v], **({"compile_s": 20.0} if v[1] else {})} for v in variants
        ]

    return steps


@pytest.mark.parametrize(
    "rates, epochs",
    [
        ({("off", False): 100.0, ("bf16", False): 160.0, ("bf16", True): 400.0}, 400),
        ({("off", False): 100.0, ("bf16", False): 105.0, ("off", True): 180.0}, 400),
        ({("off", False): 100.0, ("bf16", False): 160.0, ("bf16", True): 400.0}, 2),
        ({("off", False): 100.0, ("bf16", False): 100.0, ("off", True): 900.0}, 20),
    ],
)
def test_doctor_and_train_decide_alike_on_a_cpu(
    synth_pack, native_bf16, rates, epochs, tmp_path, monkeypatch
):
    """`fastalex doctor`, then `fastalex train` on the same pack and machine: train decides from
    the figures doctor measured (its probe cache) the same amp, compile and loader. (The doctor
    once re-implemented the decisions, and skipped train's compile gate on a CPU.)"""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_bf16(True)
    rates = {**rates, ("off", True): rates.get(("off", True), 101.0)}
    rates.setdefault(("bf16", True), 170.0)
    speeds = {"cpu": 900.0, "dali": 800.0, "resident": 5000.0}
    loaders = lambda cfg, runtime, backends, windows=3: [speeds[b] for b in backends]  # noqa: E731
    cfg = doctor_config(synth_pack, device="cpu", epochs=epochs, batch_size=8, image_size=32)
    report = diagnose(cfg, steps=fake_steps(rates), loaders=loaders)
    probes = Probes(ProbeCache(None), steps=fake_steps(rates), loaders=loaders)
    trained, runtime, decisions = decide(
        cfg, resolve_runtime(cfg), read_manifest(synth_pack), probes=probes
    )
    chosen = {"amp": trained.amp, "compile": trained.compile, "loader": trained.loader}
    assert {k: report["recommended"][k] for k in chosen} == chosen
    assert {k: d["chose"] for k, d in report["decisions"].items()} == chosen


def test_doctor_skips_bf16_on_a_cpu_without_it_and_train_never_probes_it(synth_pack, native_bf16):
    native_bf16(False)
    timed = []
    rates = {("off", False): 100.0, ("off", True): 150.0}
    loaders = lambda cfg, runtime, backends, windows=3: [10.0 for b in backends]  # noqa: E731
    cfg = doctor_config(synth_pack, device="cpu", epochs=50, batch_size=8, image_size=32)
    report = diagnose(cfg, steps=fake_steps(rates, timed), loaders=loaders)
    assert all(amp == "off" for amp, _ in timed)
    row = next(r for r in report["rows"] if r["name"] == "bf16")
    assert row["images_per_s"] is None and "no native bf16" in row["note"]
    assert report["recommended"]["amp"] == "off" and report["decisions"]["amp"]["by"] == "rule"


def test_doctor_and_train_decide_alike_on_a_gpu_without_native_bf16(
    synth_pack, fake_gpu, monkeypatch, tmp_path
):
    """CUDA rules: fp16 + compile by rule, and dali (not the fastest measured loader) when the
    decoded splits do not fit the device."""
    import types

    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake_gpu((7, 5), "Tesla T4")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=16 << 30)
    )
    monkeypatch.setattr("fastalex.loaders.resident.free_bytes", lambda device: 0)
    monkeypatch.setattr("fastalex.auto.dali_usable", lambda device: True)
    monkeypatch.setattr("fastalex.doctor.dali_usable", lambda device: True)
    rates = {(amp, c): 100.0 for amp in ("off", "fp16") for c in (False, True)}
    speeds = {"cpu": 900.0, "dali": 300.0}  # the cpu loader measured faster
    loaders = lambda cfg, runtime, backends, windows=3: [speeds[b] for b in backends]  # noqa: E731
    cfg = doctor_config(synth_pack, device="cuda", epochs=5, batch_size=8, image_size=32)
    report = diagnose(cfg, steps=fake_steps(rates), loaders=loaders)
    assert [r["name"] for r in report["rows"] if r["kind"] == "step"] == [
        "fp32 eager",
        "fp16 eager",
        "fp32 compiled",
        "fp16 compiled",
    ]
    probes = Probes(ProbeCache(None), steps=fake_steps(rates), loaders=loaders)
    trained, _, _ = decide(cfg, resolve_runtime(cfg), read_manifest(synth_pack), probes=probes)
    assert (trained.amp, trained.compile, trained.loader) == ("fp16", True, "dali")
    assert {k: report["recommended"][k] for k in ("amp", "compile", "loader")} == {
        "amp": "fp16",
        "compile": True,
        "loader": "dali",
    }
