"""The paper's VGG-small for CIFAR (design §2): 128-128-256-256-512-512 3x3 convs, first one float."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_ovsw.models._common import LayerFactory

_WIDTHS = (128, 128, 256, 256, 512, 512)
_POOL_AFTER = (1, 3, 5)


class VGGSmall(nn.Module):
    """``conv0`` (float) + BN + hardtanh, then binary ``conv1..conv5``, each followed by a 2x2 max-pool
    (after conv 1, 3, 5), BN and hardtanh, except the last activation, a per-channel PReLU; then a
    full-precision Linear on the flattened 512 x 4 x 4 features."""

    def __init__(self, num_classes: int = 10, binary: bool = True, **layer_options: Any) -> None:
        super().__init__()
        factory = LayerFactory(binary, layer_options)
        self.conv0 = nn.Conv2d(3, _WIDTHS[0], 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(_WIDTHS[0])
        for i in range(1, len(_WIDTHS)):
            setattr(self, f"conv{i}", factory.conv(_WIDTHS[i - 1], _WIDTHS[i], 3, 1, 1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(_WIDTHS[i]))
        self.pool = nn.MaxPool2d(2, 2)
        self.hardtanh = nn.Hardtanh()
        self.prelu = nn.PReLU(_WIDTHS[-1])
        self.fc = nn.Linear(_WIDTHS[-1] * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.hardtanh(self.bn0(self.conv0(x)))
        last = len(_WIDTHS) - 1
        for i in range(1, last + 1):
            x = getattr(self, f"conv{i}")(x)
            if i in _POOL_AFTER:
                x = self.pool(x)
            x = getattr(self, f"bn{i}")(x)
            x = self.prelu(x) if i == last else self.hardtanh(x)
        return self.fc(x.flatten(1))


def vgg_small_1w1a(num_classes: int = 10, binary: bool = True, **layer_options: Any) -> VGGSmall:
    """The paper's VGG-small for 32x32 inputs: 5 binary 3x3 convs; 4,660,618 parameters for 10 classes
    (4,571,136 in binary convs), with the default layer options."""
    return VGGSmall(num_classes, binary, **layer_options)
