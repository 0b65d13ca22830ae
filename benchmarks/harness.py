"""Timing the rows of one group side by side: the round-robin schedule, timed windows, `run_group`.

A group module (bench_loader.py, bench_model.py, bench_e2e.py, bench_pack.py) hands `run_group`
one builder per row; a builder sets its row up and returns a `Subject`, whose ``advance`` runs one
batch or step. `run_group` then

1. builds each row, timing it (``setup_s``); a `Skip` or an ImportError makes a skipped row that
   says why, any other exception a failed row; the other rows go on;
2. warms it up at once with ``warmup`` untimed calls (``warmup_s``; for a row that compiles, the
   first call is ``compile_s``), so each row's loader has forked its persistent workers before
   the next row is built (a fork after the ffcv row has started numba's threads prints a warning);
3. runs ``repeats`` rounds. Round r times one window of every live row, in the order `schedule`
   gives (the rows rotated by r), so that a slow spell of the machine falls on every row alike and
   no row always runs first or last. Before each window the machine is let settle (``settle_s``:
   until its CPUs are idle, at most that long): a row's loader refills its prefetch in the
   background after its own window, and a slow one (SPDL's thread pipeline) would otherwise still
   be decoding inside the next row's window. Then the row makes untimed lead-in calls (at least
   ``lead_in`` of them and ``lead_in_s`` seconds): they use up what its loader prefetched while the
   other rows ran, which would otherwise come out of the window for free. A window is at least
   ``window_calls`` calls and at least ``window_s`` seconds long, the device synchronised at both
   ends; its rate is the images the calls handled over its seconds;
4. closes every row and summarises its rates (spread.summarize: median, min, max, spread).
   A row whose subject reports ``waited_s`` (e2e: its step waiting on the loader) also gets
   ``wait_pct``: the share of its timed windows spent waiting.

Every row of a group is set up before any is timed and stays alive until the last window, so a
group holds all its rows' loaders and models at once. A row that fails part-way is closed,
reported failed, and leaves the rotation; the others go on.

Imports torch and the standard library (and spread.py beside it); knows nothing of fastalex.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from spread import summarize


class Skip(Exception):
    """This row cannot run here; the message says why."""


@dataclasses.dataclass
class Subject:
    """A row set up and ready to be timed."""

    advance: Callable[[], int]  # one batch or step; returns the images it handled
    info: dict = dataclasses.field(default_factory=dict)  # row fields known at set-up: note, config
    close: Callable[[], None] = lambda: None
    window_calls: int | None = None  # this row's least calls per window; None = the group's
    waited_s: Callable[[], float] | None = None  # running total of advance's time blocked on input
    reset: Callable[[], None] | None = None  # untimed, before each lead-in (pack: delete outputs)
    pause: Callable[[], None] | None = None  # untimed, after each window: stop background threads
    compiles: bool = False  # the first warm-up call compiles: report it as compile_s
    finish: Callable[[dict], None] | None = None  # adds fields derived from the summarised row


@dataclasses.dataclass(frozen=True)
class Timing:
    """How a group's rows are timed (see the module docstring)."""

    repeats: int  # rounds: timed windows per row
    warmup: int  # untimed calls per row before the first round
    window_calls: int  # least calls per timed window (>= 1)
    window_s: float  # least seconds per timed window
    lead_in: int = 0  # least untimed calls before each window
    lead_in_s: float = 0.0  # least seconds of those
    settle_s: float = 0.0  # most seconds to wait for an idle machine before each window

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.window_calls < 1 or min(self.warmup, self.lead_in) < 0:
            raise ValueError(
                f"repeats and window_calls must be >= 1, warmup and lead_in >= 0; got {self}"
            )


def schedule(names: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of each round: every row once, the list rotated one place further each round
    (round r starts at row r mod n), so each row takes each position equally often over any n
    consecutive rounds."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(repeats)] if n else []


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA sync point: read the clock once the device is done


IDLE_BELOW = 0.1  # the machine counts as idle under this busy share of its CPU time
SETTLE_SAMPLE_S = 0.1  # each busy-share sample covers this long


def cpu_busy_share(interval_s: float = SETTLE_SAMPLE_S) -> float | None:
    """The busy share of all the machine's CPU time over the next `interval_s` (Linux
    /proc/stat: everything but idle and iowait), or None where it cannot be read."""

    def totals() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(value) for value in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total, idle = totals()
        time.sleep(interval_s)
        total_after, idle_after = totals()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle_after - idle) / max(1, total_after - total)


def settle(
    max_s: float,
    busy: Callable[[], float | None] = cpu_busy_share,
    clock: Callable[[], float] = time.perf_counter,
) -> bool:
    """Wait until the machine is idle (a `busy` sample under IDLE_BELOW), at most `max_s`
    seconds; True once idle or when `busy` cannot tell, False when time ran out."""
    start = clock()
    while clock() - start < max_s:
        share = busy()
        if share is None or share < IDLE_BELOW:
            return True
    return max_s <= 0


def run_calls(
    advance: Callable[[], int],
    min_calls: int,
    min_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, int]:
    """Call `advance` until it has run at least `min_calls` times and `min_s` seconds have
    passed; returns (images, calls)."""
    start = clock()
    images = calls = 0
    while calls < min_calls or clock() - start < min_s:
        images += advance()
        calls += 1
    return images, calls


