"""Small image classifiers for classic KD demos (Fashion-MNIST, MNIST: 1x28x28 inputs).

* :class:`TeacherCNN` — two 3x3 conv layers (32, 64 channels) with max-pooling, a 256-unit
  hidden layer and dropout: ~825k parameters, ~91% on Fashion-MNIST after 3 epochs.
* :class:`SmallCNN` — the same shape, narrow (8, 16 channels) and a small head: ~10k parameters.
* :class:`MLP` — flatten + fully-connected layers (e.g. 784-64-10: ~51k parameters).

All take ``float32 [B, C, H, W]`` and return logits ``[B, num_classes]``. Build by name with
:func:`build_vision_model` (names in :data:`VISION_MODELS`), which is what recipe configs use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kdforge.errors import ConfigError, ShapeError
from kdforge.registry import Registry

VISION_MODELS: Registry[Callable[..., nn.Module]] = Registry("vision model")


def _check_input(x: torch.Tensor, channels: int, image_size: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ShapeError(
            f"expected images [B, {channels}, {image_size}, {image_size}], got {tuple(x.shape)}",
            "normalise images with kdforge.data.vision.normalize_images (adds the channel axis)",
        )


class ConvNet(nn.Module):
    """Conv(3x3)-ReLU-MaxPool(2) blocks, then flatten, hidden linear layers and a classifier.

    Args:
        channels: output channels of each conv block, e.g. ``(32, 64)``.
        hidden: widths of the fully-connected layers after the convs, e.g. ``(256,)``.
        dropout: dropout before each linear layer (0 disables).
        num_classes, in_channels, image_size: data shape.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden: Sequence[int] = (256,),
        *,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if not channels:
            raise ConfigError("ConvNet needs at least one conv block", "set channels, e.g. [8, 16]")
        self.in_channels, self.image_size = in_channels, image_size
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in, size = c_out, size // 2
        if size < 1:
            raise ConfigError(f"{len(channels)} pooling blocks shrink a {image_size}px image to nothing", "use fewer conv blocks")
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        width = c_in * size * size
        for h in hidden:
            head += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        head += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(width, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, self.image_size)
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, then ``Linear-ReLU`` per hidden width, then a linear classifier.

    Args:
        hidden: hidden widths, e.g. ``(64,)`` gives 784-64-10 on 28x28 greyscale.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (64,),
        *,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, self.image_size)
        return self.net(x)


class TeacherCNN(ConvNet):
    """The demo teacher: channels (32, 64), hidden 256, dropout 0.25 (~825k parameters at 28x28)."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.25) -> None:
        super().__init__(
            (32, 64), (256,), dropout=dropout, num_classes=num_classes, in_channels=in_channels, image_size=image_size
        )


class SmallCNN(ConvNet):
    """A small student: channels (8, 16) by default and a direct linear classifier (~8k params)."""

    def __init__(
        self,
        channels: Sequence[int] = (8, 16),
        hidden: Sequence[int] = (),
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            channels, hidden, dropout=dropout, num_classes=num_classes, in_channels=in_channels, image_size=image_size
        )


VISION_MODELS.register("teacher_cnn", "2-conv CNN (32, 64 channels) + 256 hidden, dropout: ~825k params")(TeacherCNN)
VISION_MODELS.register("small_cnn", "2-conv CNN (8, 16 channels), linear head: ~8k params")(SmallCNN)
VISION_MODELS.register("mlp", "flatten + hidden layers (default 784-64-10): ~51k params")(MLP)
VISION_MODELS.register("convnet", "configurable conv blocks + hidden layers")(ConvNet)


def build_vision_model(name: str, **kwargs) -> nn.Module:
    """Build a registered vision model by name, e.g. ``build_vision_model("mlp", hidden=[64])``.

    Raises:
        ConfigError: unknown name (lists the known ones) or an argument the model does not take.
    """
    factory = VISION_MODELS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"vision model {name!r}: {exc}", "check the model's arguments in kdforge.students.vision") from None
