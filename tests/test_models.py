"""Zoo models: shapes, parameter counts recomputed from the architecture, binary layer placement, twins."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ovsw.layers import BinaryConv2d, BinaryLayer
from lightning_ovsw.models import MODELS, create_model
from lightning_ovsw.models._common import LayerFactory
from lightning_ovsw.models.resnet_cifar import ResNet20Block


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def bn(c: int) -> int:
    return 2 * c


def resnet20_spec(nc: int) -> tuple[int, int, set[str]]:
    """(total params, binary weight params, binary layer names) from the paper's description."""
    total = conv(3, 16, 3) + bn(16) + bn(64) + 64 * nc + nc
    binary, names, cin = 0, set(), 16
    for s, cout in enumerate((16, 32, 64), start=1):
        for b in range(3):
            c1 = conv(cin if b == 0 else cout, cout, 3)
            c2 = conv(cout, cout, 3)
            binary += c1 + c2
            total += c1 + c2 + 2 * bn(cout)
            names |= {f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"}
        cin = cout
    return total, binary, names


def resnet18_cifar_spec(nc: int) -> tuple[int, int, set[str]]:
    total = conv(3, 64, 3) + bn(64) + bn(512) + 512 * nc + nc
    binary, names, cin = 0, set(), 64
    for s, cout in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            convs = {f"layer{s}.{b}.conv1": conv(cin if b == 0 else cout, cout, 3),
                     f"layer{s}.{b}.conv2": conv(cout, cout, 3)}
            total += 2 * bn(cout)
            if b == 0 and cin != cout:
                convs[f"layer{s}.{b}.shortcut.0"] = conv(cin, cout, 1)
                total += bn(cout)
            binary += sum(convs.values())
            total += sum(convs.values())
            names |= set(convs)
        cin = cout
    return total, binary, names


def vgg_small_spec(nc: int) -> tuple[int, int, set[str]]:
    widths = [3, 128, 128, 256, 256, 512, 512]
    total = sum(conv(widths[i], widths[i + 1], 3) + bn(widths[i + 1]) for i in range(6))
    binary = sum(conv(widths[i], widths[i + 1], 3) for i in range(1, 6))
    total += 512 + 512 * 16 * nc + nc  # PReLU per channel + fc
    return total, binary, {f"conv{i}" for i in range(1, 6)}


def resnet_imagenet_spec(blocks: tuple[int, ...], nc: int) -> tuple[int, int, set[str]]:
    total = conv(3, 64, 7) + bn(64) + bn(512) + 512 * nc + nc
    binary, names, cin = 0, set(), 64
    for s, (cout, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        for b in range(n):
            c1, c2 = conv(cin if b == 0 else cout, cout, 3), conv(cout, cout, 3)
            binary += c1 + c2
            total += c1 + c2 + 2 * bn(cout)
            if b == 0 and cin != cout:
                total += conv(cin, cout, 1) + bn(cout)  # full-precision downsample
            names |= {f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"}
        cin = cout
    return total, binary, names


SPECS = {
    "resnet20_1w1a": (resnet20_spec, 32, 10),
    "resnet18_cifar_1w1a": (resnet18_cifar_spec, 32, 10),
    "vgg_small_1w1a": (vgg_small_spec, 32, 10),
    "resnet18_1w1a": (lambda nc: resnet_imagenet_spec((2, 2, 2, 2), nc), 64, 1000),
    "resnet34_1w1a": (lambda nc: resnet_imagenet_spec((3, 4, 6, 3), nc), 64, 1000),
}


def test_every_zoo_model_has_a_spec():
    assert set(MODELS) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("num_classes", [None, 7])
def test_counts_binary_layers_and_shapes(name, num_classes):
    spec, size, default_nc = SPECS[name]
    nc = num_classes or default_nc
    model = create_model(name) if num_classes is None else create_model(name, num_classes=num_classes)
    total, binary, names = spec(nc)
    assert sum(p.numel() for p in model.parameters()) == total
    found = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}
    assert set(found) == names
    assert sum(m.weight.numel() for m in found.values()) == binary
    # first conv and classifier are full precision
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weighted[0].in_channels == 3 and not isinstance(weighted[0], BinaryLayer)
    assert not isinstance(weighted[-1], BinaryLayer)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, nc) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_full_precision_twin_has_identical_shape(name):
    binary, twin = create_model(name), create_model(name, binary=False)
    assert not any(isinstance(m, BinaryLayer) for m in twin.modules())
    sd_b, sd_t = binary.state_dict(), twin.state_dict()
    assert list(sd_b) == list(sd_t)
    assert all(sd_b[k].shape == sd_t[k].shape for k in sd_b)
    twin.load_state_dict(sd_b)
    size = SPECS[name][1]
    twin.train()
    loss = twin(torch.randn(2, 3, size, size)).sum()
    loss.backward()
    assert all(p.grad is not None for p in twin.parameters())


def test_layer_options_reach_every_binary_layer_and_twin_rejects_them():
    model = create_model("resnet18_cifar_1w1a", scale="learnable", pad_value=1)
    layers = [m for m in model.modules() if isinstance(m, BinaryLayer)]
    assert layers and all(m.options.scale == "learnable" and m.alpha is not None for m in layers)
    assert all(m.options.pad_value == 1 for m in layers)
    assert LayerFactory(True, {"scale": "learnable"}).linear(4, 2).options.scale == "learnable"
    with pytest.raises(ValueError, match="binary layers only"):
        create_model("resnet20_1w1a", binary=False, scale="learnable")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50_1w1a")


def test_resnet20_block_follows_the_equations():
    block = ResNet20Block(LayerFactory(True, {}), 16, 32, stride=2).eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, 8, 8)
    shortcut = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 8, 8))  # option A: 16 -> 32 channels
    assert isinstance(block.conv1, BinaryConv2d)
    y = F.hardtanh(block.bn1(block.conv1(x)) + shortcut)
    expected = F.hardtanh(block.bn2(block.conv2(y)) + y)
    torch.testing.assert_close(block(x), expected)
    # the binary conv sees only signs: scaling the input by a positive factor changes nothing inside it
    torch.testing.assert_close(block.conv1(x), block.conv1(3.0 * x))


@pytest.mark.parametrize("name", ["resnet18_1w1a", "resnet34_1w1a"])
def test_imagenet_batchnorm2d_weights_start_at_1e_8(name):
    model = create_model(name, num_classes=5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.all(m.weight == 1e-8) and torch.all(m.bias == 0) for m in bns)
    assert isinstance(model.bn2, nn.BatchNorm1d) and torch.all(model.bn2.weight == 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_binary_convs_start_kaiming_normal_fan_in(name: str) -> None:
    """Appendix C: every binary conv (and its float twin) starts from N(0, 2 / fan_in)."""
    torch.manual_seed(0)
    binary = create_model(name)
    twin = create_model(name, binary=False)
    names = [n for n, m in binary.named_modules() if isinstance(m, BinaryConv2d)]
    assert names
    twin_modules = dict(twin.named_modules())
    for n in names:
        for w in (binary.get_submodule(n).weight, twin_modules[n].weight):
            fan_in = w[0].numel()
            expected = (2.0 / fan_in) ** 0.5
            # the sample std of n normal draws has relative standard error ~ 1 / sqrt(2 n); allow 5 of them
            tol = 5.0 / (2 * w.numel()) ** 0.5
            assert abs(w.std().item() / expected - 1) < tol, (name, n, w.std().item(), expected)
            assert abs(w.mean().item()) < 5 * expected / w.numel() ** 0.5