def time_window(
    advance: Callable[[], int],
    device: torch.device,
    min_calls: int,
    min_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, int, float]:
    """One timed window: (images, calls, seconds), the device synchronised at both ends."""
    synchronize(device)
    start = clock()
    images, calls = run_calls(advance, min_calls, min_s, clock)
    synchronize(device)
    return images, calls, clock() - start


def endless(loader) -> Iterator:
    """The loader's batches, epoch after epoch (each `iter` is the next epoch): loaders run as a
    continuous stream, epoch restarts counting where they fall."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"{getattr(loader, 'backend', loader)}: an epoch yielded no batch")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("ch") else "s")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Live:
    """A built row while its group runs."""

    row: dict
    subject: Subject
    windows: list = dataclasses.field(default_factory=list)  # (images, calls, seconds, waited_s)


def unmeasured(row: dict, status: str, note: str) -> dict:
    row.update(
        images_per_s=None, min=None, max=None, spread_pct=None, repeats=0, status=status, note=note
    )
    return row


def failure(row: dict, error: BaseException) -> dict:
    """A Skip or ImportError: skipped, with the reason; anything else (a UserError or a bug):
    failed, reported, and the run's exit status becomes 1."""
    if isinstance(error, Skip):
        return unmeasured(row, "skipped", f"skipped: {error}")
    if isinstance(error, ImportError):
        return unmeasured(row, "skipped", f"skipped: not importable here ({error})")
    return unmeasured(row, "failed", f"failed: {type(error).__name__}: {error}")


def close_quietly(live: _Live) -> None:
    try:
        live.subject.close()
    except Exception as e:  # noqa: BLE001 - a row already measured keeps its figures; say so
        live.row["note"] = live.row.get("note", "") + f" (close failed: {type(e).__name__}: {e})"


def run_group(
    group: str,
    image_size: int | None,
    device: torch.device,
    builders: dict[str, Callable[[], Subject]],
    timing: Timing,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Build, warm up and time the rows of one group side by side (module docstring); returns
    one row dict per builder, in the builders' order."""
    rows = {
        name: {"group": group, "name": name, "image_size": image_size, "device": str(device)}
        for name in builders
    }
    live: dict[str, _Live] = {}
    try:
        for name, build in builders.items():
            log(f"[{group}] {name} @ {image_size or '-'} px: set-up")
            start = clock()
            try:
                subject = build()
            except Exception as e:  # noqa: BLE001 - see failure()
                failure(rows[name], e)
                continue
            rows[name]["setup_s"] = clock() - start
            live[name] = _Live(rows[name], subject)
            try:
                warm_up(live[name], device, timing, clock)
            except Exception as e:  # noqa: BLE001 - see failure()
                failure(rows[name], e)
                close_quietly(live.pop(name))
        for round_index, order in enumerate(schedule(list(live), timing.repeats)):
            log(
                f"[{group}] @ {image_size or '-'} px: round {round_index + 1}/{timing.repeats}: "
                + ", ".join(order)
            )
            for name in order:
                if name not in live:  # failed earlier in this round
                    continue
                try:
                    live[name].windows.append(timed(live[name].subject, device, timing, clock))
                except Exception as e:  # noqa: BLE001 - see failure()
                    failure(live[name].row, e)
                    close_quietly(live.pop(name))
    finally:
        for entry in live.values():
            close_quietly(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for entry in live.values():
        report(entry)
    return list(rows.values())


def warm_up(entry: _Live, device: torch.device, timing: Timing, clock) -> None:
    advance = entry.subject.advance
    start = clock()
    for i in range(timing.warmup):
        advance()
        if i == 0 and entry.subject.compiles:
            synchronize(device)
            entry.row["compile_s"] = clock() - start
    synchronize(device)
    entry.row["warmup_s"] = clock() - start


def timed(subject: Subject, device: torch.device, timing: Timing, clock) -> tuple:
    """Settling, lead-in, then one timed window of `subject`: (images, calls, seconds, waited
    seconds)."""
    if not settle(timing.settle_s, clock=clock):
        log(f"the machine was still busy after {timing.settle_s:.0f} s; timing anyway")
    if subject.reset:
        subject.reset()
    run_calls(subject.advance, timing.lead_in, timing.lead_in_s, clock)
    synchronize(device)
    waited_before = subject.waited_s() if subject.waited_s else 0.0
    images, calls, seconds = time_window(
        subject.advance, device, subject.window_calls or timing.window_calls, timing.window_s, clock
    )
    waited = subject.waited_s() - waited_before if subject.waited_s else None
    if subject.pause:
        subject.pause()
    return images, calls, seconds, waited


def report(entry: _Live) -> None:
    """Fill a live row from its windows: the set-up fields, the summary, wait_pct, finish()."""
    row, subject = entry.row, entry.subject
    row.update(subject.info)
    row.update(summarize([images / seconds for images, _, seconds, _ in entry.windows]))
    row["window_calls"] = [calls for _, calls, _, _ in entry.windows]
    row["window_seconds"] = [seconds for _, _, seconds, _ in entry.windows]
    if subject.waited_s:
        total_s = sum(seconds for _, _, seconds, _ in entry.windows)
        row["wait_pct"] = 100.0 * sum(waited for *_, waited in entry.windows) / total_s
    row["status"] = "ok"
    if subject.finish:
        subject.finish(row)
