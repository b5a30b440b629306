"""The paper's CIFAR ResNets: ResNet-20 (per-conv real-valued shortcuts) and ResNet-18 (design §2).

First conv and classifier stay in full precision; every other conv is binary (1-bit weights and
activations) unless ``binary=False``, which gives the full-precision twin of identical shape.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ovsw.models._common import LayerFactory


class OptionAShortcut(nn.Module):
    """Parameter-free downsampling shortcut: 2x2 average pool, then zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, *self.pad))


class ResNet20Block(nn.Module):
    """``y = hardtanh(bn1(conv1(x)) + shortcut(x)); out = hardtanh(bn2(conv2(y)) + y)``."""

    def __init__(self, factory: LayerFactory, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = factory.conv(in_ch, out_ch, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = factory.conv(out_ch, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        downsample = stride != 1 or in_ch != out_ch
        self.shortcut = OptionAShortcut(in_ch, out_ch) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.hardtanh(self.bn1(self.conv1(x)) + self.shortcut(x))
        return F.hardtanh(self.bn2(self.conv2(y)) + y)


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 inputs: stem conv+BN+hardtanh, 3 stages x 3 blocks (16-32-64), BN1d, Linear."""

    def __init__(self, num_classes: int = 10, binary: bool = True, **layer_options: Any) -> None:
        super().__init__()
        factory = LayerFactory(binary, layer_options)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_ch = [], 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [ResNet20Block(factory, in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                      for i in range(3)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = stages
        self.bn2 = nn.BatchNorm1d(64)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.hardtanh(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(self.bn2(x))


class ResNet18CifarBlock(nn.Module):
    """``y = hardtanh(bn1(conv1(x))); out = hardtanh(bn2(conv2(y)) + shortcut(x))``.

    The downsampling shortcut is a binary 1x1 conv + BN (identity otherwise).
    """

    def __init__(self, factory: LayerFactory, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = factory.conv(in_ch, out_ch, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = factory.conv(out_ch, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(factory.conv(in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.hardtanh(self.bn1(self.conv1(x)))
        return F.hardtanh(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs: stride-1 3x3 stem conv + BN (no activation), 4 stages x 2 blocks
    (64-128-256-512), adaptive average pool, BN, full-precision 1x1-conv classifier with bias."""

    def __init__(self, num_classes: int = 10, binary: bool = True, **layer_options: Any) -> None:
        super().__init__()
        factory = LayerFactory(binary, layer_options)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_ch = [], 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            first = ResNet18CifarBlock(factory, in_ch, out_ch, stride)
            stages.append(nn.Sequential(first, ResNet18CifarBlock(factory, out_ch, out_ch, 1)))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512)
        self.classifier = nn.Conv2d(512, num_classes, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(F.adaptive_avg_pool2d(x, 1))
        return self.classifier(x).flatten(1)


def resnet20_1w1a(num_classes: int = 10, binary: bool = True, **layer_options: Any) -> ResNet20:
    """The paper's CIFAR ResNet-20: 18 binary 3x3 convs; 269,850 parameters for 10 classes
    (267,264 of them in binary convs), with the default layer options."""
    return ResNet20(num_classes, binary, **layer_options)


def resnet18_cifar_1w1a(num_classes: int = 10, binary: bool = True, **layer_options: Any) -> ResNet18Cifar:
    """The paper's CIFAR ResNet-18: 16 binary 3x3 convs + 3 binary 1x1 downsample convs;
    11,174,986 parameters for 10 classes (11,157,504 in binary convs), default layer options."""
    return ResNet18Cifar(num_classes, binary, **layer_options)
