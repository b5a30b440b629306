"""lightning-ovsw: accurate binary neural networks with OvSW in PyTorch Lightning."""

from lightning_ovsw.layers import BinaryConv2d, BinaryLinear, BinaryOptions
from lightning_ovsw.quantizers import binary_sign

__all__ = ["BinaryConv2d", "BinaryLinear", "BinaryOptions", "binary_sign"]
__version__ = "0.1.0"
