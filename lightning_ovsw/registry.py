"""The one place that finds binary weights in a model (callbacks, summary and packing all use it)."""

from __future__ import annotations

from torch import nn

from lightning_ovsw.layers import BinaryLayer


def binary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every binary layer, in registration order, each layer once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryLayer)]


def binary_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name of the layer, latent weight)`` of every binary layer."""
    return [(name, m.weight) for name, m in binary_layers(model)]
