"""The paper's networks (design §2 "Networks") and their full-precision twins (``binary=False``).

Every constructor is ``fn(num_classes=..., binary=True, **layer_options)``; ``layer_options`` go to each
``BinaryConv2d`` / ``BinaryLinear``. ``MODELS`` maps the zoo names to the constructors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_ovsw.models.resnet_cifar import ResNet18Cifar, ResNet20, resnet18_cifar_1w1a, resnet20_1w1a
from lightning_ovsw.models.resnet_imagenet import ResNetImageNet, resnet18_1w1a, resnet34_1w1a
from lightning_ovsw.models.vgg import VGGSmall, vgg_small_1w1a

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20_1w1a": resnet20_1w1a,
    "resnet18_cifar_1w1a": resnet18_cifar_1w1a,
    "vgg_small_1w1a": vgg_small_1w1a,
    "resnet18_1w1a": resnet18_1w1a,
    "resnet34_1w1a": resnet34_1w1a,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the zoo model ``name`` (one of ``MODELS``) with ``kwargs`` (num_classes, binary, options)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    return MODELS[name](**kwargs)


__all__ = [
    "MODELS",
    "ResNet18Cifar",
    "ResNet20",
    "ResNetImageNet",
    "VGGSmall",
    "create_model",
    "resnet18_1w1a",
    "resnet18_cifar_1w1a",
    "resnet20_1w1a",
    "resnet34_1w1a",
    "vgg_small_1w1a",
]
