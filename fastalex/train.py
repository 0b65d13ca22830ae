"""Training: the step, the LR schedule, evaluation, the epoch loop and what ranks agree on;
`train(cfg)` runs it.

Imports torch, the loader contract (`fastalex.loaders`), the model, metrics, runtime and
checkpoint modules; never argv or os.environ (cli.py passes rank, world size and torchrun's restart
count in) and never a loader backend directly. `--batch-size` is the global batch: each process
takes cfg.batch_size // world_size (computed once, in `Trainer`). The benchmarks and tools reuse
`build_training`, `make_train_step`, `evaluate` and `train`, never a copy of the loop.
Reasons (speed plan, schedule, exact resume, timing, checkpoints, failures): docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastalex.checkpoint import (
    CheckpointDir,
    Progress,
    capture_rng,
    check_checkpoint,
    checkpoint_state,
    disk_error,
    load_checkpoint,
    restore_rng,
    restore_training,
)
from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Loader, Placement, build_loader
from fastalex.metrics import (
    EpochMeter,
    EpochSums,
    all_reduce_sum,
    append_jsonl,
    count_topk,
    median,
    percent,
    write_json,
    write_jsonl,
)
from fastalex.model import build_model, eval_logits, param_groups
from fastalex.runtime import (
    Runtime,
    configure_backends,
    decide,
    decision_lines,
    describe_device,
    describe_machine,
    git_sha,
    resolve_runtime,
    versions,
)
from fastalex.shards import Manifest, read_manifest
from fastalex.tensorboard_log import Board
from fastalex.weights import load_initial_weights

LOG_EVERY_STEPS = 50  # host syncs: progress postfix, NaN check, DDP stop agreement
WARMUP_STEPS = 3  # compile (step 1), first momentum buffers (step 2): not steady-state throughput
LR_REFERENCE_BATCH = 256  # cfg.lr is per 256 images (Goyal et al. 2017, linear scaling rule)
RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout masks from seed + r * stride
LOADER_BOUND_PCT = 20.0  # an epoch whose device waited longer than this on the loader is reported
SAVE_COST_PCT = 2.0  # periodic checkpoints costing more than this share of their interval: noted
# On the CPU torch.compile covers the whole step (forward, AOT-autograd backward, foreach SGD)
# with inductor's layout optimisation off (docs/training.md says why).
CPU_COMPILE_OPTIONS = {"layout_optimization": False}


def peak_lr(cfg: TrainConfig) -> float:
    """cfg.lr scaled from 256 images to the global batch cfg.batch_size (reference: 0.02 * 128 /
    256 = 0.01), whatever the number of processes."""
    return cfg.lr * cfg.batch_size / LR_REFERENCE_BATCH


def lr_factor(cfg: TrainConfig, steps_per_epoch: int, step: int) -> float:
    """Multiplier of the peak LR at global `step` (0-based), for cfg.lr_schedule."""
    if cfg.lr_schedule == "step":  # StepLR(step_epochs, step_gamma), counted in epochs
        return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class Training:
    """What a step needs. `model` is what the step calls (DDP wrapper or the module itself)."""

    model: nn.Module
    module: nn.Module  # the bare model: state_dict, eval
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    schedule: torch.optim.lr_scheduler.LambdaLR


def build_training(
    cfg: TrainConfig, num_classes: int, runtime: Runtime, steps_per_epoch: int, start_step: int = 0
) -> Training:
    """Model (seeded by cfg.seed), SGD, GradScaler and the LR schedule placed at `start_step`."""
    configure_backends(runtime)
    torch.manual_seed(cfg.seed)
    module = build_model(cfg.arch, num_classes, cfg.image_size)
    module = module.to(runtime.device, memory_format=runtime.memory_format)
    torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * runtime.rank)
    model = module
    if runtime.world_size > 1:  # broadcasts rank 0's weights; all-reduces gradients
        model = DistributedDataParallel(
            module,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    lr = peak_lr(cfg)
    if runtime.compile_whole_step:  # inductor compiles foreach SGD into one fused loop per tensor;
        # a tensor LR lets each step's LR in without a recompile
        kernels = {"lr": torch.tensor(lr), "foreach": True}
    else:  # one fused kernel, which also takes a GradScaler's scale and inf flag on the device
        kernels = {"lr": lr, "fused": True}
    optimizer = torch.optim.SGD(
        param_groups(module, cfg.weight_decay, cfg.decay_biases), momentum=cfg.momentum, **kernels
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.grad_scaler)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, steps_per_epoch, start_step + step)
    )
    return Training(model, module, optimizer, scaler, schedule)


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    runtime: Runtime,
) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """``step(images, labels) -> (loss_sum, correct)``: one SGD step, results left on the device.

    images: (N, 3, S, S) uint8 pixels in runtime.memory_format; labels: (N,) int64. loss_sum is the
    batch's summed loss (float32 0-d), correct its top-1 hits (int64 0-d). Nothing here reads a
    value back to the host, so consecutive steps queue without waiting. With fp16 (a GradScaler,
    on CUDA or the CPU alike) a step whose gradients overflow is skipped by the optimizer and the
    scale lowered; the loss it reports is still the step's (finite) loss.
    """
    options = CPU_COMPILE_OPTIONS if runtime.device.type == "cpu" else None
    if runtime.compile and not runtime.compile_whole_step:  # CUDA, DDP, or fp16 on the CPU
        model = torch.compile(model, options=options)

    scaled = runtime.grad_scaler  # decided here: dynamo does not trace into GradScaler

    def backward_and_update(loss: torch.Tensor) -> None:
        if scaled:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # fused SGD takes the scale and inf flag on the device: no sync
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with runtime.autocast():
            logits = model(images)  # (N, classes) in the autocast dtype
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        backward_and_update(loss)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach() * labels.shape[0], (logits.argmax(dim=1) == labels).sum()

    if runtime.compile_whole_step:
        return torch.compile(step, options=options)
    return step


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, flip_tta: bool) -> dict:
    """Val loss, top-1 and top-5 (percent) over every sample of the loader, summed over the ranks.

    Returns {"loss", "top1", "top5", "samples"}; one host sync, at the end.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss, top1, top5, n
    for images, labels in loader:
        images = images.contiguous(memory_format=runtime.memory_format)
        with runtime.autocast():
            logits = eval_logits(model, images, flip_tta)  # (N, classes) float32
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1:3] += count_topk(logits, labels, (1, 5))
        totals[3] += labels.shape[0]
    loss_sum, top1, top5, samples = all_reduce_sum(totals).tolist()  # sync point
    model.train(was_training)
    return {
        "loss": loss_sum / samples if samples else float("nan"),
        "top1": percent(top1, samples),
        "top5": percent(top5, samples),
        "samples": int(samples),
    }


