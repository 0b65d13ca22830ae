"""What several test files share, imported as `helpers` (never from another test file): the one
tiny CPU option set of a training run, the metrics keys that hold timings, a training command
through click, and a benchmarks/ script loaded as a module. Fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from click.testing import CliRunner

from fastalex.cli import main

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# A training run that neither probes nor compiles: fp32, eager, the cpu loader with one decode
# worker, on the CPU. A test that needs another setting gives it after these (click keeps the last).
TINY_CPU = (
    "--device",
    "cpu",
    "--amp",
    "off",
    "--no-compile",
    "--loader",
    "cpu",
    "--loader-workers",
    "1",
)
TINY_RUN = (*TINY_CPU, "--batch-size", "32")  # ... at a small batch: what train_cli runs
# metrics.jsonl keys that hold timings: everything else of a row is exact across runs.
TIMING_KEYS = frozenset(
    {"epoch_s", "train_s", "eval_s", "images_per_s", "loader_wait_s", "loader_wait_pct", "timed_s"}
)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def invoke(*args, **kwargs):
    """`fastalex ARGS...` in this process (click's runner); every argument as a string."""
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def train_cli(pack, out, *args):
    """`fastalex train PACK --out OUT` with TINY_RUN, then `args`; asserts exit 0."""
    result = invoke("train", pack, "--out", out, *TINY_RUN, *args)
    assert result.exit_code == 0, result.output
    return result


def load_script(name: str):
    """A benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
