"""One training step and its pieces: the model, SGD and its LR schedule, the (compiled) step
function, and evaluation over a loader. What the trainer, the probes, the tools and the
benchmarks build a step from, without the epoch loop.

Imports torch, the model, metrics and runtime; never a loader, the run folder or argv.
`cfg.batch_size` is the global batch (the LR scales with it). Reasons (speed plan, schedule):
docs/training.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastalex.config import TrainConfig
from fastalex.metrics import all_reduce_sum, count_topk, percent
from fastalex.model import build_model, eval_logits, param_groups
from fastalex.runtime import Runtime, configure_backends

LR_REFERENCE_BATCH = 256  # cfg.lr is per 256 images (Goyal et al. 2017, linear scaling rule)
RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout masks from seed + r * stride
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