class Agreed(NamedTuple):
    stop: bool  # some rank was signalled
    bad_step: int | None  # the earliest non-finite step any rank saw (None: none)
    save: bool  # some rank's checkpoint clock is due


def agree(runtime: Runtime, stop: bool, bad_step: int | None = None, save: bool = False) -> Agreed:
    """What every rank decides at a log point or an epoch end, from each rank's own view.

    One MIN all-reduce under DDP (a collective: every rank must call it at the same point); the
    values as given in a single process. Every stop and periodic-checkpoint decision of the loop
    goes through here.
    """
    if runtime.world_size == 1:
        return Agreed(stop, bad_step, save)
    flags = torch.tensor(
        [math.inf if bad_step is None else bad_step, 0.0 if stop else 1.0, 0.0 if save else 1.0],
        dtype=torch.float64,
        device=runtime.device,
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    bad, keep_going, no_save = flags.tolist()
    return Agreed(keep_going == 0.0, None if math.isinf(bad) else int(bad), no_save == 0.0)


@dataclass
class RunResult:
    run_dir: Path | None  # None on ranks other than 0
    status: str  # "done" or "interrupted" (SIGINT/SIGTERM: saved, continue with --resume)
    summary: dict = field(default_factory=dict)  # summary.json's content when done
    message: str = ""


class StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads after each step; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def default_run_dir() -> Path:
    sha = git_sha().replace("+dirty", "")
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}_{sha}"


def open_train_loader(cfg: TrainConfig, placement: Placement, epoch: int, cursor: int) -> Loader:
    """The train loader from `epoch`, its first pass starting at global sample `cursor`."""
    return build_loader(cfg, "train", placement, epoch, skip_samples=cursor)


