"""What a throughput run prints and records: the machine it ran on, the table, the ratios.

Owns `machine_info` (what a number depends on), `format_table` and `format_ratios` (stdout) and
`record` (one JSON line per row appended to benchmarks/results/throughput.jsonl). A ratio is
against the reference row of its group at the same size, and is marked "n.s." (not significant)
when the two rows' min-max ranges overlap (spread.py). Imports torch, the standard library and
spread.py; of fastalex only machine.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from spread import row_spread, significant

from fastalex.machine import machine_record

REFERENCE_ROW = {"loader": "reference", "model": "eager-fp32", "e2e": "reference"}


def machine_info(device: torch.device) -> dict:
    """What a number depends on: fastalex's machine record (CPU and its speed flags, GPU, driver,
    library versions, commit) and the date."""
    return {
        **machine_record(device),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def base_row(row: dict, rows: list[dict]) -> dict | None:
    """The reference row of row's group at row's size, if that was run."""
    name = REFERENCE_ROW.get(row["group"])
    return next(
        (
            r
            for r in rows
            if r["group"] == row["group"]
            and r["name"] == name
            and r["image_size"] == row["image_size"]
        ),
        None,
    )


def ratio(row: dict, rows: list[dict]) -> tuple[float, bool | None] | None:
    """(images/s over the reference row's, whether the difference is significant), or None."""
    base = base_row(row, rows)
    if base and base["images_per_s"] and row["images_per_s"]:
        return row["images_per_s"] / base["images_per_s"], significant(row, base)
    return None


def format_ratio(found: tuple[float, bool | None] | None) -> str:
    if not found:
        return ""
    x, differs = found
    return f"{x:.2f}" + ("" if differs else " n.s.")


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'group':<7} {'name':<14} {'px':>4} {'images/s':>10} {'min':>10} {'max':>10} "
        f"{'spread':>7} {'x ref':>9} {'wait':>5} {'setup':>7} {'warm-up':>8} {'compile':>8}"
        "  note"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = [
            f"{row[key]:.1f}" if row.get(key) is not None else "-"
            for key in ("images_per_s", "min", "max")
        ]
        if row["images_per_s"] is None:
            cells[0] = row["status"]
        spread = row_spread(row)
        spread = f"{spread:.1f}%" if spread is not None else ""
        wait = f"{row['wait_pct']:.0f}%" if row.get("wait_pct") is not None else ""
        x = format_ratio(ratio(row, rows)) if row["name"] != REFERENCE_ROW.get(row["group"]) else ""
        setup, warmup, compile_ = (
            f"{row[key]:.1f} s" if row.get(key) is not None else ""
            for key in ("setup_s", "warmup_s", "compile_s")
        )
        lines.append(
            f"{row['group']:<7} {row['name']:<14} {row['image_size'] or '':>4} {cells[0]:>10} "
            f"{cells[1]:>10} {cells[2]:>10} {spread:>7} {x:>9} {wait:>5} {setup:>7} "
            f"{warmup:>8} {compile_:>8}  {row.get('note', '')}"
        )
    return "\n".join(lines)


def format_ratios(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        found = ratio(row, rows)
        if found and row["name"] != REFERENCE_ROW.get(row["group"]):
            x, differs = found
            verdict = (
                "ranges apart"
                if differs
                else "NOT SIGNIFICANT: the two rows' min-max ranges overlap"
            )
            lines.append(
                f"  {row['group']} {row['image_size']} px: {row['name']} is {x:.2f}x "
                f"{REFERENCE_ROW[row['group']]} ({verdict})"
            )
    head = "images/s against the reference row of each group and size"
    return head + (":\n" + "\n".join(lines) if lines else ": none (no pair of rows both measured)")


def format_machine(machine: dict) -> str:
    sha = (machine["git_sha"] or "uncommitted")[:7] + (" (dirty)" if machine["git_dirty"] else "")
    return (
        f"machine: {machine['gpu'] or 'no GPU'}; {machine['cpu']} x{machine['cores']}; torch "
        f"{machine['torch']}, CUDA {machine['cuda']}, DALI {machine['dali']}"
        + (f", FFCV {machine['ffcv']}" if machine.get("ffcv") else "")
        + f"; git {sha}"
    )


def record(path: Path, rows: list[dict], run_id: str, machine: dict, settings: dict) -> None:
    """Append each row, with the run's machine and settings, as one JSON line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(
                json.dumps(
                    {
                        "run_id": run_id,
                        "unit": "images/s",
                        "machine": machine,
                        "settings": settings,
                        **row,
                    }
                )
                + "\n"
            )
