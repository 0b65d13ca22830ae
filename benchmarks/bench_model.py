"""The model group: train steps on a synthetic uint8 batch already on the device, no loader.

Rows, each adding one thing to the one before: ``eager-fp32`` (NCHW, fp32, eager: the reference's
set-up), ``channels-last``, ``amp`` (plus channels-last) and ``compiled`` (the defaults of
`fastalex train` on this device). Every row's model, optimizer, schedule and step are built by
fastalex.train itself (`build_step`), never copied. Also home to `build_step`, `NormalisedInput`
(the reference e2e row's model) and `describe_runtime`, which the e2e group shares.
"""

from __future__ import annotations

import dataclasses

import torch
from bench_data import Data, base_config
from harness import Skip, Subject, plural

EPOCH_IMAGES = 100_000  # Tiny ImageNet's train split: the LR schedule's epoch, the e2e epoch time
NUM_CLASSES = 200  # Tiny ImageNet; the model rows' fc8 width
MODEL_ROWS = {  # name -> TrainConfig fields; each adds one thing to the one before
    "eager-fp32": dict(channels_last="off", amp="off", compile=False),
    "channels-last": dict(channels_last="on", amp="off", compile=False),
    "amp": dict(channels_last="on", amp="auto", compile=False),
    "compiled": dict(
        channels_last="auto", amp="auto", compile=True
    ),  # the defaults: `fastalex train`
}


class NormalisedInput(torch.nn.Module):
    """The reference blog's network from fastalex's AlexNet (a Sequential of its layers): its
    layers run on float input the loader already normalised, without the model's first op
    (normalise_pixels, which reads 0..255 pixels), as the blog's model takes its input."""

    def __init__(self, model: torch.nn.Module) -> None:
        from fastalex.model import AlexNet

        if not isinstance(model, AlexNet):
            raise Skip(f"the reference step needs an AlexNet arch, not {type(model).__name__}")
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.Sequential.forward(self.model, images)  # AlexNet.forward less its first op


def build_step(
    cfg, num_classes: int, steps_per_epoch: int, baseline: bool = False, normalised: bool = False
):
    """fastalex.train's own model, optimizer, schedule and step for `cfg` (never a copy of the
    loop): returns (advance(images, labels), runtime); advance runs one step and steps the LR
    schedule, leaving the results on the device. The step takes uint8 pixels, as fastalex's
    loaders hand them over; with `normalised`, the reference's normalised floats instead
    (NormalisedInput).

    CUDA backend flags are process-wide and the rows of a group interleave, so each advance sets
    its own: a `baseline` row (eager-fp32, the reference stack) runs with TF32 and cuDNN
    autotuning off, as PyTorch's defaults for a plain script, every other row with what
    `fastalex train` sets (runtime.configure_backends)."""
    try:
        from fastalex.runtime import configure_backends, resolve_runtime
        from fastalex.step import build_training, make_train_step
    except ImportError as e:
        raise Skip(f"fastalex.step not available ({e})") from None
    runtime = resolve_runtime(cfg)
    training = build_training(cfg, num_classes, runtime, steps_per_epoch)
    model = NormalisedInput(training.model) if normalised else training.model
    step = make_train_step(model, training.optimizer, training.scaler, cfg, runtime)

    def set_backends() -> None:
        if runtime.device.type != "cuda":
            return
        if baseline:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False
        else:
            configure_backends(runtime)

    def advance(images: torch.Tensor, labels: torch.Tensor) -> None:
        set_backends()
        step(images, labels)
        training.schedule.step()

    return advance, runtime


def describe_runtime(runtime) -> str:
    compiled = "off"
    if runtime.compile:
        compiled = "whole step" if getattr(runtime, "compile_whole_step", False) else "model"
    return (
        f"amp {runtime.amp}, {'channels_last' if runtime.channels_last else 'NCHW'}, "
        f"compile {compiled}"
    )


def forget_compiled() -> None:
    """Drop dynamo's caches, so a compiled row's graphs do not outlive it."""
    torch._dynamo.reset()


def rows(args, size: int, device) -> dict:
    """name -> builder of the row's Subject, in table order."""
    return {name: lambda name=name: model_row(args, name, size, device) for name in MODEL_ROWS}


def skip_emulated_bf16(device) -> None:
    """Skip a bf16 row where the device only emulates bf16 (a CPU without AVX512-BF16 or AMX:
    0.03x fp32 on an AVX2 EPYC, minutes a window), as `--amp auto` never picks it there."""
    from fastalex.runtime import has_native_bf16

    if not has_native_bf16(device):
        raise Skip(
            "this device has no native bf16 (AVX512-BF16/AMX): autocast would only emulate it"
        )


def model_row(args, name: str, size: int, device) -> Subject:
    from fastalex.probes import synthetic_batch

    fields = dict(MODEL_ROWS[name])
    note = ""
    if name == "amp" and device.type == "cpu":
        skip_emulated_bf16(device)
        fields["amp"] = "bf16"
        note = "bf16 autocast on the CPU (amp=auto measures it against fp32 on each machine); "
    if name == "compiled" and args.quick:
        raise Skip("compile skipped in --quick (compiling the step takes 35-60 s on a 2-core CPU)")
    cfg = base_config(args, Data(), size, batch_size=args.model_batch_size, **fields)
    step, runtime = build_step(
        cfg, NUM_CLASSES, EPOCH_IMAGES // cfg.batch_size, baseline=name == "eager-fp32"
    )
    if name == "eager-fp32" and device.type == "cuda":
        note += "TF32 and cuDNN autotuning off (PyTorch's defaults for a plain script); "
    # What a loader hands over, uint8 pixels: the timed step includes the model's normalisation.
    images, labels = synthetic_batch(
        cfg.batch_size,
        size,
        NUM_CLASSES,
        device,
        runtime.memory_format,
        torch.Generator(device).manual_seed(0),
    )

    def advance() -> int:
        step(images, labels)
        return cfg.batch_size

    return Subject(
        advance=advance,
        compiles=cfg.compile,
        close=forget_compiled if cfg.compile else lambda: None,
        info={
            "batch_size": cfg.batch_size,
            "config": dataclasses.asdict(cfg),
            "note": f"{note}{cfg.arch}, >= {plural(args.steps, 'step')} per window; "
            f"{describe_runtime(runtime)}",
        },
    )