def parse_every(text: str) -> tuple[int, float]:
    """--checkpoint-every as (steps, seconds), the other 0: "500" -> (500, 0), "90s" -> (0, 90),
    "10m" -> (0, 600), "0" -> (0, 0) (epoch ends only)."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip()).groups()
    if not unit:
        return int(float(number)), 0.0
    return 0, float(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def is_collective_error(error: BaseException) -> bool:
    """A failure of the process group (a peer died, a timeout), not of the code."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("gloo", "NCCL", "Connection closed", "Timed out", "timed out")
    )


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
    """Train per `cfg`; under torchrun each process passes its rank and torchrun's restart count
    (cli.py reads the env): a restarted process (restart_count > 0) resumes by itself.

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
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        timeout = timedelta(seconds=cfg.collective_timeout_s)
        # torchrun's store (MASTER_ADDR/PORT from its env) outlives a restart and still holds the
        # dead attempt's process-group keys: a restarted rank could read a dead peer's address
        # ("connectFullMesh ... connection refused"), so each attempt keys under its own prefix
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        dist.init_process_group(
            "nccl" if runtime.device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"fastalex/attempt-{restart_count}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    try:
        return Trainer(
            cfg,
            runtime,
            log if rank == 0 and log else (lambda line: None),
            progress and rank == 0,
            restart_count,
        ).run()
    finally:
        if joined:
            dist.destroy_process_group()


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
    restart_count: int  # torchrun's restarts so far: > 0 resumes by itself
    local_batch: int  # images per step in this process: cfg.batch_size // world_size
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
    cut_epoch: bool  # dali resumed mid-epoch on another process count: end that epoch here
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
    warned_loader_bound: bool
    warned_save_cost: bool

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
        self.local_batch = cfg.batch_size // runtime.world_size
        self.every_steps, self.every_s = parse_every(cfg.checkpoint_every)
        self.progress = Progress(world_size=runtime.world_size)
        self.warmup_s, self.first_epoch_here, self.pending_rng = None, True, None
        self.saved, self.saved_at = None, time.perf_counter()
        self.warned_loader_bound = self.warned_save_cost = False
        self.cut_epoch = False
        self.decisions, self.board = {}, None

    def run(self) -> RunResult:
        cfg, rt = self.cfg, self.runtime
        manifest = read_manifest(Path(cfg.shards))
        if not cfg.out:  # only rank 0 writes; resume (the only reader elsewhere) requires --out
            self.cfg = cfg = dataclasses.replace(cfg, out=str(default_run_dir()))
        self.run_dir = Path(cfg.out)
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", cfg.keep_checkpoints)
        state = self.open_run(manifest)
        if state:
            self.progress = Progress.from_state_dict(state)
        placement = Placement(rt.device, rt.rank, rt.world_size, rt.local_world_size)
        loader_cfg = dataclasses.replace(cfg, batch_size=self.local_batch)  # per process
        # Every `auto` (amp, compile, loader) settled once, before the loaders (runtime.py)
        loader_cfg, rt, self.decisions = decide(loader_cfg, rt, manifest, self.log)
        self.cfg = cfg = dataclasses.replace(loader_cfg, batch_size=cfg.batch_size)
        self.runtime = rt
        p = self.progress
        self.train_loader = open_train_loader(loader_cfg, placement, p.epoch, p.cursor)
        try:
            if p.cursor and p.world_size != rt.world_size and self.train_loader.backend == "dali":
                # DALI's shuffle lives in its pipeline: the rest of the epoch cannot be split
                # anew, so that epoch ends where it stopped and the run goes on at the next
                self.train_loader.close()
                self.train_loader = open_train_loader(loader_cfg, placement, p.epoch + 1, 0)
                self.cut_epoch = True
            self.val_loader = build_loader(loader_cfg, "val", placement, p.epoch)
            try:
                return self.loop(manifest, state)
            finally:
                self.val_loader.close()
        finally:
            self.train_loader.close()
            if self.board is not None:
                self.board.close()

    def open_run(self, manifest: Manifest) -> dict | None:
        """The checkpoint this run continues (--resume, or a torchrun restart), or None for a
        fresh run; UserError for an --out that holds another run or a finished one."""
        cfg, run_dir = self.cfg, self.run_dir
        if not (cfg.resume or self.restart_count):
            if (run_dir / "metrics.jsonl").exists() or self.checkpoints.last.exists():
                raise UserError(
                    f"{run_dir} already holds a run; continue it with --resume or choose "
                    "another --out"
                )
            return None
        path = self.choose_checkpoint()
        if path is None:
            if cfg.resume:
                raise UserError(f"{self.checkpoints.path}: no checkpoint to resume from")
            self.log(f"restart {self.restart_count}: no checkpoint yet, starting {run_dir} anew")
            return None
        state = load_checkpoint(path)
        check_checkpoint(state, path, cfg.arch, cfg.image_size, manifest, cfg.shards)
        epoch = state["epoch"]
        if epoch >= cfg.epochs:
            raise UserError(
                f"{run_dir} has finished {epoch} of {cfg.epochs} epochs; "
                "raise --epochs to train longer"
            )
        self.saved = path
        return state

    def choose_checkpoint(self) -> Path | None:
        """Rank 0 picks the newest valid checkpoint (warning about damaged ones); every rank
        loads the one it picked."""
        chosen = [None]
        if self.main:
            self.checkpoints.sweep()
            chosen = [self.checkpoints.newest_valid(self.log)]
        if self.runtime.world_size > 1:
            with self.collective("choosing the checkpoint to resume"):
                dist.broadcast_object_list(chosen, src=0)
        return None if chosen[0] is None else Path(chosen[0])

    @contextlib.contextmanager
    def collective(self, what: str):
        """A collective whose failure (a peer died or went silent past --collective-timeout-s)
        ends this process with a message naming it, never a wait."""
        try:
            yield
        except RuntimeError as e:
            if self.runtime.world_size == 1 or not is_collective_error(e):
                raise
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            message = (
                f"rank {self.runtime.rank}: {what} failed ({reason}): another process died or "
                f"did not answer within --collective-timeout-s {self.cfg.collective_timeout_s:g};"
                " see its log (a process the kernel's OOM killer ended leaves none: likely "
                f"memory). Continue with --resume --out {self.run_dir}"
            )
            if not self.main:  # cli.py prints rank 0's errors only
                sys.stderr.write(f"error: {message}\n")
            raise UserError(message) from None

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
        self.data = {  # what the run trained on, for summary.json and RESULTS.md
            "source": manifest.source.get("path"),
            "classes": manifest.num_classes,
            "train_images": manifest.splits["train"].samples,
            "val_images": manifest.splits["val"].samples,
            "synthetic": all(words.startswith("synthetic") for _, words in manifest.classes),
        }
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
            write_file(self.run_dir / "config.json", write_json, self.config_record())
            write_file(self.run_dir / "metrics.jsonl", write_jsonl, p.history)
            if cfg.tensorboard:
                self.board = Board(self.run_dir)
        for line in decision_lines(self.decisions):
            self.log(line)
        self.log(
            f"{'resuming' if state else 'training'} {self.run_dir}: {cfg.arch} at "
            f"{cfg.image_size} px, {manifest.num_classes} classes, "
            f"{steps_per_epoch * cfg.batch_size} train / "
            f"{manifest.splits['val'].samples} val images; "
            f"{steps_per_epoch} steps per epoch of {cfg.batch_size} "
            f"({self.local_batch} x {rt.world_size} processes); "
            f"{describe_device(rt)}, amp {rt.amp}, compile {'on' if rt.compile else 'off'}; "
            f"loader {self.train_loader.summary}"
        )
        with StopSignals() as self.signals:
            if self.cut_epoch:
                self.log(
                    f"resumed on {rt.world_size} processes (saved on {p.world_size}) inside epoch "
                    f"{epoch + 1}: the dali loader cannot split the rest of an epoch anew, so "
                    f"epoch {epoch + 1} ends after its {skip} steps and the run goes on at "
                    f"epoch {epoch + 2}"
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
        if self.saved is not None:
            kept = f"the last good checkpoint, {self.saved}, is kept"
        else:
            kept = "no checkpoint had been written yet"
        return UserError(
            f"training diverged: the loss is not finite (nan/inf) at epoch "
            f"{epoch + 1}, {where}; stopped, {kept}. Lower --lr (now {self.cfg.lr}) "
            "or lengthen --warmup-epochs"
        )

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
        row = {
            "epoch": epoch + 1,
            "steps": sums.steps,
            "lr": peak_lr(cfg) * lr_factor(cfg, self.steps_per_epoch, p.global_step - 1),
            "train_loss": sums.loss_sum / sums.samples,
            "train_top1": percent(sums.correct, sums.samples),
            "train_samples": sums.samples,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_samples": val["samples"],
            "epoch_s": sums.train_s + eval_s,
            "train_s": sums.train_s,
            "eval_s": eval_s,
            "timed_s": sums.timed_s,  # train_s less the warm-up steps: images/s, loader wait
            "images_per_s": sums.timed_samples / sums.timed_s if sums.timed_samples else None,
            "loader_wait_s": sums.loader_wait_s,
            "loader_wait_pct": percent(sums.loader_wait_s, sums.timed_s),
        }
        p.history.append(row)
        improved = row["val_top1"] > p.best_top1
        p.best_top1 = max(p.best_top1, row["val_top1"])
        self.write_row(row)
        self.log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
            f"top-1 {row['train_top1']:.2f} % | val loss {row['val_loss']:.4f} "
            f"top-1 {row['val_top1']:.2f} % top-5 {row['val_top5']:.2f} % "
            f"({row['val_samples']} images) | {row['epoch_s']:.1f} s, "
            + (f"{row['images_per_s']:.0f} img/s" if row["images_per_s"] else "warm-up only")
            + f", waited on the loader {row['loader_wait_s']:.1f} s "
            f"({row['loader_wait_pct']:.0f} %)"
        )
        self.warn_if_loader_bound(row)
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

    def warn_if_loader_bound(self, row: dict) -> None:
        """Once per run: an epoch whose device waited on the loader over LOADER_BOUND_PCT."""
        if self.warned_loader_bound or not row["loader_wait_pct"] > LOADER_BOUND_PCT:
            return
        self.warned_loader_bound = True
        remedies = [
            "--loader resident (if the decoded split fits in device memory)",
            f"more --loader-workers (now {self.cfg.loader_workers or 'the default'})",
        ]
        if self.runtime.device.type == "cuda" and self.train_loader.backend != "dali":
            remedies.append("--loader dali (decodes on the GPU)")
        self.log(
            f"note: this run is loader-bound: the model waited on the loader "
            f"{row['loader_wait_pct']:.0f} % of epoch {row['epoch']}; try " + ", or ".join(remedies)
        )

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
            self.warn_if_saving_costs(seconds)
        self.saved = self.checkpoints.path / f"step-{p.global_step:08d}.pt"

    def warn_if_saving_costs(self, seconds: float) -> None:
        """Once: periodic checkpoints that take over SAVE_COST_PCT of their interval."""
        if (
            self.warned_save_cost
            or not self.every_s
            or seconds < self.every_s * SAVE_COST_PCT / 100
        ):
            return
        self.warned_save_cost = True
        self.log(
            f"note: a checkpoint takes {seconds:.1f} s, over {SAVE_COST_PCT:g} % of "
            f"--checkpoint-every {self.cfg.checkpoint_every}; lengthen it"
        )

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

    def config_record(self) -> dict:
        """config.json's content: the one place it is built."""
        return {**asdict(self.cfg), "decisions": self.decisions}

    def summary_record(self) -> dict:
        """summary.json's content: the one place it is built."""
        cfg, rt, p = self.cfg, self.runtime, self.progress
        history = p.history
        last = history[-1] if history else {}
        rates = [r["images_per_s"] for r in history[1:] if r["images_per_s"]]
        rates = rates or [r["images_per_s"] for r in history[:1] if r["images_per_s"]]
        waited_s = sum(r.get("loader_wait_s", 0.0) for r in history)
        return {
            "top1": last.get("val_top1"),
            "top5": last.get("val_top5"),
            "best_top1": p.best_top1 if history else None,
            "epochs": len(history),
            "steps": p.global_step,
            "epoch_s": [r["epoch_s"] for r in history],
            "images_per_s": median(rates) if rates else None,
            "loader_wait_s": waited_s,
            "loader_wait_pct": percent(waited_s, sum(r.get("timed_s", 0.0) for r in history)),
            "compile_s": p.compile_s,
            "warmup_s": self.warmup_s,
            "val_samples": last.get("val_samples"),
            "data": self.data,
            "device": describe_device(rt),
            "loader": self.train_loader.backend,
            "amp": rt.amp,
            "compile": rt.compile,
            "decisions": self.decisions,  # each `auto`: what it chose, why, the figures
            "machine": describe_machine(rt.device),
            "channels_last": rt.channels_last,
            "arch": cfg.arch,
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "world_size": rt.world_size,
            "peak_lr": peak_lr(cfg),
            "recipe": cfg.recipe,
            "git_sha": git_sha(),
            "versions": versions(rt),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def summarize(self) -> RunResult:
        summary = self.summary_record()
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


def write_file(path: Path, writer: Callable, *args) -> None:
    """writer(path, *args); a failed write (a full disk) is one line naming the free space."""
    try:
        writer(path, *args)
    except OSError as e:
        raise disk_error(path, e) from None
