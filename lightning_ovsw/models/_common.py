"""Layer factories shared by the zoo: binary layers, or plain float layers for the full-precision twin."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ovsw.layers import BinaryConv2d, BinaryLinear


class LayerFactory:
    """Builds the layers the paper binarizes: ``BinaryConv2d`` when ``binary`` else ``nn.Conv2d``.

    The float twin has the same parameter names and shapes, so a state dict moves between the two.
    ``layer_options`` (``activation_estimator``, ``weight_estimator``, ``scale``, ``pad_value``) go to
    every binary layer; they have no meaning for the float twin and are rejected there.
    """

    def __init__(self, binary: bool, layer_options: dict[str, Any]) -> None:
        if not binary and layer_options:
            raise ValueError(
                f"layer options {sorted(layer_options)} apply to binary layers only; drop them for "
                "binary=False (the full-precision twin)."
            )
        self.binary = binary
        self.options = layer_options

    def conv(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False
    ) -> nn.Conv2d:
        if self.binary:
            return BinaryConv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias, **self.options)
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        if self.binary:
            options = {k: v for k, v in self.options.items() if k != "pad_value"}
            return BinaryLinear(in_features, out_features, bias, **options)
        return nn.Linear(in_features, out_features, bias)
