"""Model registry: built-in ``cnn``, ``mlp`` and ``linear``, and a way to add your own.

A factory takes the dataset's input shape (``(C, H, W)`` or ``(F,)``) and its number of
classes and returns an ``nn.Module``. Built-in conv models use GroupNorm, not BatchNorm,
so that they work with Opacus' per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model_factory(name: str, factory: ModelFactory) -> None:
    """Make ``factory`` available as ``--model name`` (replacing any model of that name)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a model name must be a non-empty string")
    if not callable(factory):
        raise ValueError(f"model factory for {name!r} is not callable")
    _MODELS[name] = factory


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator form of ``register_model_factory``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        register_model_factory(name, factory)
        return factory

    return deco


def available_models() -> list[str]:
    """Names of every registered model."""
    return sorted(_MODELS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate a registered model for a dataset's shape and classes."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(available_models())}")
    return _MODELS[name](tuple(input_shape), num_classes)


@register_model("linear")
def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers (128, 64) with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (GroupNorm, ReLU), adaptive pooling to 4x4, a small head.

    Works for any image size from 8x8 (digits) to 32x32 (CIFAR-10).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width // 2, 3, padding=1), nn.GroupNorm(4, width // 2), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (logits) for a batch of images ``N x C x H x W``."""
        return self.head(self.features(x))


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``SmallCNN`` for image data."""
    if len(input_shape) != 3:
        raise ValueError(f"model cnn needs image input (C, H, W), got shape {input_shape};"
                         " use mlp or linear for tabular data")
    return SmallCNN(input_shape[0], num_classes)
