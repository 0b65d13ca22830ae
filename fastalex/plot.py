"""Training curves of one or more runs, overlaid in one PNG: what `fastalex plot` draws.

Reads each ``RUN/metrics.jsonl`` (one JSON object per epoch, as train.py writes it: ``epoch``,
``lr``, ``train_loss``, ``train_top1``, ``val_loss``, ``val_top1``, ``val_top5``, ``epoch_s``,
``images_per_s``; accuracies in percent; a key missing or null in a line is left out of its curve)
and draws three panels against the epoch: loss (train dashed, val solid), top-1 (train dashed, val
solid) and val top-5 (dotted), and training images/s. Each run keeps one colour and is labelled by
its directory name. The images/s axis starts at zero: zoomed to the data, a 3 % wobble (369-382)
looked like a collapse.

matplotlib is a dependency of fastalex (a user who just trained expects to see the curves), imported
lazily with the Agg backend (no display needed), so `import fastalex` and every other command do not
pay for it. Imports nothing else from fastalex but errors.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastalex.errors import UserError

METRICS = "metrics.jsonl"
INSTALL_HINT = "pip install matplotlib  (a dependency of fastalex: pip install -e . brings it)"


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run, in file order; UserError if there are none."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS} (not a run directory of `fastalex train`)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise UserError(f"{path}: no epochs recorded yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that have `key` (a number); the epoch is the record's own
    `epoch` field, or its 1-based position when that is missing."""
    epochs, values = [], []
    for position, record in enumerate(records, 1):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            epochs.append(record.get("epoch", position))
            values.append(value)
    return epochs, values


def plot_runs(run_dirs: list[Path], out_png: Path) -> Path:
    """Draw the runs' loss, top-1/top-5 and images/s per epoch into `out_png`; returns its path."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    runs = [(Path(d).name or str(d), read_metrics(Path(d))) for d in run_dirs]
    plt = pyplot()
    figure = draw_runs(runs)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)
    return out_png


def pyplot():
    """matplotlib.pyplot on the Agg backend; UserError naming the install if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    return plt


def draw_runs(runs: list[tuple[str, list[dict]]]):
    """The three panels of (name, records) runs, as a matplotlib Figure."""
    plt = pyplot()
    figure, (loss_ax, top_ax, speed_ax) = plt.subplots(
        1, 3, figsize=(16, 4.8), constrained_layout=True
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, records) in enumerate(runs):
        colour = colours[index % len(colours)]
        for axis, key, style, label in (
            (loss_ax, "train_loss", "--", "train"),
            (loss_ax, "val_loss", "-", "val"),
            (top_ax, "train_top1", "--", "train top-1"),
            (top_ax, "val_top1", "-", "val top-1"),
            (top_ax, "val_top5", ":", "val top-5"),
            (speed_ax, "images_per_s", "-", "train"),
        ):
            epochs, values = series(records, key)
            if values:
                axis.plot(
                    epochs,
                    values,
                    style,
                    color=colour,
                    label=f"{name} {label}",
                    marker="." if len(values) < 40 else None,
                )
    for axis, title, ylabel in (
        (loss_ax, "loss", "cross-entropy"),
        (top_ax, "accuracy", "top-k accuracy (%)"),
        (speed_ax, "throughput", "images/s"),
    ):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize="small")
    speed_ax.set_ylim(bottom=0)  # a rate's scale starts at zero
    return figure
