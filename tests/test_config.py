"""TrainConfig / PackConfig validation: a bad value names the field and the fix."""

from __future__ import annotations

import pytest

from fastalex.config import MIN_IMAGE_SIZE, RECIPES, PackConfig, TrainConfig, recipe_config
from fastalex.model import build_model


@pytest.mark.parametrize("arch", sorted(MIN_IMAGE_SIZE))
def test_smallest_accepted_image_size_builds_a_model(arch):
    size = MIN_IMAGE_SIZE[arch]
    TrainConfig(arch=arch, image_size=size)
    build_model(arch, 10, size)  # the config's bound is one the model really accepts
    with pytest.raises(ValueError, match=f"arch {arch} needs image_size >= {size}"):
        TrainConfig(arch=arch, image_size=size - 1)


def test_bad_values_name_the_field():
    for fields, name in (
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"crop_scale_min": 0.9, "crop_scale_max": 0.5}, "crop_scale_min"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**fields)
    with pytest.raises(ValueError, match="shard_size"):
        PackConfig(shard_size=0)


def test_reference_recipe_is_the_blogs_setup():
    cfg = recipe_config("reference")
    assert (cfg.arch, cfg.image_size, cfg.epochs, cfg.batch_size) == ("alexnet", 227, 30, 128)
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(0.01)  # lr 0.01 at batch 128
    assert (cfg.lr_schedule, cfg.step_epochs, cfg.step_gamma) == ("step", 7, 0.1)
    assert recipe_config("reference", epochs=2).epochs == 2
    assert RECIPES["fast"] == TrainConfig()
