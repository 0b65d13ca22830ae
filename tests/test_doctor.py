"""`fastalex doctor`: every row timed on a tiny pack, and the recommendation its figures imply."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastalex.cli import main
from fastalex.doctor import diagnose, doctor_config

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
    assert {("step", name) for name in STEP_ROWS} | {
        ("loader", name) for name in ("cpu", "dali", "resident")
    } == rows.keys()
    for name in ("fp32 eager", "bf16 eager"):
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
def test_doctor_recommends_what_its_figures_favour(synth_pack, bf16, compiled, amp, compile_flag):
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
