"""Max-pooled inputs thresholded at their channel mean, and residual branches that start as the identity.

References: a float64 ``conv(sign(x - m), sign W) * alpha`` with ``m`` the batch (training) or running
(eval) channel mean; the packed layer against the eval layer; the expected sets of centered layers and
zero-initialised norms on hand-built graphs and torchvision's resnet18.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ovsw import binarize_model, load_packed, save_packed
from lightning_ovsw.export import export_packed, load_exported
from lightning_ovsw.layers import BinaryConv2d, BinaryLinear, standardized_scale
from lightning_ovsw.packed_layers import PackedConv2d
from lightning_ovsw.packing import pack_model


class Pooled(nn.Module):
    """Binary layers reading: a max-pool (a), an average pool of a max-pool (b), a concat holding a
    max-pool (c), an average pool only (d), a flattened adaptive max-pool (head); fc is the float last."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.bn_bcd = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.pool(F.hardtanh(self.bn(self.stem(x))))
        a = F.hardtanh(self.bn_a(self.a(x)))
        b = self.b(F.avg_pool2d(F.max_pool2d(a, 3, 1, 1), 3, 1, 1))
        c = self.c(torch.cat([self.pool(a), F.avg_pool2d(a, 2)], 1))
        d = self.d(F.avg_pool2d(a, 2))
        y = F.hardtanh(self.bn_bcd(torch.cat([F.avg_pool2d(b, 2), c, d], 1)))
        return self.fc(F.hardtanh(self.head(torch.flatten(F.adaptive_max_pool2d(y, 1), 1))))


def test_max_pooled_inputs_found_on_a_hand_built_graph():
    model = binarize_model(Pooled())
    assert sorted(model.binarization_report.centered) == ["a", "b", "c", "head"]
    centered = {n for n, m in model.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear)) and m.input_mean is not None}
    assert centered == {"a", "b", "c", "head"}
    assert "thresholded at their running channel mean" in " ".join(model.binarization_report.notes())
    assert not binarize_model(Pooled(), pooled="keep").binarization_report.centered
    with pytest.raises(ValueError, match="pooled='mean' is not supported"):
        binarize_model(Pooled(), pooled="mean")


def reference_conv(layer: BinaryConv2d, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    x, w = x.double(), layer.weight.detach().double()
    sx = torch.where(x - mean.double().view(1, -1, 1, 1) >= 0, 1.0, -1.0)
    out = F.conv2d(sx, torch.where(w >= 0, 1.0, -1.0), None, layer.stride, layer.padding)
    return out * standardized_scale(w).view(1, -1, 1, 1)


def test_centered_conv_matches_the_float64_formula_in_training_and_eval():
    torch.manual_seed(0)
    layer = BinaryConv2d(6, 5, 3, padding=1)
    layer.center_input()
    x = torch.rand(4, 6, 7, 7) + torch.arange(6).view(1, -1, 1, 1) * 0.3  # all >= 0, per-channel offsets
    batch_mean = x.mean(dim=(0, 2, 3))
    layer.train()
    assert torch.allclose(layer(x).double(), reference_conv(layer, x, batch_mean), atol=1e-4)
    assert torch.allclose(layer.input_mean, 0.1 * batch_mean)  # momentum 0.1 from zeros
    for _ in range(60):
        layer(x)
    assert torch.allclose(layer.input_mean, batch_mean, rtol=1e-2)
    layer.eval()
    x2 = torch.rand(2, 6, 7, 7) + torch.arange(6).view(1, -1, 1, 1) * 0.3
    assert torch.allclose(layer(x2).double(), reference_conv(layer, x2, layer.input_mean), atol=1e-4)
    # the point: sign(x) is +1 everywhere here, sign(x - m) is not
    assert (x2 >= 0).all() and 0.3 < float((x2 - layer.input_mean.view(1, -1, 1, 1) >= 0).float().mean()) < 0.7


def test_centered_linear_and_unbatched_inputs():
    torch.manual_seed(1)
    layer = BinaryLinear(8, 4)
    layer.center_input()
    x = torch.rand(16, 8)
    layer.train()
    layer(x)
    layer.eval()
    mean = layer.input_mean.clone()
    ref = F.linear(torch.where(x - mean >= 0, 1.0, -1.0), torch.where(layer.weight >= 0, 1.0, -1.0))
    ref = ref * standardized_scale(layer.weight) + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    layer.train()  # a lone vector has no batch: the running mean is used and left alone
    assert torch.allclose(layer(x[0]), ref[0], atol=1e-5) and torch.equal(layer.input_mean, mean)


def trained_pooled_model() -> nn.Module:
    torch.manual_seed(2)
    model = binarize_model(Pooled())
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_packed_model_keeps_the_threshold_in_files_and_exports(tmp_path):
    model = trained_pooled_model()
    x = torch.randn(5, 3, 16, 16)
    packed = pack_model(model)
    expected = model(x)
    assert torch.allclose(packed(x), expected, atol=1e-4)
    assert not torch.allclose(model(torch.randn(5, 3, 16, 16)), expected)  # the output depends on the input
    assert packed.a.centered and not packed.d.centered
    save_packed(packed, tmp_path / "m.ovsw")
    loaded = load_packed(tmp_path / "m.ovsw", binarize_model(Pooled()))
    assert torch.equal(loaded.a.input_mean, packed.a.input_mean)
    assert torch.allclose(loaded(x), expected, atol=1e-4)
    export_packed(packed, x, tmp_path / "m.pt2")  # the threshold travels into the exported program
    assert torch.allclose(load_exported(tmp_path / "m.pt2")(x), expected, atol=1e-4)
    uncentered = pack_model(binarize_model(Pooled(), pooled="keep"))
    with pytest.raises(ValueError, match="layer 'a' is .*'centered': True.* in the file"):
        load_packed(tmp_path / "m.ovsw", uncentered)


def test_centered_packed_conv_refuses_x_bits():
    layer = BinaryConv2d(4, 4, 3, padding=1)
    layer.center_input()
    packed = PackedConv2d.from_binary(layer.eval())
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="cannot stand in for x"):
        packed(x, x_bits=torch.ops.ovsw.sign_pack_nchw(x))


