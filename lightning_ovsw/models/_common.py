"""Layer factories shared by the zoo: binary layers, or plain float layers for the full-precision twin."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ovsw.layers import BinaryConv2d, BinaryLinear


def kaiming_fan_in_(conv: nn.Conv2d) -> nn.Conv2d:
    """Draw ``conv.weight`` from N(0, 2 / fan_in), the paper's and the authors' initialisation.

    PyTorch's default (``kaiming_uniform_`` with ``a=sqrt(5)``, std ``1 / sqrt(3 fan_in)``) is sqrt(6) =
    2.45x smaller, which shifts the |G|/|W| ratios AGS compares with delta and the weight SAD decays.
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    return conv


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
        """A binary conv (or its float twin), initialised as the paper's appendix C: ``kaiming_normal``."""
        if self.binary:
            conv = BinaryConv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias, **self.options)
        else:
            conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias)
        return kaiming_fan_in_(conv)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        if self.binary:
            return BinaryLinear(in_features, out_features, bias, **self.options)
        return nn.Linear(in_features, out_features, bias)
