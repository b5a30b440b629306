"""pack_model and the packed modules against the float binarized model in eval mode (the oracle)."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torchvision
from lightning_ovsw.kernels import reference
from torch import nn

from lightning_ovsw.convert import binarize_model
from lightning_ovsw.layers import BinaryConv2d, BinaryLinear
from lightning_ovsw.models import MODELS
from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear, packed_nbytes
from lightning_ovsw.packing import pack_model
from lightning_ovsw.registry import binary_layers


def binarize(model: nn.Module) -> nn.Module:
    """Binarize every conv but the stem and keep the classifier in full precision."""
    return binarize_model(model)


def with_bn_statistics(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, then eval."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x + 0.3 * torch.randn_like(x))
    return model.eval()


def assert_matches(float_model: nn.Module, packed: nn.Module, x: torch.Tensor, rel: float = 1e-4) -> None:
    """Logits equal up to float-epilogue rounding (relative to their magnitude), and the same argmax."""
    with torch.no_grad():
        want, got = float_model(x), packed(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = rel * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol, (got - want).abs().max()
    if want.ndim == 2:
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_binarized_torchvision_resnet18_matches_float_model():
    model = binarize(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(4, 3, 64, 64)
    model = with_bn_statistics(model, x)
    with torch.no_grad():  # a model whose output depends on its input (no ReLU before a binary conv)
        a, b = model(x[:2]), model(x[2:])
    assert (a - b).abs().max() > 1e-2 * a.abs().max()
    packed = pack_model(model)
    n_binary = len(binary_layers(model))
    assert sum(isinstance(m, PackedConv2d) for m in packed.modules()) == n_binary
    assert not binary_layers(packed)
    # every conv of a torchvision BasicBlock / downsample feeds exactly one BatchNorm2d: all folded, the
    # stem's into the float stem conv (torch's fuse_conv_bn_eval)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in packed.modules())
    assert type(packed.conv1) is nn.Conv2d and packed.conv1.bias is not None
    assert_matches(model, packed, x)
    assert_matches(model, pack_model(model, fold_batchnorm=False), x, rel=1e-5)


class SmallNet(nn.Module):
    """Float stem, binary convs (configurable), a binary linear with bias and BN1d, float classifier."""

    def __init__(self, pad_value: int, stride: int, dilation: int, conv_bias: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 37, 3, padding=1)
        self.conv1 = BinaryConv2d(37, 40, 3, stride=stride, padding=2, dilation=dilation, pad_value=pad_value)
        self.bn1 = nn.BatchNorm2d(40)
        self.conv2 = BinaryConv2d(40, 33, (3, 1), padding=(1, 0), bias=conv_bias, pad_value=pad_value)
        self.bn2 = nn.BatchNorm2d(33, affine=False)
        self.conv3 = BinaryConv2d(33, 70, 1, stride=2, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = BinaryLinear(70 * 4, 65, bias=True)
        self.bn3 = nn.BatchNorm1d(65)
        self.fc2 = nn.Linear(65, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = nn.functional.hardtanh(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = self.pool(self.conv3(x)).flatten(1)
        return self.fc2(self.bn3(self.fc1(x)))


@pytest.mark.parametrize("pad_value", [0, 1])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("fold", [True, False])
def test_small_models_match_float_model(pad_value, stride, dilation, fold):
    x = torch.randn(3, 3, 15, 13)
    model = with_bn_statistics(SmallNet(pad_value, stride, dilation, conv_bias=fold), x)
    packed = pack_model(model, fold_batchnorm=fold)
    for name in ("bn1", "bn2", "bn3"):
        assert isinstance(getattr(packed, name), nn.Identity if fold else nn.BatchNorm1d | nn.BatchNorm2d)
    assert isinstance(packed.conv1, PackedConv2d) and isinstance(packed.fc1, PackedLinear)
    assert packed.conv1.pad_value == pad_value and packed.conv1.dilation == (dilation, dilation)
    assert_matches(model, packed, x, rel=1e-4 if fold else 1e-5)
    assert_matches(model, packed, x.to(memory_format=torch.channels_last), rel=1e-4 if fold else 1e-5)


def test_packed_weights_and_constants_follow_the_layer():
    layer = BinaryConv2d(45, 7, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(7)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    packed = PackedConv2d.from_binary(layer, bn)
    signs = reference.unpack_signs(packed.weight_bits, 45).permute(0, 3, 1, 2)
    assert torch.equal(signs, torch.where(layer.weight < 0, -1.0, 1.0))
    g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    alpha = layer.scale_factor().double()
    torch.testing.assert_close(packed.scale, (alpha * g).float())
    torch.testing.assert_close(packed.bias, ((layer.bias.double() - bn.running_mean) * g + bn.bias).float())
    assert packed.weight_bits.shape == (7, 3, 3, 2) and packed.weight_bits.dtype == torch.int32
    assert packed_nbytes(packed) == 7 * 3 * 3 * 2 * 4 + 2 * 7 * 4
    assert set(packed.state_dict()) == {"weight_bits", "scale", "bias"}


class SharedOutput(nn.Module):
    """The conv output feeds a BN and a residual: folding would change the residual, so it must not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = BinaryConv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_batchnorm_with_other_consumers_is_not_folded():
    x = torch.randn(2, 8, 6, 6)
    model = with_bn_statistics(SharedOutput(), x)
    packed = pack_model(model)
    assert isinstance(packed.bn, nn.BatchNorm2d)
    assert_matches(model, packed, x, rel=1e-5)


