"""The Trainer: epochs, evaluation, stopping and resuming, the run's files (rank 0); `train(cfg)`.

Imports the loader contract, step.py, auto.py, distributed.py, rundir.py and the checkpoint's
content; never argv or os.environ (cli.py passes rank, world size and torchrun's restart count in)
and never a loader backend. `cfg.batch_size` is the global batch everywhere: each process's share
is `placement.batch_share(cfg.batch_size)`. Reasons (exact resume, timing, checkpoints, failures):
docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastalex.auto import decide, decision_lines
from fastalex.checkpoint import (
    CheckpointDir,
    Progress,
    capture_rng,
    checkpoint_state,
    restore_rng,
    restore_training,
)
from fastalex.config import TrainConfig
from fastalex.distributed import StopSignals, agree, collective, process_group
from fastalex.errors import UserError
from fastalex.loaders import Loader, build_loader, continue_train_loader
from fastalex.metrics import EpochMeter, EpochSums, append_jsonl, write_json, write_jsonl
from fastalex.rundir import (
    config_record,
    data_record,
    default_run_dir,
    diverged_error,
    epoch_line,
    epoch_row,
    kept_decisions,
    loader_bound_note,
    resume_point,
    save_cost_note,
    start_line,
    summary_record,
    write_file,
)
from fastalex.runtime import Runtime, resolve_runtime
from fastalex.shards import Manifest, read_manifest
from fastalex.step import Training, build_training, evaluate, lr_factor, make_train_step, peak_lr
from fastalex.tensorboard_log import Board
from fastalex.weights import load_initial_weights

LOG_EVERY_STEPS = 50  # host syncs: progress postfix, NaN check, DDP stop agreement
WARMUP_STEPS = 3  # compile (step 1), first momentum buffers (step 2): not steady-state throughput


@dataclass
class RunResult:
    run_dir: Path | None  # None on ranks other than 0
    status: str  # "done" or "interrupted" (SIGINT/SIGTERM: saved, continue with --resume)
    summary: dict = field(default_factory=dict)  # summary.json's content when done
    message: str = ""


def train(
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    local_world_size: int = 1,
    restart_count: int = 0,
) -> RunResult:
    """Train per `cfg`; under torchrun each process passes its rank and its node's restart count
    (cli.py reads the env); a restart on any node resumes on all (distributed.process_group).

    Rank 0 writes RUN/config.json, metrics.jsonl, summary.json and checkpoints/ and calls `log`
    with one line per epoch. Raises UserError for bad input and for a diverged loss (naming the
    epoch and step; the last good checkpoint is kept). Returns status "interrupted" after a
    SIGINT/SIGTERM, once the step in flight is done and a checkpoint is saved.
    """
    if cfg.resume and not cfg.out:
        raise UserError("--resume needs --out RUN: the run directory to continue")
    if restart_count and not cfg.out:
        raise UserError("a torchrun restart resumes from --out RUN: give --out to every launch")
    if cfg.batch_size % world_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} (images per step across all processes) does not "
            f"divide by the {world_size} processes; choose a multiple of {world_size}"
        )
    runtime = resolve_runtime(cfg, rank, world_size, local_rank, local_world_size)
    with process_group(runtime, cfg.collective_timeout_s, restart_count) as restarts:
        return Trainer(
            cfg,
            runtime,
            log if rank == 0 and log else (lambda line: None),
            progress and rank == 0,
            restarts,
        ).run()


@dataclass
class EpochPass:
    """One pass of train_epoch: its meter (sums, timings, what a resumed epoch carried in)."""

    meter: EpochMeter
    complete: bool  # the epoch's last step was taken
    interrupted: bool  # stopped by a signal before the epoch's end


class Trainer:
    """One process's share of a run: loaders, state, the epoch loop and the files (rank 0)."""

    # fixed for the run
    cfg: TrainConfig
    runtime: Runtime
    log: Callable[[str], None]
    show_bar: bool
    main: bool  # rank 0: the one that writes
    restart_count: int  # restarts so far, agreed by every rank: > 0 resumes by itself
    local_batch: int  # images per step in this process: placement.batch_share(cfg.batch_size)
    every_steps: int  # periodic checkpoints every this many steps (0: by time or none)
    every_s: float  # ... or every this many seconds
    run_dir: Path
    checkpoints: CheckpointDir
    # built at start
    train_loader: Loader
    val_loader: Loader
    training: Training
    step: Callable[[torch.Tensor, torch.Tensor], tuple]
    steps_per_epoch: int
    classes: list[list[str]]
    data: dict  # what the run trained on, for summary.json
    cut_epoch: str  # why the loader cannot continue the resumed epoch ("": it can): end it
    decisions: dict  # each `auto` (amp, compile, loader): what it chose, why, the figures
    board: Board | None  # --tensorboard: the scalars' writer (rank 0)
    # carried by a checkpoint
    progress: Progress
    # per process
    signals: StopSignals
    warmup_s: float | None
    first_epoch_here: bool  # this process's first epoch holds the warm-up steps
    pending_rng: list[dict] | None
    saved: Path | None  # the last checkpoint written or read
    saved_at: float  # perf_counter of the last periodic checkpoint
    epoch_start_step: int
    mark: float  # perf_counter of the last log point
    noted: set[str]  # the advice lines already logged

    def __init__(
        self,
        cfg: TrainConfig,
        runtime: Runtime,
        log: Callable[[str], None],
        show_bar: bool,
        restart_count: int = 0,
    ) -> None:
        self.cfg, self.runtime, self.log, self.show_bar = cfg, runtime, log, show_bar
        self.main = runtime.rank == 0
        self.restart_count = restart_count
        self.local_batch = runtime.placement.batch_share(cfg.batch_size)
        self.every_steps, self.every_s = cfg.checkpoint_interval()
        self.progress = Progress(world_size=runtime.world_size)
        self.warmup_s, self.first_epoch_here, self.pending_rng = None, True, None
        self.saved, self.saved_at = None, time.perf_counter()
        self.noted = set()
        self.cut_epoch = ""
        self.decisions, self.board = {}, None

    def run(self) -> RunResult:
        cfg, rt = self.cfg, self.runtime
        manifest = read_manifest(Path(cfg.shards))
        if not cfg.out:  # only rank 0 writes; resume (the only reader elsewhere) requires --out
            self.cfg = cfg = dataclasses.replace(cfg, out=str(default_run_dir()))
        self.run_dir = Path(cfg.out)
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", cfg.keep_checkpoints)
        state, self.saved = resume_point(
            cfg, self.checkpoints, self.restart_count, manifest, rt, self.log, self.collective
        )
        if state:
            self.progress = Progress.from_state_dict(state)
        # Every `auto` (amp, compile, loader) settled once, before the loaders (auto.py); a resume
        # keeps what its run chose, so the epoch goes on with the same backend
        kept = kept_decisions(cfg, state, self.run_dir, self.log)
        self.cfg, self.runtime, self.decisions = decide(cfg, rt, manifest, self.log, recorded=kept)
        cfg, rt, placement, p = self.cfg, self.runtime, self.runtime.placement, self.progress
        saved = state["config"]["loader"] if state else cfg.loader
        self.train_loader, self.cut_epoch = continue_train_loader(
            cfg, placement, p.epoch, p.cursor, p.world_size, saved, build_loader
        )
        try:
            self.val_loader = build_loader(cfg, "val", placement, p.epoch)
            try:
                return self.loop(manifest, state)
            finally:
                self.val_loader.close()
        finally:
            self.train_loader.close()
            if self.board is not None:
                self.board.close()

    def collective(self, what: str):
        """distributed.collective for this run: a failure names `what` and how to continue."""
        hint = f"Continue with --resume --out {self.run_dir}"
        return collective(self.runtime, what, self.cfg.collective_timeout_s, hint)

    def loop(self, manifest: Manifest, state: dict | None) -> RunResult:
        cfg, rt, p = self.cfg, self.runtime, self.progress
        self.steps_per_epoch = steps_per_epoch = len(self.train_loader)
        epoch, skip = p.epoch, p.step_in_epoch
        if p.global_step != epoch * steps_per_epoch + skip or p.cursor != skip * cfg.batch_size:
            raise UserError(
                f"{self.saved} was written at {p.global_step} steps (epoch {epoch}, step "
                f"{skip}), which does not match {steps_per_epoch} steps per epoch of "
                f"{cfg.batch_size} images: resume with the --batch-size it was trained with"
            )
        if self.cut_epoch:
            p.global_step = (epoch + 1) * steps_per_epoch
        self.training = build_training(
            cfg, manifest.num_classes, rt, steps_per_epoch, p.global_step
        )
        self.classes = [list(c) for c in manifest.classes]
        self.data = data_record(manifest)
        carried = p.partial or EpochSums()
        if state:
            t = self.training
            note = restore_training(t.module, t.optimizer, t.scaler, state)
            if note:
                self.log(note)
            self.pending_rng = p.rng
        elif cfg.init_from:  # weights before step 0 (weights.py)
            self.log(load_initial_weights(self.training.module, cfg.init_from))
        self.step = make_train_step(
            self.training.model, self.training.optimizer, self.training.scaler, cfg, rt
        )
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_file(self.run_dir / "config.json", write_json, config_record(cfg, self.decisions))
            write_file(self.run_dir / "metrics.jsonl", write_jsonl, p.history)
            if cfg.tensorboard:
                self.board = Board(self.run_dir)
        for line in decision_lines(self.decisions):
            self.log(line)
        verb = "resuming" if state else "training"
        self.log(f"{verb} {self.run_dir}: {start_line(cfg, rt, manifest, self.train_loader)}")
        with StopSignals() as self.signals:
            if self.cut_epoch:
                self.log(
                    f"resumed inside epoch {epoch + 1}: {self.cut_epoch}, so epoch {epoch + 1} "
                    f"ends after its {skip} steps and the run goes on at epoch {epoch + 2}"
                )
                meter = self.new_meter(carried)
                meter.start(timed=False)
                meter.stop()
                self.finish_epoch(epoch, EpochPass(meter, complete=True, interrupted=False))
                epoch, skip, carried = epoch + 1, 0, EpochSums()
            while epoch < cfg.epochs and not (cfg.max_steps and p.global_step >= cfg.max_steps):
                outcome = self.train_epoch(epoch, skip, carried)
                if outcome.interrupted:
                    return self.interrupted(epoch, outcome)
                self.finish_epoch(epoch, outcome)
                if outcome.complete:
                    epoch, skip, carried = epoch + 1, 0, EpochSums()
                with self.collective("the stop vote after an epoch"):
                    stop = agree(rt, self.signals.received is not None).stop
                if stop and epoch < cfg.epochs:
                    return self.interrupted(epoch, None)
        return self.summarize()

    def new_meter(self, carried: EpochSums) -> EpochMeter:
        meter = EpochMeter(
            self.runtime.device, LOG_EVERY_STEPS, self.local_batch, self.runtime.world_size
        )
        meter.merge(carried)
        return meter

    def train_epoch(self, epoch: int, skip: int, carried: EpochSums) -> EpochPass:
        """Steps of one epoch (from `skip`, after the `carried` part of a resumed one)."""
        cfg, rt, p = self.cfg, self.runtime, self.progress
        planned = self.steps_per_epoch - skip
        if cfg.max_steps:
            planned = min(planned, cfg.max_steps - p.global_step)
        warm = min(WARMUP_STEPS, planned) if self.first_epoch_here else 0
        self.first_epoch_here = False
        meter = self.new_meter(carried)
        batches = iter(self.train_loader)  # a generator: nothing runs until fetch
        if self.pending_rng is not None:  # where the interrupted run stood before this step
            restore_rng(self.pending_rng, rt.device, rt.rank, rt.world_size)
            self.pending_rng = None
        self.training.model.train()
        with tqdm(
            total=self.steps_per_epoch,
            initial=skip,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not self.show_bar,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            self.epoch_start_step = p.global_step - skip
            self.mark = meter.start(timed=warm == 0)
            done, stop = 0, False
            for done in range(1, planned + 1):
                images, labels = meter.fetch(batches)  # (N, 3, S, S) uint8, (N,) int64
                with self.collective("the gradient all-reduce of a step"):
                    loss_sum, correct = self.step(
                        images.contiguous(memory_format=rt.memory_format), labels
                    )
                meter.add(loss_sum, correct)
                self.training.schedule.step()
                p.global_step += 1
                bar.update()
                if done == warm:  # compile, first allocations and worker start-up end here
                    self.warmup_s = meter.begin_timed()
                stop = self.log_point(meter, epoch, bar, last=done == planned)
                if stop:
                    break
            meter.stop()
        if warm and self.warmup_s is not None and p.compile_s is None:
            timed = meter.timed_steps
            steady_step_s = (meter.ended - meter.timed_from) / timed if timed else 0.0
            p.compile_s = max(0.0, self.warmup_s - warm * steady_step_s) if rt.compile else 0.0
        complete = skip + done == self.steps_per_epoch and meter.steps == self.steps_per_epoch
        return EpochPass(meter, complete, interrupted=stop and not complete)

    def log_point(self, meter: EpochMeter, epoch: int, bar: tqdm, last: bool) -> bool:
        """After a step: at a log point (a full window, the pass's last step, a signal in a
        single process, a checkpoint due by steps) read the window (a sync), check the losses,
        agree across ranks on stopping and on a checkpoint by time, and write one if due.
        Returns whether to stop."""
        rt, step = self.runtime, self.progress.global_step
        signalled = self.signals.received is not None and rt.world_size == 1
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        if not (meter.window.full or last or signalled or by_steps):
            return False
        rows = meter.drain()
        by_time = bool(self.every_s) and time.perf_counter() - self.saved_at >= self.every_s
        with self.collective("the stop vote at a log point"):
            agreed = agree(rt, self.signals.received is not None, meter.first_bad_step, by_time)
        if agreed.bad_step is not None:
            raise self.diverged(
                epoch,
                f"step {agreed.bad_step + 1} of {self.steps_per_epoch} "
                f"(global step {self.epoch_start_step + agreed.bad_step + 1})",
            )
        now = time.perf_counter()
        if rows:
            images = len(rows) * self.cfg.batch_size
            loss = sum(row[0] for row in rows) / (len(rows) * self.local_batch)
            images_per_s = images / max(now - self.mark, 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}", refresh=False)
            if self.board is not None:
                lr = self.training.schedule.get_last_lr()[0]
                self.board.interval(step, loss, images_per_s, lr)
        self.mark = now
        # the pass's last step is saved by finish_epoch, a stop by interrupted
        if (by_steps or agreed.save) and not (agreed.stop or last):
            meter.exclude(self.save_mid_epoch(epoch, meter))
            self.mark = time.perf_counter()
        return agreed.stop

    def save_mid_epoch(self, epoch: int, meter: EpochMeter) -> float:
        """A periodic checkpoint inside an epoch (every rank takes part). Returns its seconds."""
        started = time.perf_counter()
        sums = self.epoch_sums(meter)
        self.save(epoch, sums, self.capture_rng(), self.progress.history)
        self.saved_at = time.perf_counter()
        return self.saved_at - started

    def epoch_sums(self, meter: EpochMeter) -> EpochSums:
        with self.collective("summing the epoch's train totals"):
            return meter.all_reduced()

    def capture_rng(self) -> list[dict]:
        with self.collective("gathering the ranks' RNG states"):
            return capture_rng(self.runtime.device, self.runtime.world_size)

    def diverged(self, epoch: int, where: str) -> UserError:
        return diverged_error(self.cfg, epoch, where, self.saved)

    def finish_epoch(self, epoch: int, outcome: EpochPass) -> None:
        """Eval, the metrics row, the checkpoint: after an epoch, or a partial one (max_steps)."""
        cfg, rt, p = self.cfg, self.runtime, self.progress
        sums = self.epoch_sums(outcome.meter)
        rng_mid_epoch = None if outcome.complete else self.capture_rng()
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # eval draws nothing from the training stream
            with self.collective("summing the val totals"):
                val = evaluate(self.training.module, self.val_loader, rt, cfg.flip_tta)
        eval_s = time.perf_counter() - started
        if not math.isfinite(val["loss"]):
            raise self.diverged(epoch, "in its last steps (val loss not finite)")
        lr = peak_lr(cfg) * lr_factor(cfg, self.steps_per_epoch, p.global_step - 1)
        row = epoch_row(epoch, sums, val, eval_s, lr)
        p.history.append(row)
        improved = row["val_top1"] > p.best_top1
        p.best_top1 = max(p.best_top1, row["val_top1"])
        self.write_row(row)
        self.log(epoch_line(row, cfg.epochs))
        self.note_once(
            "loader-bound", loader_bound_note(row, cfg, rt.device, self.train_loader.backend)
        )
        if outcome.complete:
            self.save(epoch + 1, None, self.capture_rng(), p.history, improved)
        else:  # stopped by max_steps mid-epoch: --resume continues inside the epoch, whose
            # partial row a resumed run does not keep
            self.save(epoch, sums, rng_mid_epoch, p.history[:-1], improved)

    def write_row(self, row: dict) -> None:
        """One metrics.jsonl line (rank 0): the one place a row is written."""
        if self.main:
            write_file(self.run_dir / "metrics.jsonl", append_jsonl, row)
        if self.board is not None:
            self.board.epoch(row)

    def note_once(self, kind: str, note: str | None) -> None:
        """Log an advice line of `kind` (loader-bound, costly checkpoints) the first time."""
        if note and kind not in self.noted:
            self.noted.add(kind)
            self.log(note)

    def save(
        self,
        epoch: int,
        partial: EpochSums | None,
        rng: list[dict],
        history: list[dict],
        best: bool = False,
    ) -> None:
        """A checkpoint (rank 0) of where the run stands: `epoch` completed epochs plus
        `partial` (the global sums of a part-done epoch, None at a boundary); `rng` every rank's
        state; `history` the rows the weights have seen as complete epochs (a resumed run
        rewrites metrics.jsonl from it); best.pt links to it when val top-1 improved."""
        p = self.progress
        steps = partial.steps if partial else 0
        p.epoch, p.step_in_epoch, p.partial, p.rng = epoch, steps, partial, rng
        p.cursor, p.world_size = steps * self.cfg.batch_size, self.runtime.world_size
        record = dataclasses.replace(p, history=list(history))
        if self.main:
            t = self.training
            state = checkpoint_state(
                self.cfg, self.classes, t.module, t.optimizer, t.scaler, record
            )
            path, seconds, size = self.checkpoints.save(state, best)
            self.log(f"checkpoint {path.name}: {size / 2**20:.0f} MiB in {seconds:.2f} s")
            self.note_once("save cost", save_cost_note(seconds, self.cfg))
        self.saved = self.checkpoints.path / f"step-{p.global_step:08d}.pt"

    def interrupted(self, epoch: int, outcome: EpochPass | None) -> RunResult:
        """After SIGINT/SIGTERM (agreed by every rank): save where the run stands (mid-epoch when
        `outcome`)."""
        rt = self.runtime
        if outcome is not None:
            sums = self.epoch_sums(outcome.meter)
            self.save(epoch, sums, self.capture_rng(), self.progress.history)
            where = f"epoch {epoch + 1}, step {sums.steps}"
        else:
            where = f"the end of epoch {epoch}"
        if rt.world_size > 1:  # no rank exits (and has torchrun stop the others) before rank 0
            with self.collective("the barrier after the last checkpoint"):
                dist.barrier()  # has written the checkpoint
        received = self.signals.received
        name = signal.Signals(received).name if received else "a signal to another process"
        message = (
            f"{name}: stopped at {where}; saved {self.saved}. Continue with the same "
            f"command plus --resume --out {self.run_dir}"
        )
        self.log(message)
        return RunResult(self.run_dir if self.main else None, "interrupted", message=message)

    def summarize(self) -> RunResult:
        summary = summary_record(
            self.cfg,
            self.runtime,
            self.progress,
            warmup_s=self.warmup_s,
            data=self.data,
            loader=self.train_loader.backend,
            decisions=self.decisions,
        )
        if self.main:
            write_file(self.run_dir / "summary.json", write_json, summary)
        if self.progress.history:
            self.log(
                f"done: val top-1 {summary['top1']:.2f} %, top-5 {summary['top5']:.2f} % "
                f"(best top-1 {summary['best_top1']:.2f} %) after {summary['epochs']} "
                f"epochs; {summary['images_per_s'] or 0:.0f} img/s, compile "
                f"{summary['compile_s'] or 0:.1f} s; {self.run_dir}"
            )
        return RunResult(self.run_dir if self.main else None, "done", summary)
