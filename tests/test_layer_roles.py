"""Binary layers that no normalization follows: found on hand-built graphs, given ``alpha = mean|W|``.

Reference for the scale: a float64 computation of ``op(sign x, sign W) * mean|W[i]|``; and the point of
it, that such a layer keeps the float layer's output magnitude where the standardized ``alpha`` makes it
grow with ``sqrt(fan_in)``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ovsw import binarize_model
from lightning_ovsw.layers import BinaryConv2d, BinaryLinear, BinaryOptions
from lightning_ovsw.packing import pack_model


def scales(model: nn.Module) -> dict[str, str]:
    return {n: m.options.scale for n, m in model.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear))}


class Mixed(nn.Module):
    """conv->BN (normalized); conv->pool->cat->BN (normalized through pass-through ops); conv->ReLU->...
    (not); a linear head without normalization; a last float classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.bn_bc = nn.BatchNorm2d(8)
        self.d = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        x = torch.tanh(self.bn_a(self.a(x)))
        x = torch.tanh(self.bn_bc(torch.cat([F.max_pool2d(self.b(x), 1), self.c(x).view(x.shape[0], 4, 8, 8)], 1)))
        x = torch.tanh(self.d(x)).mean((2, 3))
        return self.fc(torch.tanh(self.head(x)))


def test_unnormalized_layers_found_on_a_hand_built_graph():
    model = binarize_model(Mixed())
    assert scales(model) == {"a": "standardized", "b": "standardized", "c": "standardized", "d": "mean",
                             "head": "mean"}
    assert model.binarization_report.rescaled == {"d": "mean", "head": "mean"}
    assert "no normalization after these binary layers" in " ".join(model.binarization_report.notes())


@pytest.mark.parametrize("policy", ["learnable", "float", "keep"])
def test_unnormalized_policies(policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float": kept-in-full-precision warning
        model = binarize_model(Mixed(), unnormalized=policy)
    got = scales(model)
    if policy == "float":
        assert got == dict.fromkeys("abc", "standardized")
        assert set(model.binarization_report.kept_float) == {"d", "head"}
    elif policy == "keep":
        assert got == dict.fromkeys(["a", "b", "c", "d", "head"], "standardized")
    else:
        assert got["d"] == got["head"] == "learnable" and model.d.alpha is not None
    with pytest.raises(ValueError, match="unnormalized='mean!' is not supported"):
        binarize_model(Mixed(), unnormalized="mean!")


def test_explicit_scale_options_are_not_overridden():
    assert set(scales(binarize_model(Mixed(), scale="none")).values()) == {"none"}


def test_mean_scale_float64_formula():
    layer = BinaryLinear(9, 5, scale="mean", dtype=torch.float64).eval()
    x = torch.randn(4, 9, dtype=torch.float64)
    sign = lambda t: torch.where(t >= 0, 1.0, -1.0).to(t.dtype)  # noqa: E731
    want = (sign(x) @ sign(layer.weight).T) * layer.weight.abs().mean(1) + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=0)
    conv = BinaryConv2d(3, 4, 3, padding=1, scale="mean", dtype=torch.float64).eval()
    xc = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    alpha = conv.weight.abs().flatten(1).mean(1).view(1, -1, 1, 1)
    torch.testing.assert_close(conv(xc), F.conv2d(sign(xc), sign(conv.weight), padding=1) * alpha, rtol=1e-12, atol=0)
    packed = pack_model(conv)
    torch.testing.assert_close(packed(xc.float()).double(), conv(xc), rtol=1e-5, atol=1e-6)


def test_mean_scale_keeps_the_float_magnitude():
    """A 4096-wide linear layer without normalization: the mean scale's output has the float layer's
    magnitude (within 2x); the standardized scale's is ~sqrt(fan_in) larger."""
    torch.manual_seed(0)
    fc = nn.Linear(4096, 256)
    x = torch.randn(64, 4096)
    float_std = fc(x).std()
    with torch.no_grad():
        mean_std = BinaryLinear.from_float(fc, BinaryOptions(scale="mean")).eval()(x).std()
        standardized_std = BinaryLinear.from_float(fc).eval()(x).std()
    assert 0.5 < mean_std / float_std < 2, (mean_std, float_std)
    assert standardized_std / float_std > 20


@pytest.mark.slow
def test_vgg_classifier_gets_the_mean_scale_and_sane_logits():
    """torchvision's VGG: the features' binary convs feed BatchNorms, the two 4096-wide classifier layers
    feed nothing that normalizes; with the mean scale the initial cross-entropy is near ln(10), not ~35."""
    torch.manual_seed(0)
    model = binarize_model(torchvision.models.vgg11_bn(num_classes=10))
    assert model.binarization_report.rescaled == {"classifier.0": "mean", "classifier.3": "mean"}
    assert all(s == "standardized" for n, s in scales(model).items() if n.startswith("features"))
    with torch.no_grad():
        loss = F.cross_entropy(model.train()(torch.randn(8, 3, 32, 32)), torch.arange(8))
    assert loss < 4, loss


@pytest.mark.parametrize(("arch", "want"), [
    ("resnet18", {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}),
    ("resnet50", {f"layer{i}.0.downsample.0" for i in (1, 2, 3, 4)}),
    ("regnet_y_400mf", {f"trunk_output.block{i}.block{i}-0.proj.0" for i in (1, 2, 3, 4)}),
])
def test_shortcut_projections_stay_float(arch, want):
    """Exactly the 1x1 convs of residual shortcuts stay float (not the bottleneck's conv3, which also ends
    at the add, nor the first conv of either branch's split)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = binarize_model(getattr(torchvision.models, arch)(num_classes=10))
        binary = binarize_model(getattr(torchvision.models, arch)(num_classes=10), shortcuts="binary")
    shortcut = {n for n, r in model.binarization_report.kept_float.items() if "shortcut" in r}
    assert shortcut == want
    assert want <= set(binary.binarization_report.binarized)
    assert set(model.binarization_report.binarized) == set(binary.binarization_report.binarized) - want
    with pytest.raises(ValueError, match="shortcuts='half' is not supported"):
        binarize_model(torchvision.models.resnet18(), shortcuts="half")
