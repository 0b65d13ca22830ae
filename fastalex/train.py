"""Training: the step, the LR schedule, evaluation, the epoch loop and what ranks agree on;
`train(cfg)` runs it.

Imports torch, the loader contract (`fastalex.loaders`), the model, metrics, runtime and
checkpoint modules; never argv or os.environ (cli.py passes rank and world size in) and never a
loader backend directly.

The pieces the benchmarks reuse, so that they time this code and never a copy of the loop:

- ``resolve_runtime(cfg, rank, world_size, local_rank) -> Runtime`` (runtime.py): device, autocast
  dtype, grad scaler, memory format and compile plan, with impossible combinations refused.
- ``build_training(cfg, num_classes, runtime, steps_per_epoch) -> Training``: the seeded model
  (DDP-wrapped when world_size > 1), SGD, GradScaler and LR schedule.
- ``make_train_step(model, optimizer, scaler, cfg, runtime) -> step``: ``step(images, labels)``
  runs forward, loss, backward and the optimizer step and returns ``(loss_sum, correct)`` as device
  tensors (no host sync), compiled per ``cfg.compile``.
- ``evaluate(model, loader, runtime, flip_tta) -> dict``: count-weighted val loss / top-1 / top-5
  over every val sample, all-reduced under DDP.
- ``train(cfg, ...) -> RunResult`` and ``evaluate_checkpoint(path, shards, ...) -> dict``.

Choices where the issue is silent (so the next reader need not guess):

- Speed plan per device. CUDA: channels_last, bf16 autocast (fp16 + GradScaler on GPUs without
  native bf16), cudnn.benchmark, TF32 matmuls, fused SGD (it takes the loss scale and the inf flag
  on the device: no sync, no unscale), `torch.compile(model)`. CPU: NCHW, fused SGD when eager (~9 %
  of a step faster than foreach), and when compiled the whole step in one function (see
  ``CPU_COMPILE_OPTIONS``) unless a GradScaler (fp16) is in it, which dynamo does not trace. Under
  DDP the model alone is compiled (DDP's gradient hooks run in the backward).
- The LR schedule is a pure function of (config, global step): `lr_factor`. A resumed run rebuilds
  it at the saved step; its hyper-parameters come from the command line like any run's, the
  checkpoint restores state (weights, momentum buffers, step, grad scaler, RNG). Peak LR = cfg.lr *
  global batch / 256. Warm-up rises linearly to the peak over warmup_epochs, then the LR decays
  linearly to zero at the last step of cfg.epochs.
- train_loss is the optimised objective (label smoothing included); val_loss is plain
  cross-entropy, on the TTA-averaged logits when flip_tta. Epochs in files and messages count
  from 1.
- Every decision that ranks must take together — stop after a signal, stop on a non-finite loss —
  is one value computed by `agree` (a MIN all-reduce), at every log point (every LOG_EVERY_STEPS
  steps and the epoch's last step) and after every epoch's eval and checkpoint. A signal that
  reaches one rank only (or arrives during eval or a checkpoint write) therefore stops every rank
  at the same step. A single process also stops at once after a signal.
- Checkpoints (checkpoint.py) are written at each epoch end and when a run stops early
  (max_steps, SIGINT/SIGTERM), recording the step within the epoch and the epoch's train totals
  summed over the ranks; `--resume` re-reads that epoch's first batches to continue exactly where
  it stopped. metrics.jsonl is rewritten from the checkpoint on resume, so it never holds a row the
  weights have not seen. A max_steps stop inside an epoch still evaluates and logs that partial
  epoch. A fresh run refuses an --out that already holds one.
- Exact resume: the only consumer of torch's global RNG is the step (dropout); loader iteration
  and eval run with the host RNG forked (`next_batch`), so their draws cannot shift the dropout
  stream of a resumed process.
- Loader wait (metrics.LoaderWait): per epoch, how long the device had nothing to do because the
  next batch was not ready, in seconds and % of the epoch's train time, over the same steps as
  images/s (the warm-up steps, which hold compilation and the loader's start-up, are left out),
  in the log line, metrics.jsonl and summary.json; an epoch over LOADER_BOUND_PCT says so once,
  with remedies.
- Eval uses the un-compiled model (a second and third compile, for eval mode and the short last
  val batch, would cost more than eager eval saves).
- Timing: the first WARMUP_STEPS steps a process runs are left out of images/s; compile_s is their
  time beyond that of as many steady steps. Every rank seeds the same weights, then its own
  dropout masks (seed + rank * RANK_SEED_STRIDE).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastalex.checkpoint import (
    CHECKPOINT_FORMAT,
    PartialEpoch,
    capture_rng,
    check_checkpoint,
    load_checkpoint,
    normalisation,
    restore_rng,
    restore_training,
    save_checkpoint,
)
from fastalex.config import TrainConfig
from fastalex.errors import UserError
from fastalex.loaders import Placement, build_loader
from fastalex.metrics import (
    LoaderWait,
    StepWindow,
    TrainTotals,
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
    describe_device,
    describe_machine,
    git_sha,
    resolve_runtime,
    synchronize,
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
# On the CPU torch.compile covers the whole step: forward, backward (AOT autograd; dynamo breaks
# the graph at .backward()) and SGD (inductor fuses the foreach update into one loop per tensor),
# with inductor's layout optimisation off: on, it makes every conv channels-last, whose oneDNN
# backward is slower here (as channels_last is in eager). The step timings that decided it are in
# benchmarks/results (model group); the LRN written as rsqrt(b) * sqrt(rsqrt(b)) is what made
# the compiled step pay.
CPU_COMPILE_OPTIONS = {"layout_optimization": False}


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """cfg.lr scaled from 256 images to the global batch (reference: 0.02 * 128 / 256 = 0.01)."""
    return cfg.lr * cfg.batch_size * world_size / LR_REFERENCE_BATCH


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
    lr = peak_lr(cfg, runtime.world_size)
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

    images: (N, 3, S, S) float32 in runtime.memory_format; labels: (N,) int64. loss_sum is the
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


def agree(runtime: Runtime, stop: bool, bad_step: int | None = None) -> tuple[bool, int | None]:
    """What every rank decides at a log point or an epoch end, from each rank's own view:
    stop if ANY rank was signalled, and the EARLIEST non-finite step any rank saw (None: none).

    One MIN all-reduce under DDP (a collective: every rank must call it at the same point); the
    values as given in a single process. Every stop decision of the loop goes through here.
    """
    if runtime.world_size == 1:
        return stop, bad_step
    flags = torch.tensor(
        [math.inf if bad_step is None else bad_step, 0.0 if stop else 1.0],
        dtype=torch.float64,
        device=runtime.device,
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    bad, keep_going = flags.tolist()
    return keep_going == 0.0, None if math.isinf(bad) else int(bad)


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


def next_batch(batches):
    """The next Batch, with the host RNG fenced off: whatever a loader draws from torch's global
    generator (torch's DataLoader seeds its first iterator from it) never shifts the dropout
    stream, so a resumed run draws the masks an uninterrupted one draws."""
    with torch.random.fork_rng(devices=[]):
        return next(batches)


def train(
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    local_world_size: int = 1,
) -> RunResult:
    """Train per `cfg`; under torchrun each process passes its rank (cli.py reads the env).

    Rank 0 writes RUN/config.json, metrics.jsonl, summary.json and checkpoints/ and calls `log`
    with one line per epoch. Raises UserError for bad input and for a diverged loss (naming the
    epoch and step; the last good checkpoint is kept). Returns status "interrupted" after a
    SIGINT/SIGTERM, once the step in flight is done and a checkpoint is saved.
    """
    if cfg.resume and not cfg.out:
        raise UserError("--resume needs --out RUN: the run directory to continue")
    runtime = resolve_runtime(cfg, rank, world_size, local_rank, local_world_size)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:  # MASTER_ADDR/PORT come from torchrun, read by torch itself
        dist.init_process_group(
            "nccl" if runtime.device.type == "cuda" else "gloo", rank=rank, world_size=world_size
        )
    try:
        return _Run(
            cfg, runtime, log if rank == 0 and log else (lambda line: None), progress and rank == 0
        ).run()
    finally:
        if joined:
            dist.destroy_process_group()


@dataclass
class EpochOutcome:
    """One pass of train_epoch: this rank's new totals, what a resumed epoch carried in (global),
    and the pass's timings (carried ones included)."""

    totals: TrainTotals  # this process's steps of this pass; totals.steps counts carried ones too
    carried: PartialEpoch  # global sums of the steps taken before a resume (zeros otherwise)
    complete: bool
    interrupted: bool
    train_s: float
    timed_s: float
    timed_samples: int
    loader_wait_s: float  # this rank's own wait in this pass (the carried part is in `carried`)

    def global_sums(self, runtime: Runtime) -> PartialEpoch:
        """The epoch so far summed over the ranks (a collective), carried part added once; the
        loader wait is the ranks' mean."""
        local = torch.tensor(
            [self.totals.loss_sum, self.totals.correct, self.totals.samples, self.loader_wait_s],
            dtype=torch.float64,
            device=runtime.device,
        )
        loss_sum, correct, samples, wait_s = all_reduce_sum(local).tolist()
        world_size = runtime.world_size
        return PartialEpoch(
            loss_sum=self.carried.loss_sum + loss_sum,
            correct=self.carried.correct + correct,
            samples=self.carried.samples + int(samples),
            steps=self.totals.steps,
            train_s=self.train_s,
            timed_s=self.timed_s,
            timed_samples=self.timed_samples,
            loader_wait_s=self.carried.loader_wait_s + wait_s / world_size,
        )


class _Run:
    """One process's share of a run: loaders, state, the epoch loop and the files (rank 0)."""

    def __init__(
        self, cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None], progress: bool
    ) -> None:
        self.cfg, self.runtime, self.log, self.progress = cfg, runtime, log, progress
        self.main = runtime.rank == 0
        self.global_step = 0
        self.history: list[dict] = []
        self.best_top1 = -math.inf
        self.compile_s: float | None = None
        self.warmup_s: float | None = None
        self.first_epoch_here = True  # this process's first epoch holds the warm-up steps
        self.pending_rng: list[dict] | None = None
        self.saved_epochs: int | None = None  # epochs in the last checkpoint written or read
        self.warned_loader_bound = False
        self.board = None  # --tensorboard: tensorboard_log.Board on rank 0

    def run(self) -> RunResult:
        cfg, rt = self.cfg, self.runtime
        manifest = read_manifest(Path(cfg.shards))
        if cfg.out:
            run_dir = Path(cfg.out)
        else:  # only rank 0 writes; resume (the only reader elsewhere) requires --out
            run_dir = default_run_dir()
            cfg = self.cfg = dataclasses.replace(cfg, out=str(run_dir))
        self.run_dir, self.last_path = run_dir, run_dir / "checkpoints" / "last.pt"
        state = None
        if cfg.resume:
            state = load_checkpoint(self.last_path)
            check_checkpoint(state, self.last_path, cfg.arch, cfg.image_size, manifest, cfg.shards)
            if state["epoch"] >= cfg.epochs:
                raise UserError(
                    f"{run_dir} has finished {state['epoch']} of {cfg.epochs} epochs; "
                    "raise --epochs to train longer"
                )
        elif (run_dir / "metrics.jsonl").exists() or self.last_path.exists():
            raise UserError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
        # Every `auto` (amp, compile, loader) settled once, before the loaders (runtime.py).
        cfg, rt, self.decisions = decide(cfg, rt, manifest, self.log)
        self.cfg, self.runtime = cfg, rt
        first_epoch = state["epoch"] if state else 0
        placement = Placement(rt.device, rt.rank, rt.world_size, rt.local_world_size)
        self.train_loader = build_loader(cfg, "train", placement, first_epoch)
        try:
            self.val_loader = build_loader(cfg, "val", placement, first_epoch)
            try:
                return self.loop(manifest, state)
            finally:
                self.val_loader.close()
        finally:
            self.train_loader.close()
            if self.board is not None:  # --tensorboard
                self.board.close()

    def loop(self, manifest: Manifest, state: dict | None) -> RunResult:
        cfg, rt = self.cfg, self.runtime
        steps_per_epoch = len(self.train_loader)
        epoch, skip = (state["epoch"], state["step_in_epoch"]) if state else (0, 0)
        if state and state["global_step"] != epoch * steps_per_epoch + skip:
            raise UserError(
                f"{self.last_path} was written at {state['global_step']} steps "
                f"(epoch {epoch}, step {skip}), which does not match "
                f"{steps_per_epoch} steps per epoch: resume with the batch size and "
                "number of processes it was trained with"
            )
        self.global_step = epoch * steps_per_epoch + skip
        self.training = build_training(
            cfg, manifest.num_classes, rt, steps_per_epoch, self.global_step
        )
        self.classes = [list(c) for c in manifest.classes]
        self.data = {  # what the run trained on, for summary.json and RESULTS.md
            "source": manifest.source.get("path"),
            "classes": manifest.num_classes,
            "train_images": manifest.splits["train"].samples,
            "val_images": manifest.splits["val"].samples,
            "synthetic": all(words.startswith("synthetic") for _, words in manifest.classes),
        }
        carried = PartialEpoch()
        if state:
            t = self.training
            note = restore_training(t.module, t.optimizer, t.scaler, state)
            if note:
                self.log(note)
            self.pending_rng = state["rng"]
            self.history, self.best_top1 = list(state["history"]), state["best_top1"]
            self.compile_s, self.saved_epochs = state["compile_s"], state["epoch"]
            carried = PartialEpoch.from_state(state["partial"])
        if cfg.init_from and not state:  # --init-from: weights before step 0 (weights.py)
            self.log(load_initial_weights(self.training.module, cfg.init_from))
        self.step = make_train_step(
            self.training.model, self.training.optimizer, self.training.scaler, cfg, rt
        )
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", {**asdict(cfg), "decisions": self.decisions})
            write_jsonl(self.run_dir / "metrics.jsonl", self.history)
            if cfg.tensorboard:  # --tensorboard (tensorboard_log.py)
                self.board = Board(self.run_dir)
        self.log(
            f"{'resuming' if state else 'training'} {self.run_dir}: {cfg.arch} at "
            f"{cfg.image_size} px, {manifest.num_classes} classes, "
            f"{self.train_loader.samples * rt.world_size} train / "
            f"{manifest.splits['val'].samples} val images; "
            f"{steps_per_epoch} steps per epoch of {cfg.batch_size} x {rt.world_size}; "
            f"{describe_device(rt)}, amp {rt.amp}, compile {'on' if rt.compile else 'off'}; "
            f"loader {self.train_loader.summary}"
        )
        with StopSignals() as self.signals:
            while epoch < cfg.epochs and not (cfg.max_steps and self.global_step >= cfg.max_steps):
                outcome = self.train_epoch(epoch, skip, carried)
                if outcome.interrupted:
                    return self.interrupted(epoch, outcome)
                self.finish_epoch(epoch, outcome)
                if outcome.complete:
                    epoch, skip, carried = epoch + 1, 0, PartialEpoch()
                stop, _ = agree(rt, self.signals.received is not None)
                if stop and epoch < cfg.epochs:
                    return self.interrupted(epoch, None)
        return self.summarize()

    def train_epoch(self, epoch: int, skip: int, carried: PartialEpoch) -> EpochOutcome:
        """Steps of one epoch (from `skip`, after the `carried` part of a resumed one)."""
        cfg, rt, device = self.cfg, self.runtime, self.runtime.device
        steps_per_epoch = len(self.train_loader)
        totals = TrainTotals(steps=carried.steps)
        planned = steps_per_epoch - skip
        if cfg.max_steps:
            planned = min(planned, cfg.max_steps - self.global_step)
        warm = min(WARMUP_STEPS, planned) if self.first_epoch_here else 0
        self.first_epoch_here = False
        batches = iter(self.train_loader)  # a generator: nothing runs until next_batch
        for _ in range(skip):  # a run stopped mid-epoch: the batches it had already taken
            next_batch(batches)
        if self.pending_rng is not None:  # where the interrupted run stood before this step
            restore_rng(self.pending_rng, device, rt.rank, rt.world_size)
            self.pending_rng = None
        self.training.model.train()
        wait = LoaderWait(device)
        with tqdm(
            total=steps_per_epoch,
            initial=skip,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            window = StepWindow(LOG_EVERY_STEPS, device)
            self.epoch_start_step = self.global_step - skip
            synchronize(device)
            started = self.mark = time.perf_counter()
            warm_end, done, stop = started, 0, False
            for done in range(1, planned + 1):
                with wait:
                    images, labels = next_batch(batches)  # (N, 3, S, S) float32, (N,) int64
                loss_sum, correct = self.step(
                    images.contiguous(memory_format=rt.memory_format), labels
                )
                self.training.schedule.step()
                window.add(loss_sum, correct)
                self.global_step += 1
                bar.update()
                if done == warm:  # compile, first allocations and worker start-up end here
                    synchronize(device)
                    warm_end = time.perf_counter()
                    self.warmup_s = warm_end - started
                    wait = LoaderWait(device)  # the wait of the timed steps, as images/s
                signalled = self.signals.received is not None and rt.world_size == 1
                if window.full or done == planned or signalled:
                    stop = self.flush(window, totals, epoch, bar)
                    if stop:
                        break
            synchronize(device)
            ended = time.perf_counter()
        timed_steps = max(0, done - warm)
        if warm and self.warmup_s is not None and self.compile_s is None:
            steady_step_s = (ended - warm_end) / timed_steps if timed_steps else 0.0
            self.compile_s = max(0.0, self.warmup_s - warm * steady_step_s) if rt.compile else 0.0
        complete = skip + done == steps_per_epoch and totals.steps == steps_per_epoch
        return EpochOutcome(
            totals=totals,
            carried=carried,
            complete=complete,
            interrupted=stop and not complete,
            train_s=carried.train_s + ended - started,
            timed_s=carried.timed_s + (ended - warm_end if timed_steps else 0.0),
            timed_samples=carried.timed_samples + timed_steps * cfg.batch_size,
            loader_wait_s=wait.seconds(),
        )

    def flush(self, window: StepWindow, totals: TrainTotals, epoch: int, bar: tqdm) -> bool:
        """A log point: read the window (sync), check the losses, agree on stopping (DDP)."""
        rows = window.drain()
        totals.absorb(rows, self.cfg.batch_size)
        stop, bad = agree(self.runtime, self.signals.received is not None, totals.first_bad_step)
        if bad is not None:
            raise self.diverged(
                epoch,
                f"step {bad + 1} of {len(self.train_loader)} "
                f"(global step {self.epoch_start_step + bad + 1})",
            )
        now = time.perf_counter()
        if rows:
            images = len(rows) * self.cfg.batch_size * self.runtime.world_size
            loss = sum(row[0] for row in rows) / (len(rows) * self.cfg.batch_size)
            if self.board is not None:  # --tensorboard
                lr = self.training.schedule.get_last_lr()[0]
                self.board.interval(self.global_step, loss, images / max(now - self.mark, 1e-9), lr)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                img_s=f"{images / max(now - self.mark, 1e-9):.0f}",
                refresh=False,
            )
        self.mark = now
        return stop

    def diverged(self, epoch: int, where: str) -> UserError:
        if self.saved_epochs is not None:
            kept = (
                f"the last good checkpoint, {self.last_path} (epoch {self.saved_epochs}), is kept"
            )
        else:
            kept = "no checkpoint had been written yet"
        return UserError(
            f"training diverged: the loss is not finite (nan/inf) at epoch "
            f"{epoch + 1}, {where}; stopped, {kept}. Lower --lr (now {self.cfg.lr}) "
            "or lengthen --warmup-epochs"
        )

    def finish_epoch(self, epoch: int, outcome: EpochOutcome) -> None:
        """Eval, the metrics row, the checkpoint: after an epoch, or a partial one (max_steps)."""
        cfg, rt = self.cfg, self.runtime
        sums = outcome.global_sums(rt)
        rng_mid_epoch = None if outcome.complete else capture_rng(rt.device, rt.world_size)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # eval draws nothing from the training stream
            val = evaluate(self.training.module, self.val_loader, rt, cfg.flip_tta)
        eval_s = time.perf_counter() - started
        if not math.isfinite(val["loss"]):
            raise self.diverged(epoch, "in its last steps (val loss not finite)")
        row = {
            "epoch": epoch + 1,
            "steps": sums.steps,
            "lr": peak_lr(cfg, rt.world_size)
            * lr_factor(cfg, len(self.train_loader), self.global_step - 1),
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
            "images_per_s": (
                sums.timed_samples * rt.world_size / sums.timed_s if sums.timed_samples else None
            ),
            "loader_wait_s": sums.loader_wait_s,
            "loader_wait_pct": percent(sums.loader_wait_s, sums.timed_s),
        }
        self.history.append(row)
        improved = row["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, row["val_top1"])
        if self.main:
            append_jsonl(self.run_dir / "metrics.jsonl", row)
        if self.board is not None:  # --tensorboard
            self.board.epoch(row)
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
            self.save(
                epoch + 1, 0, None, capture_rng(rt.device, rt.world_size), self.history, improved
            )
        else:  # stopped by max_steps mid-epoch: --resume continues inside the epoch, whose
            # partial row a resumed run does not keep
            self.save(epoch, sums.steps, sums, rng_mid_epoch, self.history[:-1], improved)

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
        step_in_epoch: int,
        partial: PartialEpoch | None,
        rng: list[dict],
        history: list[dict],
        best: bool = False,
    ) -> None:
        """Write checkpoints/last.pt (rank 0), and best.pt as its copy when val top-1 improved.
        `epoch`/`step_in_epoch` say where a resumed run starts; `partial` holds the global totals
        of a part-done epoch; `rng` is every rank's state; `history` the rows the weights have
        seen as complete epochs (a resumed run rewrites metrics.jsonl from it)."""
        self.saved_epochs = epoch
        if not self.main:
            return
        t = self.training
        save_checkpoint(
            self.last_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": asdict(self.cfg),
                "classes": self.classes,
                "normalisation": normalisation(),
                "model": t.module.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "scaler": t.scaler.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "partial": None if partial is None else partial.state(),
                "rng": rng,
                "history": history,
                "best_top1": self.best_top1,
                "compile_s": self.compile_s,
                "metrics": self.history[-1] if self.history else None,
            },
        )
        if best:
            tmp = self.last_path.with_name("best.pt.tmp")
            shutil.copyfile(self.last_path, tmp)
            os.replace(tmp, self.last_path.with_name("best.pt"))

    def interrupted(self, epoch: int, outcome: EpochOutcome | None) -> RunResult:
        """After SIGINT/SIGTERM (agreed by every rank): save where the run stands (mid-epoch when
        `outcome`)."""
        rt = self.runtime
        if outcome is not None:
            sums = outcome.global_sums(rt)
            self.save(epoch, sums.steps, sums, capture_rng(rt.device, rt.world_size), self.history)
            where = f"epoch {epoch + 1}, step {sums.steps}"
        else:
            where = f"the end of epoch {epoch}"
        if rt.world_size > 1:  # no rank exits (and has torchrun stop the others) before rank 0
            dist.barrier()  # has written the checkpoint
        received = self.signals.received
        name = signal.Signals(received).name if received else "a signal to another process"
        message = (
            f"{name}: stopped at {where}; saved {self.last_path}. Continue with the same "
            f"command plus --resume --out {self.run_dir}"
        )
        self.log(message)
        return RunResult(self.run_dir if self.main else None, "interrupted", message=message)

    def summarize(self) -> RunResult:
        cfg, rt = self.cfg, self.runtime
        last = self.history[-1] if self.history else {}
        rates = [r["images_per_s"] for r in self.history[1:] if r["images_per_s"]]
        rates = rates or [r["images_per_s"] for r in self.history[:1] if r["images_per_s"]]
        waited_s = sum(r.get("loader_wait_s", 0.0) for r in self.history)
        summary = {
            "top1": last.get("val_top1"),
            "top5": last.get("val_top5"),
            "best_top1": self.best_top1 if self.history else None,
            "epochs": len(self.history),
            "steps": self.global_step,
            "epoch_s": [r["epoch_s"] for r in self.history],
            "images_per_s": median(rates) if rates else None,
            "loader_wait_s": waited_s,
            "loader_wait_pct": percent(waited_s, sum(r.get("timed_s", 0.0) for r in self.history)),
            "compile_s": self.compile_s,
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
            "peak_lr": peak_lr(cfg, rt.world_size),
            "recipe": cfg.recipe,
            "git_sha": git_sha(),
            "versions": versions(rt),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self.main:
            write_json(self.run_dir / "summary.json", summary)
        if self.history:
            self.log(
                f"done: val top-1 {summary['top1']:.2f} %, top-5 {summary['top5']:.2f} % "
                f"(best top-1 {summary['best_top1']:.2f} %) after {summary['epochs']} "
                f"epochs; {summary['images_per_s'] or 0:.0f} img/s, compile "
                f"{summary['compile_s'] or 0:.1f} s; {self.run_dir}"
            )
        return RunResult(self.run_dir if self.main else None, "done", summary)


def evaluate_checkpoint(
    path: Path, shards: str, device: str = "auto", loader: str = "auto", loader_workers: int = 0
) -> dict:
    """Val top-1/top-5 of a checkpoint, with the eval transform and TTA setting it trained with.

    Returns {"top1", "top5", "loss", "samples", "epoch", "arch"}.
    """
    state = load_checkpoint(Path(path))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in state["config"].items() if k in known}
    cfg = TrainConfig(
        **{
            **saved,
            "shards": str(shards),
            "device": device,
            "loader": loader,
            "loader_workers": loader_workers,
            "compile": False,
            "resume": False,
        }
    )
    runtime = resolve_runtime(cfg)
    manifest = read_manifest(Path(shards))
    check_checkpoint(state, Path(path), cfg.arch, cfg.image_size, manifest, str(shards))
    configure_backends(runtime)
    model = build_model(cfg.arch, manifest.num_classes, cfg.image_size)
    model.load_state_dict(state["model"])
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    val_loader = build_loader(cfg, "val", Placement(runtime.device))
    try:
        result = evaluate(model, val_loader, runtime, cfg.flip_tta)
    finally:
        val_loader.close()
    return {**result, "epoch": state["epoch"], "arch": cfg.arch}