class Untraceable(SmallNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


def test_untraceable_model_is_packed_without_folding_and_warns():
    x = torch.randn(2, 3, 9, 9)
    model = with_bn_statistics(Untraceable(0, 1, 1, conv_bias=False), x)
    with pytest.warns(UserWarning, match="not folded"):
        packed = pack_model(model)
    assert isinstance(packed.bn1, nn.BatchNorm2d)
    assert_matches(model, packed, x, rel=1e-5)


def test_inplace_and_copy():
    model = SmallNet(0, 1, 1, conv_bias=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = pack_model(model)
    assert packed is not model and isinstance(model.conv1, BinaryConv2d)
    assert pack_model(model, inplace=True) is model and isinstance(model.conv1, PackedConv2d)
    assert not model.training


def test_single_binary_layer_is_packed():
    layer = BinaryLinear(50, 6)
    x = torch.randn(4, 5, 50)
    assert_matches(layer.eval(), pack_model(layer), x, rel=1e-5)


def test_model_without_binary_layers_is_rejected():
    with pytest.raises(ValueError, match="no binary layer.*binarize"):
        pack_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module"):
        pack_model("resnet18")


def test_packed_modules_reject_bad_input():
    conv = PackedConv2d.from_binary(BinaryConv2d(8, 4, 3))
    with pytest.raises(ValueError, match=r"\[N, 8, H, W\]"):
        conv(torch.randn(1, 7, 5, 5))
    with pytest.raises(TypeError, match="floating-point"):
        conv(torch.ones(1, 8, 5, 5, dtype=torch.int64))
    linear = PackedLinear.from_binary(BinaryLinear(8, 4), nn.BatchNorm1d(4).eval())
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        linear(torch.randn(2, 9))
    with pytest.raises(ValueError, match="2-D"):
        linear(torch.randn(2, 3, 8))


def test_packed_model_is_channels_last_so_nchw_input_reaches_the_packed_convs_as_nhwc():
    x = torch.randn(2, 3, 10, 10)  # NCHW-contiguous, as transforms produce
    model = with_bn_statistics(SmallNet(0, 2, 1, conv_bias=False), x)
    packed = pack_model(model)
    assert packed.conv1.weight_bits.is_contiguous()  # the bits stay K-contiguous
    assert packed.stem.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    packed.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    assert_matches(model, packed, x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # no NCHW -> NHWC copy in the packed op
    with torch.no_grad():
        assert torch.equal(packed(x), packed(x.to(memory_format=torch.channels_last)))


@pytest.mark.parametrize(
    "name,size",
    [("resnet20_1w1a", 32), ("resnet18_cifar_1w1a", 32), ("vgg_small_1w1a", 32), ("resnet18_1w1a", 64)],
)
def test_zoo_models_match_float_model(name, size):
    x = torch.randn(2, 3, size, size)
    model = with_bn_statistics(MODELS[name](), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the zoo traces with torch.fx: BatchNorms are folded
        packed = pack_model(model)
    n_binary = len(binary_layers(model))
    assert n_binary > 0
    assert sum(isinstance(m, (PackedConv2d, PackedLinear)) for m in packed.modules()) == n_binary
    assert_matches(model, packed, x)


def _residual_calls(packed: nn.Module) -> int:
    return sum("residual" in n.kwargs for n in packed.graph.nodes if n.op == "call_module")


def test_residual_adds_are_fused_into_the_packed_convs():
    x = torch.randn(2, 3, 32, 32)
    model = with_bn_statistics(MODELS["resnet18_1w1a"](num_classes=10), x)
    packed = pack_model(model)
    assert isinstance(packed, torch.fx.GraphModule) and _residual_calls(packed) == 16  # every binary conv
    assert not any(n.target in (operator.add, operator.iadd) for n in packed.graph.nodes)
    assert_matches(model, packed, x)
    unfused = pack_model(model, fuse_residual=False, fuse_activation=False)
    assert not isinstance(unfused, torch.fx.GraphModule)
    assert unfused.state_dict().keys() == packed.state_dict().keys()
    tv = with_bn_statistics(binarize(torchvision.models.resnet18(num_classes=10)), x)
    # conv2 absorbs `out += identity` (+ folded bn2), conv1 the add of its real-valued shortcut (layer_shortcuts;
    # not the centered layer1.0.conv1)
    assert _residual_calls(pack_model(tv)) == 15


class BroadcastResidual(nn.Module):
    """``conv(x) + offset`` with a per-channel offset: not the output's shape, so added after the op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = BinaryConv2d(6, 5, 3)
        self.offset = nn.Parameter(torch.randn(5, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.offset


def test_residual_that_broadcasts_is_added_after_the_op():
    model, x = BroadcastResidual().eval(), torch.randn(2, 6, 7, 7)
    packed = pack_model(model)
    assert _residual_calls(packed) == 1
    assert_matches(model, packed, x, rel=1e-5)


def test_string_padding_is_packed_or_refused():
    same = BinaryConv2d(9, 4, 3, padding="same", dilation=2, pad_value=1).eval()
    x = torch.randn(2, 9, 8, 8)
    assert_matches(same, pack_model(same), x, rel=1e-5)
    with pytest.raises(ValueError, match="asymmetric"):
        pack_model(BinaryConv2d(9, 4, 4, padding="same"))


def _act_calls(packed: nn.Module) -> dict[str, int]:
    nodes = [n for n in packed.graph.nodes if n.op == "call_module"]
    return {"act": sum("act" in n.kwargs for n in nodes), "x_bits": sum("x_bits" in n.kwargs for n in nodes)}


def test_hardtanh_and_next_sign_pack_are_fused_into_the_packed_convs():
    """ResNet-18 (paper): each block's two hardtanh run in the convs' epilogues, which also hand the sign
    bits to the next binary conv; the stem's maxpool and hardtanh are one ``ovsw::max_pool2d_act`` whose
    bits the first binary conv reads. Bit-identical to the unfused packed model, and equal to the float
    model up to the epilogue rounding."""
    x = torch.randn(2, 3, 32, 32)
    model = with_bn_statistics(MODELS["resnet18_1w1a"](num_classes=10), x)
    packed = pack_model(model)
    # 16 binary convs fused with their hardtanh; every one reads the bits of the layer before
    assert _act_calls(packed) == {"act": 16, "x_bits": 16}
    pools = [n for n in packed.graph.nodes if n.target is torch.ops.ovsw.max_pool2d_act]
    assert [(n.args[0].target, n.args[1:]) for n in pools] == [("conv1", ([3, 3], [2, 2], [1, 1], [1, 1], False,
                                                                          -1.0, 1.0))]
    assert not any(isinstance(packed.get_submodule(n.target), (nn.MaxPool2d, nn.Hardtanh))
                   for n in packed.graph.nodes if n.op == "call_module")
    unfused = pack_model(model, fuse_activation=False)
    assert _act_calls(unfused) == {"act": 0, "x_bits": 0}
    with torch.no_grad():
        assert torch.equal(packed(x), unfused(x))
        xc = x.to(memory_format=torch.channels_last)
        assert torch.equal(packed(xc), unfused(xc))
    assert_matches(model, packed, x)


class PoolAndClamp(nn.Module):
    """A float stem, then ``maxpool(hardtanh)`` or ``hardtanh(maxpool)`` (ragged: ceil_mode, padding) read
    by a binary conv and a float shortcut, or by a float conv alone (``binary=False``)."""

    def __init__(self, pool_first: bool, binary: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 40, 3)
        self.pool = nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True)
        self.act = nn.Hardtanh(-0.7, 0.9)
        self.pool_first = pool_first
        self.conv = (BinaryConv2d if binary else nn.Conv2d)(40, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.act(self.pool(x)) if self.pool_first else self.pool(self.act(x))
        return self.conv(y) + y[:, :8]


@pytest.mark.parametrize("pool_first", [False, True])
def test_pool_and_hardtanh_before_a_binary_conv_become_one_op(pool_first):
    model, x = PoolAndClamp(pool_first).eval(), torch.randn(2, 3, 12, 11)
    packed = pack_model(model)
    pools = [n for n in packed.graph.nodes if n.target is torch.ops.ovsw.max_pool2d_act]
    assert len(pools) == 1 and _act_calls(packed) == {"act": 0, "x_bits": 1}
    with torch.no_grad():
        assert torch.equal(packed(x), pack_model(model, fuse_activation=False)(x))
    assert_matches(model, packed, x, rel=1e-5)


def test_pool_read_by_no_binary_conv_only_moves_before_the_clamp():
    model = nn.Sequential(PoolAndClamp(pool_first=False, binary=False), nn.Flatten(), BinaryLinear(8 * 6 * 10, 3))
    model, x = model.eval(), torch.randn(2, 3, 12, 11)
    packed = pack_model(model)
    calls = [n.target for n in packed.graph.nodes if n.op in ("call_module", "call_function")]
    assert torch.ops.ovsw.max_pool2d_act not in calls
    assert [t for t in calls if t in ("0.pool", "0.act")] == ["0.pool", "0.act"]
    with torch.no_grad():
        assert torch.equal(packed(x), pack_model(model, fuse_activation=False)(x))
    assert_matches(model, packed, x, rel=1e-5)


class BroadcastThenHardtanh(nn.Module):
    """``hardtanh(conv(x) + offset)`` (a residual the epilogue cannot take) feeding another binary conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = BinaryConv2d(6, 40, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(40, 1, 1))
        self.act = nn.Hardtanh(-0.5, 0.8)
        self.conv2 = BinaryConv2d(40, 5, 3, pad_value=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x) + self.offset)
        return self.conv2(y) + y[:, :5]


def test_fused_activation_with_a_broadcast_residual_falls_back_exactly():
    model, x = BroadcastThenHardtanh().eval(), torch.randn(2, 6, 7, 7)
    packed = pack_model(model)
    assert _act_calls(packed) == {"act": 1, "x_bits": 1}
    with torch.no_grad():
        assert torch.equal(packed(x), pack_model(model, fuse_activation=False)(x))
    assert_matches(model, packed, x, rel=1e-5)


def test_precomputed_bits_must_match_the_input():
    conv = PackedConv2d.from_binary(BinaryConv2d(40, 4, 3))
    x = torch.randn(1, 40, 5, 5)
    y, y_bits = conv(x, x_bits=reference.sign_pack(x.permute(0, 2, 3, 1)), act=(-1.0, 1.0))
    torch.testing.assert_close(y, torch.nn.functional.hardtanh(conv(x)), rtol=0, atol=0)
    assert torch.equal(y_bits, reference.sign_pack(y.permute(0, 2, 3, 1)))
    with pytest.raises(ValueError, match="x_bits must be the packed signs of x"):
        conv(x, x_bits=torch.zeros(1, 5, 5, 1, dtype=torch.int32))
