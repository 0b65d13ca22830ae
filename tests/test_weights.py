"""--init-from: a state_dict in torchvision's alexnet layout (or a fastalex checkpoint) loads, a
different class count re-initialises the head, anything else is a one-line error."""

from __future__ import annotations

import pytest
import torch
from helpers import train_cli

from fastalex.errors import UserError
from fastalex.model import build_model
from fastalex.weights import load_initial_weights

# torchvision.models.alexnet().state_dict()'s keys and shapes, written out (torchvision does not
# import beside the CPU torch here): (out, in, kh, kw) convs, (out, in) linears.
TORCHVISION_SHAPES = {
    "features.0": (64, 3, 11, 11),
    "features.3": (192, 64, 5, 5),
    "features.6": (384, 192, 3, 3),
    "features.8": (256, 384, 3, 3),
    "features.10": (256, 256, 3, 3),
    "classifier.1": (4096, 9216),
    "classifier.4": (4096, 4096),
    "classifier.6": (1000, 4096),
}


def torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in TORCHVISION_SHAPES.items():
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * 0.01
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator) * 0.01
    return state


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision_state_dict(), path)
    return path


def test_torchvision_weights_load_unchanged_at_1000_classes(torchvision_file):
    model = build_model("alexnet-tv", 1000, 224)
    note = load_initial_weights(model, torchvision_file)
    expected = torchvision_state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert "re-initialised" not in note


def test_another_class_count_reinitialises_only_the_head(torchvision_file):
    model = build_model("alexnet-tv", 200, 64)
    fresh_head = model.classifier[6].weight.clone()
    note = load_initial_weights(model, torchvision_file)
    expected = torchvision_state_dict()
    assert torch.equal(model.features[0].weight, expected["features.0.weight"])
    assert torch.equal(model.classifier[4].weight, expected["classifier.4.weight"])
    assert torch.equal(model.classifier[6].weight, fresh_head)
    assert "classifier.6.weight, classifier.6.bias re-initialised: 1000 classes there, 200" in note


def test_any_other_mismatch_is_one_line_naming_keys_and_shapes(torchvision_file, tmp_path):
    with pytest.raises(UserError) as caught:
        load_initial_weights(build_model("alexnet", 1000, 227), torchvision_file)
    message = str(caught.value)
    assert "\n" not in message and "missing conv1.weight (96, 3, 11, 11)" in message
    state = torchvision_state_dict()
    state["features.3.weight"] = state["features.3.weight"][:, :32]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(UserError, match=r"features.3.weight \(192, 32, 5, 5\) in the file"):
        load_initial_weights(build_model("alexnet-tv", 1000, 224), tmp_path / "cut.pth")


@pytest.mark.slow  # trains or starts processes
def test_cli_fine_tunes_from_torchvision_weights_and_records_the_file(
    torchvision_file, hue_pack, tmp_path
):
    out = tmp_path / "run"
    args = ["--no-compile", "--arch", "alexnet-tv", "--image-size", 63, "--max-steps", 1]
    result = train_cli(hue_pack, out, *args, "--lr", 1e-9, "--init-from", torchvision_file)
    assert "re-initialised: 1000 classes there, 4 here" in result.output
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["init_from"] == str(torchvision_file)
    expected = torchvision_state_dict()
    assert torch.allclose(saved["model"]["features.10.weight"], expected["features.10.weight"])
    assert saved["model"]["classifier.6.weight"].shape == (4, 4096)
