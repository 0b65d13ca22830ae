"""What benchmarks/gpu_check.sh relies on, checked on the CPU: `--loader dali` without DALI is one
line for the user and a skip for the smoke step and the benchmark rows, and the pytest step's
verdict fails when nothing ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import load_script

from fastalex.cli import main
from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, build_loader


@pytest.fixture
def no_dali(monkeypatch):
    """nvidia.dali fails to import, as on a machine without it (and dali.py is imported afresh)."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "fastalex.loaders.dali", raising=False)


@pytest.mark.slow  # trains or starts processes
def test_loader_dali_without_dali_is_one_line(synth_pack, tmp_path, no_dali):
    cfg = TrainConfig(shards=str(synth_pack), loader="dali", batch_size=32)
    with pytest.raises(UserError, match="--loader dali: nvidia.dali does not import") as caught:
        build_loader(cfg, "train", Placement(torch.device("cpu")))
    assert isinstance(caught.value, ImportError)  # the benchmark harness skips such a row
    harness = load_script("harness")
    assert harness.failure({}, caught.value)["status"] == "skipped"
    result = CliRunner().invoke(
        main,
        ["train", str(synth_pack), "--out", str(tmp_path / "run"), "--loader", "dali"]
        + ["--device", "cpu", "--no-compile", "--batch-size", "32", "--epochs", "1"],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --loader dali: nvidia.dali"), lines


@pytest.mark.slow  # trains or starts processes
def test_smoke_skips_dali_without_dali(synth_pack, no_dali, monkeypatch, capsys):
    smoke = load_script("gpu_smoke")
    monkeypatch.setattr(smoke, "LOADERS", ("dali",))
    assert smoke.smoke(synth_pack, "cpu") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("smoke off  dali     SKIPPED: --loader dali: nvidia.dali"), line


def junit(tmp_path, *cases: str):
    """A pytest --junitxml report holding `cases`: "pass", "fail" or "skip:<message>"."""
    body = []
    for i, case in enumerate(cases):
        inner = {"pass": "", "fail": '<failure message="boom"/>'}.get(case)
        if inner is None:
            inner = f'<skipped type="pytest.skip" message="{case[5:]}"/>'
        body.append(f'<testcase classname="tests.t" name="test_{i}">{inner}</testcase>')
    path = tmp_path / "junit.xml"
    path.write_text(
        f'<testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'
    )
    return path


@pytest.mark.parametrize(
    "cases, rehearsal, ok",
    [
        ((), False, False),  # pytest exit 5: nothing collected
        (("skip:fastalex pack needs simplejpeg",) * 3, False, False),
        (("skip:fastalex pack needs simplejpeg", "skip:needs a CUDA device"), True, False),
        (("skip:needs a CUDA device",) * 3, False, False),  # a GPU run that touched no GPU
        (("skip:needs a CUDA device",) * 3, True, True),  # the CPU rehearsal
        (("pass", "skip:could not import 'nvidia.dali'"), False, True),
        (("pass", "fail"), False, False),
    ],
)
def test_pytest_verdict_fails_when_nothing_ran(tmp_path, cases, rehearsal, ok):
    smoke = load_script("gpu_smoke")
    passed, line = smoke.pytest_verdict(junit(tmp_path, *cases), rehearsal)
    assert passed is ok, line


# A Python where the optional extras (and what the lent GPU machine lacks) do not import, as a
# module that is not installed: pytest then collects the gpu tests of every module all the same.
HIDE_EXTRAS = """
import importlib.abc, sys
HIDDEN = {"pyarrow", "tensorboard", "onnx", "onnxscript", "onnxruntime", "matplotlib"}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
import pytest
sys.exit(pytest.main(["-m", "gpu and not slow", "--co", "-q", "-p", "no:cacheprovider"]))
"""


@pytest.mark.slow  # starts a process
def test_the_gpu_tests_collect_without_the_optional_extras(launch):
    root = Path(__file__).resolve().parent.parent
    job = launch([sys.executable, "-c", HIDE_EXTRAS], cwd=root)
    stdout, stderr = job.communicate(120)
    assert job.returncode == 0, stdout + stderr
    assert "error" not in stdout.lower() and "gpu" in stdout
