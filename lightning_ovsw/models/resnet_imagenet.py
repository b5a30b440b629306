"""The paper's ImageNet ResNet-18/34 (design §2): per-conv real-valued shortcuts and hardtanh.

Float 7x7 stride-2 stem + 3x3 max-pool; every 3x3 conv in the stages is binary; the downsampling
shortcut is a 2x2 average pool and a full-precision 1x1 conv + BN; BatchNorm1d before the float
Linear. Every BatchNorm2d starts with weight 1e-8 and bias 0 (as in the authors' code), so each block
starts close to its shortcut.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_ovsw.models._common import LayerFactory

BN_WEIGHT_INIT = 1e-8


class ImageNetBlock(nn.Module):
    """``y = hardtanh(bn1(conv1(x)) + downsample(x)); out = hardtanh(bn2(conv2(y)) + y)``."""

    def __init__(self, factory: LayerFactory, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = factory.conv(in_ch, out_ch, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = factory.conv(out_ch, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.hardtanh = nn.Hardtanh()
        if stride != 1 or in_ch != out_ch:
            pool = nn.AvgPool2d(2, stride) if stride != 1 else nn.Identity()
            conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
            self.downsample = nn.Sequential(pool, conv, nn.BatchNorm2d(out_ch))
        else:
            self.downsample = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.hardtanh(self.bn1(self.conv1(x)) + self.downsample(x))
        return self.hardtanh(self.bn2(self.conv2(y)) + y)


class ResNetImageNet(nn.Module):
    """Binary ResNet for 224x224 inputs (any size >= 32 works: global average pool before the head)."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int = 1000,
        binary: bool = True,
        **layer_options: Any,
    ) -> None:
        super().__init__()
        factory = LayerFactory(binary, layer_options)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.hardtanh = nn.Hardtanh()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_ch = [], 64
        for out_ch, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks, strict=True):
            stage = [ImageNetBlock(factory, in_ch, out_ch, stride)]
            stage += [ImageNetBlock(factory, out_ch, out_ch, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm1d(512)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, BN_WEIGHT_INIT)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.hardtanh(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.bn2(self.avgpool(x).flatten(1)))


def resnet18_1w1a(num_classes: int = 1000, binary: bool = True, **layer_options: Any) -> ResNetImageNet:
    """The paper's ImageNet ResNet-18: 16 binary 3x3 convs; 11,690,536 parameters for 1000 classes
    (10,985,472 in binary convs), with the default layer options."""
    return ResNetImageNet((2, 2, 2, 2), num_classes, binary, **layer_options)


def resnet34_1w1a(num_classes: int = 1000, binary: bool = True, **layer_options: Any) -> ResNetImageNet:
    """The paper's ImageNet ResNet-34: 32 binary 3x3 convs; 21,798,696 parameters for 1000 classes
    (21,086,208 in binary convs), with the default layer options."""
    return ResNetImageNet((3, 4, 6, 3), num_classes, binary, **layer_options)
