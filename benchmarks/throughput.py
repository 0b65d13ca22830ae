#!/usr/bin/env python
"""Images/s of each stage of fastalex, side by side with the reference blog's pipeline and FFCV.

    python benchmarks/throughput.py          # synthetic stand-in, every group, 64 and 227 px
    python benchmarks/throughput.py --data shards/ --tree tiny-imagenet-200/ --json out.json
    python benchmarks/throughput.py --only loader --image-size 64 --repeats 15

Groups, one row per variant and image size (each group in its own module):

- ``loader`` (bench_loader.py; images/s out of the loader, no model): ``reference``, the blog's
  pipeline rebuilt (reference.py); one row per entry of ``fastalex.loaders.BACKENDS``; ``ffcv``,
  FFCV's own writer and loader doing the same work (ffcv_loader.py), and ``spdl``, SPDL's thread
  pipeline and FFmpeg decoding doing it (spdl_loader.py), each skipped, saying so, where it is not
  installed.
- ``model`` (bench_model.py; train steps on a synthetic uint8 batch on the device): ``eager-fp32``,
  ``channels-last``, ``amp``, ``compiled``, each adding one thing to the one before.
- ``e2e`` (bench_e2e.py; loader + real training steps): the ``reference`` stack against the
  ``fastalex`` default stack, with the implied epoch time for 100,000 images and ``wait_pct``, the
  share of the timed windows the step waited on its loader.
- ``pack`` (bench_pack.py; images/s of ``fastalex.pack.pack`` over a source tree).

Method (harness.py): each row of one group at one size is set up and warmed up (``--warmup``
untimed calls) in turn; then all of them are timed in ``--repeats`` interleaved rounds: every round
times one window of every row, the order rotating one place each round, so a busy spell of the
machine falls on all rows alike. A window is at least ``--window-s`` seconds and at least
``--batches`` batches (loader) or ``--steps`` steps (model, e2e), the device synchronised at both
ends; loader and e2e rows first make untimed lead-in calls (at least half a window) that use up
what their loader prefetched while the others ran. Each row reports the median images/s of its
windows, min, max and the spread ((max - min) / median); a ratio between two rows whose min-max
ranges overlap is marked not significant (spread.py). A row that cannot run here (no CUDA, no
DALI, no FFCV, a backend not written yet) is kept, with images_per_s null and the reason in its
note; it is never dropped and never estimated.

Data: ``--data`` is a pack; the reference and pack rows read a source tree, ``--tree`` (a directory,
or the official zip, extracted to a temporary directory for the reference), or else the pack
unpacked to a temporary tree. Without ``--data`` a synthetic stand-in (200 classes, 64 train images
each) is generated and packed in a temporary directory, and the output says so (bench_data.py).

Output (report.py): a table (median, min, max, spread, ratio to the group's reference, wait) and
the ratios on stdout; with ``--json PATH`` one object ``{"machine", "settings", "rows",
"complete"}`` (rewritten after every group, so a run killed part-way leaves what it measured); and,
unless ``--no-record``, every row with the machine info appended to
``benchmarks/results/throughput.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the group modules, harness.py and reference.py sit beside this

import bench_e2e  # noqa: E402
import bench_loader  # noqa: E402
import bench_model  # noqa: E402
import bench_pack  # noqa: E402
import report  # noqa: E402
from bench_data import Data, prepare_data  # noqa: E402
from harness import Timing, run_group  # noqa: E402

from fastalex.config import RECIPES  # noqa: E402
from fastalex.errors import UserError  # noqa: E402

GROUPS = ("loader", "model", "e2e", "pack")
RESULTS = HERE / "results" / "throughput.jsonl"
# --quick: a smoke test of every row (tests/test_benchmarks.py), not a measurement. On the 2-core
# dev box a step of the 59M-parameter model takes ~1-2 s even at batch 4 (the SGD update
# dominates), and compiling the step 35-60 s (60 s from a cold inductor cache), so windows are one
# step and the compiled variants are left out (the model row skipped, the e2e row run with compile
# off).
QUICK = dict(batch_size=4, steps=1, batches=0, repeats=3, warmup=1, window_s=0.0)  # 0: one epoch
# Warm-up 3 on CUDA as train.WARMUP_STEPS: compile, first momentum buffers, cudnn.benchmark. A
# window of >= 1 s is what issue 11 asks at 64 px; 7 rounds give a median that one slow window
# cannot move far. On the CPU a 227 px step takes seconds (~10 s at batch 256 on 2 cores), so one
# step already fills a window and 5 rounds keep a full run near half an hour.
CUDA_DEFAULTS = dict(batch_size=256, batches=8, steps=5, repeats=7, warmup=3, window_s=1.0)
CPU_DEFAULTS = dict(batch_size=256, batches=8, steps=1, repeats=5, warmup=2, window_s=1.0)
LEAD_IN_WINDOWS = 0.5  # loader and e2e rows: untimed lead-in before each window, in windows
SETTLE_S = 10.0  # loader and e2e rows: most seconds to wait for an idle machine before a window


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", help="a pack (fastalex pack OUT); default: synthesize and pack a stand-in"
    )
    p.add_argument(
        "--tree",
        help="the source tree of --data, for the reference and pack rows "
        "(default: unpack --data into a temporary tree)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--image-size",
        type=int,
        action="append",
        dest="image_sizes",
        help="px, repeatable (default: 64 and 227; --quick: 64)",
    )
    p.add_argument(
        "--only", choices=GROUPS, action="append", help="run only this group (repeatable)"
    )
    p.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="ROW",
        help="leave out the rows of this name (repeatable), e.g. a peer not installed here or "
        "a row you do not need this run",
    )
    p.add_argument("--quick", action="store_true", help="tiny data and runs: for the tests")
    p.add_argument("--json", type=Path, help="also write the results as one JSON object here")
    p.add_argument(
        "--batch-size",
        type=int,
        help="loader rows (default 256); also the model and e2e rows when given (default: "
        "the fast recipe's 256 for model rows, each recipe's own for e2e rows)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="interleaved rounds, i.e. timed windows per row, >= 3 (default 7 on CUDA, "
        "5 on CPU, 3 in --quick); more rounds, a steadier median",
    )
    p.add_argument(
        "--window-s", type=float, help="least seconds per timed window (default 1.0; --quick: 0)"
    )
    p.add_argument(
        "--batches",
        type=int,
        help="least batches per timed loader window (default 8; 0 = one epoch)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="least steps per timed model/e2e window (default 5 on CUDA, 1 on CPU)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed batches/steps per row before the first round (default 3 on CUDA, 2 on CPU)",
    )
    p.add_argument(
        "--record-to",
        type=Path,
        default=RESULTS,
        help="JSON-lines file the rows are appended to "
        f"(default {RESULTS.relative_to(HERE.parent)})",
    )
    p.add_argument("--no-record", action="store_true", help="do not append the rows anywhere")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    defaults = QUICK if args.quick else CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    args.model_batch_size = args.batch_size or (
        QUICK["batch_size"] if args.quick else RECIPES["fast"].batch_size
    )
    args.e2e_batch_size = args.batch_size or (QUICK["batch_size"] if args.quick else None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 3:
        p.error("--repeats must be >= 3 (a median needs several repeats)")
    if (
        min(args.batch_size, args.steps, args.warmup + 1) < 1
        or args.batches < 0
        or args.window_s < 0
    ):
        p.error("--batch-size and --steps must be >= 1; --warmup, --batches and --window-s >= 0")
    args.image_sizes = args.image_sizes or ([64] if args.quick else [64, 227])
    args.only = args.only or list(GROUPS)
    return args


def timing_for(args, group: str) -> Timing:
    """How the rows of `group` are timed under the command-line settings."""
    calls = {"loader": args.batches or 1, "pack": 1}.get(group, args.steps)  # loader 0: per row
    lead_in = group in ("loader", "e2e")  # rows with a loader, whose prefetch fills while idle
    return Timing(
        repeats=args.repeats,
        warmup=args.warmup,
        window_calls=calls,
        window_s=args.window_s,
        lead_in=int(lead_in),
        lead_in_s=LEAD_IN_WINDOWS * args.window_s if lead_in else 0.0,
        settle_s=SETTLE_S if lead_in and not args.quick else 0.0,  # --quick: a smoke test
    )


def group_rows(args, data: Data, group: str, size: int, device) -> dict:
    """The builders of `group`'s rows at `size` (each group module's `rows`), less --without."""
    if group == "loader":
        builders = bench_loader.rows(args, data, size, device)
    elif group == "model":
        builders = bench_model.rows(args, size, device)
    else:
        builders = bench_e2e.rows(args, data, size, device)
    return {name: build for name, build in builders.items() if name not in args.without}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    machine = report.machine_info(device)
    run_id = machine["date_utc"].replace("-", "").replace(":", "") + f"-{os.getpid()}"
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "no_record", "record_to")}
    rows: list[dict] = []
    output = {
        "run_id": run_id,
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "complete": False,
    }

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".part")
            tmp.write_text(json.dumps(output, indent=1) + "\n")
            os.replace(tmp, args.json)

    with tempfile.TemporaryDirectory(prefix="fastalex-bench-") as tmp:
        workdir = Path(tmp)
        data = Data()
        if {"loader", "e2e", "pack"} & set(args.only):
            try:
                data = prepare_data(args, workdir)
            except (UserError, ImportError, OSError) as e:
                data = Data(problem=f"no data: {e}")
        settings["source"] = data.description
        for size in args.image_sizes:
            for group in ("loader", "model", "e2e"):
                if group in args.only:
                    rows += run_group(
                        group,
                        size,
                        device,
                        group_rows(args, data, group, size, device),
                        timing_for(args, group),
                    )
                    save()
        if "pack" in args.only:
            rows += run_group(
                "pack", None, device, bench_pack.rows(args, data, workdir), timing_for(args, "pack")
            )
    output["complete"] = True
    save()
    print(f"data: {settings['source']}")
    print(report.format_machine(machine))
    print(report.format_table(rows))
    print(report.format_ratios(rows))
    if not args.no_record:
        report.record(args.record_to, rows, run_id, machine, settings)
        print(f"appended {len(rows)} rows to {args.record_to}")
    return 1 if any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
