"""lightning-ovsw: accurate binary neural networks with OvSW in PyTorch Lightning.

Names that need Lightning (the callbacks, the training module) are imported lazily, so a shipped
packed model runs with torch and ``lightning_ovsw.kernels`` alone.
"""

from importlib import import_module

from lightning_ovsw.layers import BinaryConv2d, BinaryLinear, BinaryOptions
from lightning_ovsw.quantizers import binary_sign

_LAZY = {
    "AGSCallback": "lightning_ovsw.callbacks",
    "SADCallback": "lightning_ovsw.callbacks",
    "FlipMonitor": "lightning_ovsw.callbacks",
    "binarize_model": "lightning_ovsw.convert",
    "binarization_summary": "lightning_ovsw.convert",
    "ConversionReport": "lightning_ovsw.convert",
    "pack_model": "lightning_ovsw.packing",
    "save_packed": "lightning_ovsw.io",
    "load_packed": "lightning_ovsw.io",
    "export_packed": "lightning_ovsw.export",
    "load_exported": "lightning_ovsw.export",
    "PackedConv2d": "lightning_ovsw.packed_layers",
    "PackedLinear": "lightning_ovsw.packed_layers",
    "ClassificationModule": "lightning_ovsw.module",
    "CIFAR10DataModule": "lightning_ovsw.data",
    "ImageFolderDataModule": "lightning_ovsw.data",
    "SyntheticDataModule": "lightning_ovsw.data",
}

__all__ = ["BinaryConv2d", "BinaryLinear", "BinaryOptions", "binary_sign", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_ovsw' has no attribute {name!r}")
