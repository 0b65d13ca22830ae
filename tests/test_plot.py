"""`fastalex plot`: the curves of finished runs in one PNG."""

from __future__ import annotations

import pytest
from helpers import invoke


@pytest.mark.slow  # trains (the checkpoint fixture)
def test_plot_draws_the_runs_curves(checkpoint, tmp_path):
    run = checkpoint.parent.parent
    pytest.importorskip("matplotlib")
    result = invoke("plot", run, run, "--out", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
