"""The one place that finds layers in a model by role: binary (trained), packed (inference) and
full-precision convs/linears. Callbacks, summary, packing and the packed file all use it."""

from __future__ import annotations

from torch import nn

from lightning_ovsw.layers import BinaryLayer
from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear

FLOAT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def binary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every binary layer, in registration order, each layer once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryLayer)]


def binary_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name of the layer, latent weight)`` of every binary layer."""
    return [(name, m.weight) for name, m in binary_layers(model)]


def packed_layers(model: nn.Module) -> list[tuple[str, PackedConv2d | PackedLinear]]:
    """``(qualified name, layer)`` of every packed inference layer (``pack_model``'s output)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (PackedConv2d, PackedLinear))]


def full_precision_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every conv / linear layer that is not binary (kept in float)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, FLOAT_LAYER_TYPES) and not isinstance(m, BinaryLayer)
    ]
