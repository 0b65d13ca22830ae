"""What a row's repeated windows say: median, min, max, spread, and whether two rows differ.

Shared by the harness (which turns window rates into a row), report.py (the stdout table) and
render_results.py (RESULTS.md), so every place reads a row the same way. Imports only the standard
library: render_results.py runs wherever the results are.

- ``spread_pct`` = (max - min) / median x 100: how far apart the row's fastest and slowest window
  were, relative to the figure quoted.
- A ratio between two rows is *significant* only when their [min, max] ranges do not overlap
  (touching counts as overlapping): with the rows' windows interleaved, two ranges that overlap
  mean some window of the slower row beat some window of the faster one, so the ratio of medians
  is not to be read as a difference.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread_pct(low: float, high: float, median: float) -> float:
    """(high - low) / median, in percent."""
    return 100.0 * (high - low) / median


def summarize(rates: Sequence[float]) -> dict:
    """A row's figures from its windows' images/s: median, min, max, spread and the rates."""
    if not rates:
        raise ValueError("no window was timed")
    median = statistics.median(rates)
    low, high = min(rates), max(rates)
    return {
        "images_per_s": median,
        "min": low,
        "max": high,
        "spread_pct": spread_pct(low, high, median),
        "repeats": len(rates),
        "rates": list(rates),
    }


def row_spread(row: dict) -> float | None:
    """The row's spread_pct, computed from min/max/median for rows recorded before it existed."""
    if row.get("spread_pct") is not None:
        return row["spread_pct"]
    if row.get("images_per_s") and row.get("min") is not None and row.get("max") is not None:
        return spread_pct(row["min"], row["max"], row["images_per_s"])
    return None


def ranges_overlap(a: dict, b: dict) -> bool:
    """Whether rows a and b have [min, max] ranges that meet (touching included)."""
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def significant(row: dict, base: dict) -> bool | None:
    """Whether row's ratio to base is a difference: their ranges are apart. None when either
    row has no range (not measured)."""
    if any(r.get(key) is None for r in (row, base) for key in ("min", "max")):
        return None
    return not ranges_overlap(row, base)
