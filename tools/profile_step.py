#!/usr/bin/env python3
"""Where a training step's time goes: `torch.profiler` over N steps of the real trainer and loader,
a table by phase (loader wait, forward, backward, optimizer, host syncs) and a Chrome trace.

    python tools/profile_step.py data/shards                      # the fast recipe on this device
    python tools/profile_step.py data/shards --no-compile --steps 20 --trace step.json

It builds what `fastalex train` builds (fastalex.step.build_training, make_train_step, the train
loader from build_loader; every train option applies), runs --warmup steps unprofiled (the compile
and first allocations), then profiles --steps steps as the trainer runs them: fetch the batch,
step, advance the LR schedule. Open the trace in chrome://tracing or https://ui.perfetto.dev.

How the table attributes time (per step, host wall time; on CUDA also the GPU time of the kernels
each phase launched): loader wait is the host time in next() on the loader ("fastalex::loader_wait"
around it); forward is the model's call (a "fastalex::forward" range around it when eager, the
compiled graph's "CompiledFunction" when compiled); backward is the autograd engine's top-level
nodes; optimizer is torch.optim's "Optimizer.step"/"zero_grad" ranges (a compiled CPU step fuses
SGD into its graph, so there it lands in "other"); other is the rest of the step (loss, schedule,
glue). Host syncs count the points in the step (not in the loader, which reads its own host tensors)
where the host read a value back or waited on the device (aten::_local_scalar_dense behind
.item(), cuda*Synchronize): the trainer's step has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from _common import Tool, build_trainer, train_config, train_options

LOADER_WAIT = "fastalex::loader_wait"
FORWARD = "fastalex::forward"
STEP = "fastalex::step"
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
SYNC_NAMES = (
    "aten::_local_scalar_dense",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)
PHASES = ("loader wait", "forward", "backward", "optimizer")


def labelled_forward(training):
    """The model the step calls, its forward inside a FORWARD profiler range (dynamo ignores the
    range inside a compiled graph, whose own "CompiledFunction" range then counts)."""
    import torch
    from torch.profiler import record_function

    class Labelled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            with record_function(FORWARD):
                return self.model(images)

    return Labelled(training.model)


def phase_of(event) -> str | None:
    """The table's phase of a profiler event, or None."""
    name = event.name
    if name == LOADER_WAIT:
        return "loader wait"
    if name in (FORWARD, "CompiledFunction"):
        return "forward"
    if name.startswith(BACKWARD_PREFIX):
        return "backward"
    if name.startswith(OPTIMIZER_PREFIXES):
        return "optimizer"
    return None


def outermost(event, phase: str) -> bool:
    """Whether no ancestor of `event` belongs to the same phase (nested ranges count once)."""
    parent = event.cpu_parent
    while parent is not None:
        if phase_of(parent) == phase:
            return False
        parent = parent.cpu_parent
    return True


def inside(event, name: str) -> bool:
    """Whether a range called `name` encloses `event`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def attribute(events, steps: int) -> dict:
    """{phase: (host ms, device ms) per step} plus "step", "other" and "syncs" (count, host ms)."""
    totals = {phase: [0.0, 0.0] for phase in (*PHASES, "step")}
    syncs = [0, 0.0]
    for event in events:
        phase = "step" if event.name == STEP else phase_of(event)
        if phase is not None and outermost(event, phase):
            totals[phase][0] += event.time_range.elapsed_us() / 1000
            totals[phase][1] += event.device_time_total / 1000
        elif event.name in SYNC_NAMES and not inside(event, LOADER_WAIT):
            syncs[0] += 1
            syncs[1] += event.time_range.elapsed_us() / 1000
    table = {phase: (host / steps, device / steps) for phase, (host, device) in totals.items()}
    table["other"] = (
        max(0.0, table["step"][0] - sum(table[p][0] for p in PHASES)),
        max(0.0, table["step"][1] - sum(table[p][1] for p in PHASES)),
    )
    table["syncs"] = (syncs[0] / steps, syncs[1] / steps)
    return table


def format_table(table: dict, device: bool) -> str:
    total = table["step"][0] or float("nan")
    lines = [
        f"{'phase':<12} {'host ms/step':>13} {'share':>6}"
        + (f" {'GPU ms/step':>12}" if device else "")
    ]
    for phase in (*PHASES, "other", "step"):
        host, gpu = table[phase]
        lines.append(
            f"{phase:<12} {host:>13.2f} {100 * host / total:>5.0f}%"
            + (f" {gpu:>12.2f}" if device else "")
        )
    count, host = table["syncs"]
    lines.append(
        f"{'host syncs':<12} {host:>13.2f} {100 * host / total:>5.0f}%  "
        f"({count:g} per step, outside the loader)"
    )
    return "\n".join(lines)


@click.command(cls=Tool, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", type=click.Path(path_type=Path))
@click.option(
    "--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Steps profiled."
)
@click.option(
    "--warmup",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Steps run first, unprofiled (compile, first allocations).",
)
@click.option(
    "--trace",
    type=click.Path(path_type=Path),
    default=Path("step_trace.json"),
    show_default=True,
    help="Chrome trace of the profiled steps.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the table here.",
)
@train_options()
@click.pass_context
def main(ctx, shards, steps, warmup, trace, json_path, **options) -> None:
    """Profile --steps steps of the real trainer and loader on the pack at SHARDS: a table of
    where a step's time goes and a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from fastalex.runtime import synchronize

    cfg = train_config(ctx, shards, options)
    trainer = build_trainer(cfg, labelled_forward)
    rt, schedule = trainer.runtime, trainer.training.schedule
    cuda = rt.device.type == "cuda"
    batches = trainer.batches()

    def one_step() -> None:
        with record_function(STEP):
            with record_function(LOADER_WAIT):
                images, labels = next(batches)  # (N, 3, S, S) uint8, (N,) int64
            trainer.step(images, labels)
            schedule.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        for _ in range(warmup):
            one_step()
        synchronize(rt.device)
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                one_step()
            synchronize(rt.device)
    finally:
        batches.close()
        trainer.loader.close()
    table = attribute(profiler.events(), steps)
    trace.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    click.echo(profiler.key_averages().table(sort_by=sort, row_limit=12))
    click.echo(
        f"{cfg.arch} at {cfg.image_size} px, batch {cfg.batch_size}, {rt.device}, amp "
        f"{rt.amp}, compile {'on' if rt.compile else 'off'}, loader "
        f"{trainer.loader.backend}: mean of {steps} steps after {warmup} warm-up"
    )
    click.echo(format_table(table, cuda))
    click.echo(f"trace: {trace} (chrome://tracing or ui.perfetto.dev)")
    if json_path is not None:
        count, sync_ms = table.pop("syncs")
        rows = {
            phase: {"host_ms": host, "device_ms": device} for phase, (host, device) in table.items()
        }
        rows["host syncs"] = {"per_step": count, "host_ms": sync_ms}
        json_path.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
