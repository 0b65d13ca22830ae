"""Tests for fastalex.model: shapes, the pixel normalisation of its first op, LRN semantics and
numerics, cost accounting, decay groups."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import invoke
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastalex.config import IMAGE_MEAN, IMAGE_STD
from fastalex.model import (
    ARCHS,
    NATIVE_IMAGE_SIZE_PX,
    LocalResponseNorm,
    build_model,
    describe_model,
    format_model_info,
    named_layers,
    param_groups,
)

# Native sizes plus sizes that do not tile exactly (56: Tiny ImageNet's usual crop).
ARCH_SIZES = [
    ("alexnet", 227),
    ("alexnet", 224),
    ("alexnet64", 64),
    ("alexnet64", 56),
    ("alexnet64", 72),
    ("alexnet-tv", 224),
    ("alexnet-tv", 63),  # its smallest input
]
# torchvision.models.alexnet(num_classes=1000).state_dict(): every key and shape, in order.
TORCHVISION_ALEXNET = {
    "features.0.weight": (64, 3, 11, 11),
    "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5),
    "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3),
    "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3),
    "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3),
    "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216),
    "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096),
    "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}


def pixels(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) uint8 RGB noise: what the loaders hand the model."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def lrn_reference(activations, size, alpha, beta, k):
    """Paper section 3.3 per channel: a_c / (k + alpha * sum of a_j^2 in the window)^beta."""
    channels = activations.shape[1]
    outputs = []
    for c in range(channels):
        window = activations[:, max(0, c - size // 2) : min(channels, c + (size - 1) // 2 + 1)]
        outputs.append(activations[:, c] / (k + alpha * window.pow(2).sum(dim=1)) ** beta)
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize(("arch", "image_size"), ARCH_SIZES)
def test_model_maps_images_to_one_logit_per_class(arch, image_size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, image_size=image_size)
    logits = model(pixels(2, image_size))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("arch", "image_size"), ARCH_SIZES)
def test_described_feature_maps_and_params_match_the_real_model(arch, image_size):
    model = build_model(arch, num_classes=10, image_size=image_size)
    shapes = [("input", (3, image_size, image_size))]
    for name, layer in named_layers(model):
        layer.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.append(
                (name, tuple(out.shape[1:]) + (1,) * (4 - out.ndim))
            )
        )
    with torch.no_grad():
        model(pixels(1, image_size))
    info = describe_model(arch, num_classes=10, image_size=image_size)
    assert info["feature_maps"] == shapes
    assert info["param_count"] == sum(p.numel() for p in model.parameters())


def test_alexnet_tv_state_dict_is_torchvisions_key_for_key():
    with torch.device("meta"):
        model = build_model("alexnet-tv", num_classes=1000, image_size=224)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(shapes.items()) == list(TORCHVISION_ALEXNET.items())
    assert sum(p.numel() for p in model.parameters()) == 61_100_840
    assert describe_model("alexnet-tv", 1000, 224)["param_count"] == 61_100_840
    assert not any(isinstance(m, LocalResponseNorm) for m in model.modules())
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_alexnet_tv_below_63_px_is_refused():
    with pytest.raises(ValueError, match="too small"):
        build_model("alexnet-tv", num_classes=10, image_size=62)


def test_native_sizes_give_paper_and_documented_final_maps():
    maps = {
        arch: dict(describe_model(arch, 200, NATIVE_IMAGE_SIZE_PX[arch])["feature_maps"])
        for arch in ARCHS
    }
    assert maps["alexnet"]["conv1"] == (96, 55, 55)
    assert maps["alexnet"]["pool5"] == (256, 6, 6)
    assert maps["alexnet64"]["conv1"] == (96, 16, 16)
    assert maps["alexnet64"]["pool5"] == (256, 2, 2)


def test_channels_last_input_gives_the_same_logits_as_nchw():
    torch.manual_seed(0)
    model = build_model("alexnet64", num_classes=10, image_size=64).eval()
    images = pixels(2, 64)
    with torch.no_grad():
        nchw = model(images)
        channels_last = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, nchw, rtol=1e-4, atol=1e-5)


def test_initial_loss_is_close_to_log_num_classes():
    # fc8 ~ N(0, 0.01) starts the logits at std ~0.7: a loss ~0.25 above ln(200) on average
    # (uniform pixels normalise to std ~1.1).
    torch.manual_seed(0)
    model = build_model("alexnet64", num_classes=200, image_size=64).eval()
    with torch.no_grad():
        logits = model(pixels(16, 64))
    loss = F.cross_entropy(logits, torch.randint(0, 200, (16,)))
    assert abs(loss.item() - math.log(200)) < 0.5


@pytest.mark.parametrize(("arch", "image_size"), [("alexnet64", 64), ("alexnet-tv", 63)])
def test_the_first_op_normalises_pixels_with_the_given_mean_and_std(arch, image_size):
    """model(uint8 pixels) is the layers on (x / 255 - mean) / std: the same weights with an
    identity normalisation (mean 0, std 1/255) on floats normalised by hand give the same logits;
    the constants are not in the state_dict, so checkpoints from before load unchanged."""
    torch.manual_seed(0)
    model = build_model(arch, 10, image_size).eval()
    identity = build_model(arch, 10, image_size, (0.0, 0.0, 0.0), (1 / 255,) * 3).eval()
    state = model.state_dict()
    assert not any("pixel" in key for key in state)
    identity.load_state_dict(state)  # strict: the keys of a model without normalisation
    images = pixels(3, image_size)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    by_hand = (images.float() / 255 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(model(images), identity(by_hand), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(images), model(images.float()), rtol=0, atol=0)


def test_build_model_rejects_unknown_arch_and_too_small_images():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg16", num_classes=10, image_size=64)
    with pytest.raises(ValueError, match="too small"):
        build_model("alexnet64", num_classes=10, image_size=16)


@pytest.mark.parametrize("size", [5, 4])
def test_lrn_matches_the_paper_formula(size):
    activations = torch.randn(2, 12, 3, 4, dtype=torch.float64).relu() * 20
    expected = lrn_reference(activations, size=size, alpha=1e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(LocalResponseNorm(size=size)(activations), expected)


def test_lrn_gradient_matches_finite_differences():
    activations = (torch.rand(1, 7, 2, 2, dtype=torch.float64) * 40).requires_grad_()
    assert torch.autograd.gradcheck(LocalResponseNorm(), (activations,))


def test_lrn_equals_torch_lrn_with_alpha_multiplied_by_size():
    # torch divides alpha by the window size; the paper does not: alpha 1e-4 here == 5e-4 there.
    activations = torch.randn(2, 16, 5, 5).relu() * 30
    torch_lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(LocalResponseNorm()(activations), torch_lrn(activations))


def test_lrn_keeps_channels_last_layout():
    activations = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    assert LocalResponseNorm()(activations).is_contiguous(memory_format=torch.channels_last)


def test_lrn_under_bf16_autocast_is_finite_for_large_activations():
    activations = torch.full((2, 16, 4, 4), 300.0)
    expected = LocalResponseNorm()(activations)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normalised = LocalResponseNorm()(activations.bfloat16())
    assert normalised.dtype == torch.bfloat16
    assert torch.isfinite(normalised).all()
    torch.testing.assert_close(normalised.float(), expected, rtol=1e-2, atol=1e-2)


def test_lrn_on_fp16_input_does_not_overflow():
    activations = torch.full((2, 16, 4, 4), 300.0)
    assert torch.isinf(activations.half().square()).all()  # 300**2 = 90000 > fp16 max 65504
    expected = LocalResponseNorm()(activations)
    normalised = LocalResponseNorm()(activations.half())
    assert normalised.dtype == torch.float16
    torch.testing.assert_close(normalised.float(), expected, rtol=1e-3, atol=1e-2)


@pytest.mark.slow
def test_lrn_compiles_as_one_graph():
    activations = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    lrn = LocalResponseNorm()
    compiled = torch.compile(lrn, fullgraph=True)  # raises on any graph break
    torch.testing.assert_close(compiled(activations), lrn(activations))


@pytest.mark.parametrize("arch", ARCHS)
def test_described_flops_equal_torch_flop_counter(arch):
    image_size = NATIVE_IMAGE_SIZE_PX[arch]
    with torch.device("meta"):
        model = build_model(arch, num_classes=200, image_size=image_size)
        images = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    assert describe_model(arch, 200, image_size)["forward_flops"] == counter.get_total_flops()


def test_alexnet_flops_match_the_published_two_tower_count():
    # The paper's net is ~0.72 GMAC = ~1.44 GFLOP (1000 classes). Its two towers halve conv2, conv4
    # and conv5 (groups=2); one tower computes those halves too: 2.26 GFLOP at 227 px, 200 classes.
    info = describe_model("alexnet", num_classes=1000, image_size=227)
    layer_flops = info["layer_flops"]
    grouped_flops = layer_flops["conv2"] + layer_flops["conv4"] + layer_flops["conv5"]
    two_tower_flops = info["forward_flops"] - grouped_flops / 2
    assert 1.40e9 < two_tower_flops < 1.48e9
    one_tower_flops = describe_model("alexnet", num_classes=200, image_size=227)["forward_flops"]
    assert 2.2e9 < one_tower_flops < 2.3e9


def test_alexnet64_needs_about_ten_times_fewer_flops_than_alexnet():
    alexnet_flops = describe_model("alexnet", 200, 227)["forward_flops"]
    alexnet64_flops = describe_model("alexnet64", 200, 64)["forward_flops"]
    ratio = alexnet_flops / alexnet64_flops
    print(f"alexnet@227 / alexnet64@64 forward FLOPs = {ratio:.2f}")  # 9.81 at 200 classes
    assert 5 < ratio < 20


def test_format_model_info_lists_every_layer_and_the_totals():
    info = describe_model("alexnet64", 200, 64)
    table = format_model_info(info)
    for name, _shape in info["feature_maps"]:
        assert f"\n{name} " in table
    assert f"{info['param_count']:,}" in table
    assert "0.231 GFLOP" in table


def test_param_groups_exclude_biases_from_weight_decay():
    model = build_model("alexnet64", num_classes=10, image_size=64)
    groups = param_groups(model, weight_decay=5e-4, decay_biases=False)
    decayed = {id(p) for g in groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == name.endswith("weight")
        assert (id(p) in undecayed) == name.endswith("bias")
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def test_param_groups_decay_biases_when_asked():
    model = build_model("alexnet64", num_classes=10, image_size=64)
    groups = param_groups(model, weight_decay=5e-4, decay_biases=True)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_model_info_prints_the_table():
    result = invoke("model-info", "--classes", 200)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("alexnet64: 200 classes, 64x64 px input")
    assert "total" in result.output and "GFLOP" in result.output
