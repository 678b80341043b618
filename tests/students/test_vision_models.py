"""The small vision models: shapes, parameter counts, registry names, clear errors."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.students.vision import VISION_MODELS, build_vision_model


@pytest.mark.parametrize("name", ["teacher_cnn", "small_cnn", "mlp", "convnet"])
def test_every_registered_model_maps_images_to_class_logits(name):
    model = build_vision_model(name)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_parameter_counts_match_the_documented_sizes():
    def n(m):
        return sum(p.numel() for p in m.parameters())

    # teacher: conv 1->32 (320) + 32->64 (18,496) + fc 3136->256 (803,072) + 256->10 (2,570)
    assert n(build_vision_model("teacher_cnn")) == 824_458
    # mlp 784-64-10: 50,240 + 650
    assert n(build_vision_model("mlp", hidden=[64])) == 50_890
    # small cnn (8, 16): 80 + 1,168 + 784->10 (7,850)
    assert n(build_vision_model("small_cnn")) == 9_098


def test_wrong_input_shape_is_a_shape_error_with_fix():
    with pytest.raises(ShapeError, match="normalize_images"):
        build_vision_model("mlp")(torch.randn(3, 28, 28))


def test_unknown_model_or_argument_is_a_config_error():
    with pytest.raises(ConfigError, match="small_cnn"):
        build_vision_model("small_cn")
    with pytest.raises(ConfigError, match="hidden_size"):
        build_vision_model("mlp", hidden_size=3)
    assert "mlp" in VISION_MODELS
