"""AlexNet variants: their layers, initialisation, weight-decay split and cost accounting.

Owns `ARCHS` and `build_model`, the paper's local response normalisation (`LocalResponseNorm`),
the optimizer's parameter groups (`param_groups`) and the numbers behind `fastalex model-info`
(`describe_model`, `format_model_info`). Imports torch, the standard library and config's
normalisation constants only: never data, loader or training code. The model takes RGB pixels,
(N, 3, S, S) uint8 (the loaders' batches; float 0..255 works too) in either memory format, and
returns logits (N, num_classes). Its first op (`normalise_pixels`) is (x / 255 - mean) / std as
one multiply-add, inside the compiled step, where inductor fuses it with the conversion to float;
its constants are non-persistent buffers, so state_dicts (and checkpoints) are as before.

The layers, LRN and initialisation, with their sources: docs/model.md.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastalex.config import IMAGE_MEAN, IMAGE_STD

# Paper section 3.3: "k = 2, n = 5, alpha = 10^-4, and beta = 0.75".
LRN_SIZE = 5
LRN_K = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75
# Paper section 3.4: overlapping pooling, "s = 2 and z = 3".
POOL_KERNEL_PX = 3
POOL_STRIDE_PX = 2
# Paper section 4.2 (dropout probability) and 3.5 (4096 neurons in each hidden fc layer).
DROPOUT_P = 0.5
FC_WIDTH = 4096
# Paper section 5: weights from N(0, 0.01); kept for fc8 only (see module docstring).
FC8_INIT_STD = 0.01


class ConvSpec(NamedTuple):
    out_channels: int
    kernel_px: int
    stride_px: int
    padding_px: int


# Widths, kernels and strides: paper section 3.5. The paper gives no padding; 227 px input with
# padding 2 on conv2 and 1 on conv3-5 is the BVLC Caffe reference (models/bvlc_alexnet), which
# reproduces the paper's 55/27/13 maps.
PAPER_CONVS = (
    ConvSpec(96, 11, 4, 0),
    ConvSpec(256, 5, 1, 2),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(256, 3, 1, 1),
)
ARCH_CONVS: dict[str, tuple[ConvSpec, ...]] = {
    "alexnet": PAPER_CONVS,
    "alexnet64": (ConvSpec(96, 8, 4, 2), *PAPER_CONVS[1:]),  # this project's 64 px stem (docstring)
}
# torchvision.models.alexnet (torchvision/models/alexnet.py): its features' convs, in one tower.
TORCHVISION_CONVS = (
    ConvSpec(64, 11, 4, 2),
    ConvSpec(192, 5, 1, 2),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(256, 3, 1, 1),
    ConvSpec(256, 3, 1, 1),
)
TORCHVISION_POOL_PX = 6  # its AdaptiveAvgPool2d((6, 6))
ARCHS = (*ARCH_CONVS, "alexnet-tv")
# The input size each arch was laid out for (paper 227, Tiny ImageNet's 64, torchvision's 224).
NATIVE_IMAGE_SIZE_PX = {"alexnet": 227, "alexnet64": 64, "alexnet-tv": 224}


class LocalResponseNorm(nn.Module):
    """Cross-channel LRN, paper's alpha convention (module docstring), at least float32 inside.

    Equals nn.LocalResponseNorm(size, alpha=alpha * size, beta, k), window placed as there
    (size // 2 channels before, (size - 1) // 2 after), but written as pad + shifted adds:
    torch.compile fuses it into one kernel, and eager mode keeps the input's memory format end to
    end instead of going through nn.LocalResponseNorm's 5-D avg_pool3d view.
    """

    def __init__(
        self,
        size: int = LRN_SIZE,
        alpha: float = LRN_ALPHA,
        beta: float = LRN_BETA,
        k: float = LRN_K,
    ) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        channels = activations.shape[1]
        # At least float32, even under autocast: squares of activations above 256 overflow fp16.
        compute_dtype = torch.promote_types(activations.dtype, torch.float32)
        activations_wide = activations.to(compute_dtype)  # (N, C, H, W), input's memory format
        squares = activations_wide.square()
        padded = F.pad(squares, (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2))
        window_sums = padded.narrow(1, 0, channels)
        for offset in range(1, self.size):
            window_sums = window_sums + padded.narrow(1, offset, channels)
        scale = (self.k + self.alpha * window_sums).pow(-self.beta)
        return (activations_wide * scale).to(activations.dtype)


class LayerInfo(NamedTuple):
    name: str
    shape: tuple[int, int, int]  # output (C, H, W); fc layers as (features, 1, 1)
    param_count: int
    flops: int  # forward, per image; multiply-add = 2; conv and linear only, biases not counted


def build_features(convs: tuple[ConvSpec, ...]) -> list[tuple[str, nn.Module]]:
    """conv1..pool5 in the paper's order (module docstring), named as in Caffe's AlexNet."""
    layers: list[tuple[str, nn.Module]] = []
    in_channels = 3
    for index, spec in enumerate(convs, start=1):
        layers.append(
            (
                f"conv{index}",
                nn.Conv2d(
                    in_channels, spec.out_channels, spec.kernel_px, spec.stride_px, spec.padding_px
                ),
            )
        )
        layers.append((f"relu{index}", nn.ReLU(inplace=True)))
        if index in (1, 2):
            layers.append((f"norm{index}", LocalResponseNorm()))
        if index in (1, 2, 5):
            pool = nn.MaxPool2d(POOL_KERNEL_PX, POOL_STRIDE_PX, ceil_mode=True)
            layers.append((f"pool{index}", pool))
        in_channels = spec.out_channels
    return layers


def compute_output_px(
    size_px: int, kernel_px: int, stride_px: int, padding_px: int, ceil_mode: bool
) -> int:
    """One spatial side after a conv or pool; the formula of torch's pooling_output_shape."""
    rounding = stride_px - 1 if ceil_mode else 0
    out_px = (size_px + 2 * padding_px - kernel_px + rounding) // stride_px + 1
    # torch drops a last window that would start in the right padding.
    if ceil_mode and (out_px - 1) * stride_px >= size_px + padding_px:
        out_px -= 1
    return out_px


def trace_layers(layers: Iterable[tuple[str, nn.Module]], image_size: int) -> list[LayerInfo]:
    """Shape, parameters and FLOPs of each layer for one (3, image_size, image_size) image.

    Arithmetic only, so it also works for modules on the meta device. Raises ValueError when the
    image is too small for the layers.
    """
    channels, height, width = 3, image_size, image_size
    infos = [LayerInfo("input", (channels, height, width), 0, 0)]
    for name, module in layers:
        flops = 0
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            ceil_mode = getattr(module, "ceil_mode", False)
            sides = zip(
                (height, width),
                *(as_pair(getattr(module, attr)) for attr in ("kernel_size", "stride", "padding")),
            )
            height, width = (compute_output_px(*side, ceil_mode) for side in sides)
            if height < 1 or width < 1:
                raise ValueError(
                    f"image_size {image_size} is too small: {name} output would be "
                    f"{height}x{width}; use a larger image_size"
                )
            if isinstance(module, nn.Conv2d):
                kernel_h, kernel_w = module.kernel_size
                macs_per_output = module.in_channels // module.groups * kernel_h * kernel_w
                channels = module.out_channels
                flops = 2 * channels * height * width * macs_per_output
        elif isinstance(module, nn.Flatten):
            channels, height, width = channels * height * width, 1, 1
        elif isinstance(module, nn.Linear):
            channels = module.out_features
            flops = 2 * module.in_features * module.out_features
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            height, width = as_pair(module.output_size)
        elif not isinstance(module, (nn.ReLU, nn.Dropout, LocalResponseNorm)):
            raise TypeError(f"trace_layers does not know how {type(module).__name__} changes shape")
        param_count = sum(p.numel() for p in module.parameters())
        infos.append(LayerInfo(name, (channels, height, width), param_count, flops))
    return infos


def register_normalisation(
    model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """Give `model` the (1, 3, 1, 1) constants of `normalise_pixels` for per-channel mean/std in
    0..1 units: non-persistent buffers, which follow .to() and stay out of the state_dict."""
    scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    model.register_buffer("pixel_scale", scale, persistent=False)
    model.register_buffer("pixel_shift", shift, persistent=False)
    # Constants, equal on every rank: on DistributedDataParallel's ignore list (the attribute its
    # _set_params_and_buffers_to_ignore_for_model sets) it does not broadcast them every forward.
    model._ddp_params_and_buffers_to_ignore = ("pixel_scale", "pixel_shift")


def normalise_pixels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) pixels 0..255 (uint8 or float) -> float32 (x / 255 - mean) / std, in the
    input's memory format."""
    return images.float() * model.pixel_scale + model.pixel_shift


def as_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


class AlexNet(nn.Sequential):
    """One-tower AlexNet as one flat sequence: conv1 ... pool5, flatten, drop6 ... fc8, after
    `normalise_pixels`."""

    def __init__(
        self,
        convs: tuple[ConvSpec, ...],
        num_classes: int,
        image_size: int,
        mean: tuple[float, ...] = IMAGE_MEAN,
        std: tuple[float, ...] = IMAGE_STD,
    ) -> None:
        features = build_features(convs)
        feature_channels, feature_h, feature_w = trace_layers(features, image_size)[-1].shape
        classifier = [
            ("flatten", nn.Flatten()),  # copies a channels_last map into (C, H, W) order
            ("drop6", nn.Dropout(DROPOUT_P)),
            ("fc6", nn.Linear(feature_channels * feature_h * feature_w, FC_WIDTH)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(DROPOUT_P)),
            ("fc7", nn.Linear(FC_WIDTH, FC_WIDTH)),
            ("relu7", nn.ReLU(inplace=True)),
            ("fc8", nn.Linear(FC_WIDTH, num_classes)),
        ]
        super().__init__(OrderedDict(features + classifier))
        register_normalisation(self, mean, std)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(normalise_pixels(self, images))


class TorchvisionAlexNet(nn.Module):
    """torchvision's alexnet() layout and module names (module docstring)."""

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        mean: tuple[float, ...] = IMAGE_MEAN,
        std: tuple[float, ...] = IMAGE_STD,
    ) -> None:
        super().__init__()
        register_normalisation(self, mean, std)
        layers: list[nn.Module] = []
        in_channels = 3
        for index, spec in enumerate(TORCHVISION_CONVS, start=1):
            layers += [
                nn.Conv2d(
                    in_channels, spec.out_channels, spec.kernel_px, spec.stride_px, spec.padding_px
                ),
                nn.ReLU(inplace=True),
            ]
            if index in (1, 2, 5):
                layers.append(nn.MaxPool2d(POOL_KERNEL_PX, POOL_STRIDE_PX))
            in_channels = spec.out_channels
        self.features = nn.Sequential(*layers)
        trace_layers(self.features.named_children(), image_size)  # ValueError if too small
        self.avgpool = nn.AdaptiveAvgPool2d(TORCHVISION_POOL_PX)
        self.flatten = nn.Flatten()  # no parameters: the state_dict stays torchvision's
        self.classifier = nn.Sequential(
            nn.Dropout(DROPOUT_P),
            nn.Linear(in_channels * TORCHVISION_POOL_PX**2, FC_WIDTH),
            nn.ReLU(inplace=True),
            nn.Dropout(DROPOUT_P),
            nn.Linear(FC_WIDTH, FC_WIDTH),
            nn.ReLU(inplace=True),
            nn.Linear(FC_WIDTH, num_classes),
        )
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(normalise_pixels(self, images))
        return self.classifier(self.flatten(self.avgpool(features)))

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        return [
            *((f"features.{name}", m) for name, m in self.features.named_children()),
            ("avgpool", self.avgpool),
            ("flatten", self.flatten),
            *((f"classifier.{name}", m) for name, m in self.classifier.named_children()),
        ]