class Residual(nn.Module):
    """An identity block (binary branch), a projected block (binary branch, float projection), and a
    block whose branch stays float (filter_fn)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2a, self.bn2a = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.proj, self.bn_proj = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.keep, self.bn_keep = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.hardtanh(self.stem(x))
        x = F.hardtanh(x + self.bn1(self.conv1(x)))
        y = F.hardtanh(self.bn2a(self.conv2a(x)))
        x = F.hardtanh(self.bn2(self.conv2(y)) + self.bn_proj(self.proj(x)))
        x = F.hardtanh(self.bn_keep(self.keep(x)) + x)
        return self.fc(x.mean((2, 3)))


def test_residual_branch_norms_start_at_zero():
    model = binarize_model(Residual(), filter_fn=lambda m, name: name != "keep", shortcuts="binary",
                           layer_shortcuts=False)
    assert model.binarization_report.zero_initialized == ["bn1", "bn2"]
    assert not model.bn1.weight.detach().any() and not model.bn2.weight.detach().any()
    assert torch.equal(model.bn_proj.weight, torch.ones(16)) and torch.equal(model.bn_keep.weight, torch.ones(16))
    assert "initialised to 0" in " ".join(model.binarization_report.notes())
    assert not binarize_model(Residual(), zero_init_residual=False).binarization_report.zero_initialized


def test_trained_norms_are_left_alone():
    float_model = Residual()
    with torch.no_grad():
        float_model.bn1.weight.fill_(0.7)  # a trained value
    model = binarize_model(float_model)
    assert "bn1" not in model.binarization_report.zero_initialized
    assert torch.equal(model.bn1.weight, torch.full((8,), 0.7))


def test_torchvision_resnet18_roles():
    model = binarize_model(torchvision.models.resnet18(num_classes=10))
    report = model.binarization_report
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert report.centered == ["layer1.0.conv1"]  # after the stem's max-pool; layer1.0's shortcut is identity
    # conv1 of each block but the centered one (its input's mean would leak past it); conv2 ends the branch
    assert report.real_shortcuts == [f"{b}.conv1" for b in blocks[1:]]
    assert sorted(report.zero_initialized) == sorted([f"{b}.bn2" for b in blocks] + [f"{b}.bn1" for b in blocks[1:]])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(pack_model(model)(x), model(x), atol=1e-4)


def test_zero_initialised_resnet_learns_where_the_plain_one_diverges():
    """torchvision resnet50, binarized, 16 SGD steps on a learnable task (4 noisy templates): with the
    residual norms at 0 the loss falls below half its start; without, it rises above it (the reason for the
    default). Medians of the last 8 steps (single steps spike)."""

    def losses(zero: bool) -> list[float]:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = binarize_model(torchvision.models.resnet50(num_classes=4), zero_init_residual=zero)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        templates = torch.randn(4, 3, 32, 32, generator=g)
        out = []
        for _ in range(16):
            y = torch.randint(0, 4, (16,), generator=g)
            loss = F.cross_entropy(model(templates[y] + 0.5 * torch.randn(16, 3, 32, 32, generator=g)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    zero, plain = losses(True), losses(False)
    assert torch.tensor(zero[-8:]).median() < 0.5 * zero[0]
    assert torch.tensor(plain[-8:]).median() > plain[0]


def test_a_branch_with_an_identity_shortcut_is_not_a_projection():
    """``x + bn(conv(x))`` (the paper's ResNet-20 blocks): conv is the residual branch and is binarized;
    only the projection on the shortcut of ``bn(conv(y)) + bn(proj(x))`` stays float."""
    model = binarize_model(Residual())
    assert isinstance(model.conv1, BinaryConv2d) and isinstance(model.conv2, BinaryConv2d)
    assert type(model.proj) is nn.Conv2d and "shortcut" in model.binarization_report.kept_float["proj"]