def named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer of an arch in forward order, with its state_dict name prefix."""
    if isinstance(model, TorchvisionAlexNet):
        return model.named_layers()
    return list(model.named_children())


def head(model: nn.Module) -> nn.Linear:
    """The last linear layer (fc8 / classifier.6): the one whose width is the class count."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The state_dict keys of `head(model)`."""
    last = head(model)
    return tuple(
        f"{name}.{key}"
        for name, m in model.named_modules()
        if m is last
        for key in ("weight", "bias")
    )


def init_weights(model: nn.Module) -> None:
    """He-normal conv/fc weights, N(0, 0.01) last layer, zero biases (module docstring says why)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    nn.init.normal_(head(model).weight, mean=0.0, std=FC8_INIT_STD)


def build_model(
    arch: str,
    num_classes: int,
    image_size: int,
    mean: tuple[float, ...] = IMAGE_MEAN,
    std: tuple[float, ...] = IMAGE_STD,
) -> nn.Module:
    """A freshly initialised `arch` (one of ARCHS) for (N, 3, image_size, image_size) pixels,
    normalised inside with `mean`/`std` (0..1 units; a checkpoint's card carries them)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch == "alexnet-tv":
        return TorchvisionAlexNet(num_classes, image_size, mean, std)
    return AlexNet(ARCH_CONVS[arch], num_classes, image_size, mean, std)


def describe_model(arch: str, num_classes: int, image_size: int) -> dict:
    """Parameter count, forward FLOPs per image and per-layer output sizes, without any compute.

    FLOPs count each multiply-add of conv and linear layers as 2 and nothing else (bias adds, ReLU,
    LRN, pooling and dropout are together under 1% of the total); torch.utils.flop_counter counts
    the same way. Keys: arch, num_classes, image_size, param_count, forward_flops, feature_maps
    [(layer name, (C, H, W)), ...] starting at "input" (fc layers as (features, 1, 1)),
    layer_param_counts {name: int} and layer_flops {name: int}.
    """
    with torch.device("meta"):  # shapes only: no 59M-parameter allocation or initialisation
        model = build_model(arch, num_classes, image_size)
    infos = trace_layers(named_layers(model), image_size)
    return {
        "arch": arch,
        "num_classes": num_classes,
        "image_size": image_size,
        "param_count": sum(p.numel() for p in model.parameters()),
        "forward_flops": sum(info.flops for info in infos),
        "feature_maps": [(info.name, info.shape) for info in infos],
        "layer_param_counts": {info.name: info.param_count for info in infos},
        "layer_flops": {info.name: info.flops for info in infos},
    }


def format_model_info(info: dict) -> str:
    """describe_model's dict as the table `fastalex model-info` prints."""
    size = info["image_size"]
    lines = [
        f"{info['arch']}: {info['num_classes']} classes, {size}x{size} px input",
        f"{'layer':<13} {'output C x H x W':>18} {'params':>12} {'MFLOPs':>9}",
    ]
    for name, (channels, height, width) in info["feature_maps"]:
        param_count = info["layer_param_counts"][name]
        flops = info["layer_flops"][name]
        lines.append(
            f"{name:<13} {f'{channels} x {height} x {width}':>18} "
            f"{f'{param_count:,}' if param_count else '':>12} "
            f"{f'{flops / 1e6:.1f}' if flops else '':>9}"
        )
    flops = info["forward_flops"]
    lines.append(f"{'total':<13} {'':>18} {info['param_count']:>12,} {flops / 1e6:>9.1f}")
    lines.append(
        f"forward: {flops / 1e9:.3f} GFLOP per image ({flops / 2e9:.3f} GMAC; "
        "multiply-add = 2 FLOPs, conv and linear layers only)"
    )
    return "\n".join(lines)


def eval_logits(model: nn.Module, images: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    """(N, classes) float32 logits of `images` ((N, 3, S, S) pixels); with flip_tta the mean of the
    image's and its left-right mirror's (flipped along the width axis, dim 3). The eval transform
    of train.evaluate, predict and the exported program alike."""
    logits = model(images).float()
    if flip_tta:
        logits = (logits + model(images.flip(3)).float()) / 2
    return logits


def param_groups(model: nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """SGD parameter groups: conv/linear weights decay; biases and other 1-d params only if asked.

    Splits on dimensionality rather than names so it holds for compiled or DDP-wrapped models.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {
            "params": [p for p in trainable if p.ndim <= 1],
            "weight_decay": weight_decay if decay_biases else 0.0,
        },
    ]
    return [group for group in groups if group["params"]]
