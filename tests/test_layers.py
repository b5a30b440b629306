"""Binary layers against the design §2 formulas, computed independently in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ovsw import BinaryConv2d, BinaryLinear, BinaryOptions, binary_sign


def sign64(x):
    return torch.where(x < 0, -1.0, 1.0).double()


def alpha64(w):
    rows = w.detach().double().flatten(1)
    std = torch.sqrt(rows.var(dim=1, keepdim=True) + 1e-5)
    return ((rows - rows.mean(dim=1, keepdim=True)) / std).abs().mean(dim=1)


def test_sign_of_zero_and_negative_zero_is_plus_one():
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, -2.0])
    assert binary_sign(x).tolist() == [1.0, 1.0, 1.0, -1.0, -1.0]


@pytest.mark.parametrize("pad_value", [0, 1])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
def test_conv_forward_backward_float64(pad_value, stride, padding, dilation):
    layer = BinaryConv2d(5, 7, 3, stride, padding, dilation, bias=True, pad_value=pad_value, dtype=torch.float64)
    x = torch.randn(4, 5, 9, 9, dtype=torch.float64)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 0.0])
    x.requires_grad_(True)
    out = layer(x)
    # reference: standardize per sample (unbiased var + 1e-5), sign, pad with pad_value, conv, * alpha + b
    xd = x.detach()
    std = torch.sqrt(xd.flatten(1).var(dim=1) + 1e-5).view(-1, 1, 1, 1)
    xs = xd / std
    xb = F.pad(sign64(xs), (padding,) * 4, value=float(pad_value))
    ref = F.conv2d(xb, sign64(layer.weight.detach()), None, stride, 0, dilation)
    ref = ref * alpha64(layer.weight).view(1, -1, 1, 1) + layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    # weight gradient: STE, i.e. the gradient w.r.t. sign(W) itself
    wb = sign64(layer.weight.detach()).requires_grad_(True)
    (F.conv2d(xb, wb, None, stride, 0, dilation) * alpha64(layer.weight).view(1, -1, 1, 1) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wb.grad)
    # input gradient: Bi-Real max(0, 2 - 2|x_hat|) times the gradient w.r.t. sign(x_hat), times 1/std
    xb_leaf = sign64(xs).requires_grad_(True)
    padded = F.pad(xb_leaf, (padding,) * 4, value=float(pad_value))
    (F.conv2d(padded, sign64(layer.weight.detach()), None, stride, 0, dilation)
     * alpha64(layer.weight).view(1, -1, 1, 1) * g).sum().backward()
    torch.testing.assert_close(x.grad, xb_leaf.grad * (2 - 2 * xs.abs()).clamp_min(0) / std)


@pytest.mark.parametrize("estimator,derivative", [
    ("approx_sign", lambda x: (2 - 2 * x.abs()).clamp_min(0)),
    ("ste", lambda x: torch.ones_like(x)),
    ("clipped_ste", lambda x: (x.abs() <= 1).double()),
])
def test_linear_activation_estimators_eval_mode(estimator, derivative):
    layer = BinaryLinear(6, 3, activation_estimator=estimator, scale="none", dtype=torch.float64).eval()
    x = (torch.randn(5, 6, dtype=torch.float64) * 1.5).requires_grad_(True)
    out = layer(x)
    torch.testing.assert_close(out, sign64(x.detach()) @ sign64(layer.weight.detach()).T + layer.bias.detach())
    out.sum().backward()
    expected = sign64(layer.weight.detach()).sum(0).expand_as(x) * derivative(x.detach())
    torch.testing.assert_close(x.grad, expected)


def test_clipped_ste_weight_and_learnable_scale():
    float_layer = torch.nn.Linear(4, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        float_layer.weight.copy_(torch.tensor([[0.5, -2.0, 0.1, 1.0], [-0.3, 0.2, 3.0, -0.9]]))
    layer = BinaryLinear.from_float(float_layer, BinaryOptions(weight_estimator="clipped_ste", scale="learnable"))
    torch.testing.assert_close(layer.alpha.detach(), layer.weight.detach().abs().mean(1))
    x = torch.randn(3, 4, dtype=torch.float64)
    layer.eval()(x).sum().backward()
    mask = (layer.weight.detach().abs() <= 1).double()
    expected = layer.alpha.detach().view(-1, 1) * sign64(x).sum(0).view(1, -1) * mask
    torch.testing.assert_close(layer.weight.grad, expected)
    assert layer.alpha.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    layer = BinaryConv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    ref = layer(x)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def test_bad_options_and_unsupported_configs():
    with pytest.raises(ValueError, match="activation_estimator"):
        BinaryConv2d(3, 3, 3, activation_estimator="tanh")
    with pytest.raises(ValueError, match="pad_value"):
        BinaryConv2d(3, 3, 3, pad_value=2)
    with pytest.raises(ValueError, match="groups"):
        BinaryConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        BinaryConv2d.from_float(torch.nn.Conv2d(3, 3, 3, padding_mode="reflect"))


@pytest.mark.parametrize("training", [True, False])
def test_unbatched_conv_input_is_one_sample_of_the_batched_call(training):
    # H == out_channels: the old code scaled along H here without any error
    layer = BinaryConv2d(3, 6, 3, padding=1, bias=True, dtype=torch.float64).train(training)
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    xd = x.detach()
    xs = xd / torch.sqrt(xd.var() + 1e-5) if training else xd  # per-sample std over all of (C, H, W)
    ref = F.conv2d(sign64(xs)[None], sign64(layer.weight.detach()), None, 1, 1)[0]
    ref = ref * alpha64(layer.weight).view(-1, 1, 1) + layer.bias.detach().view(-1, 1, 1)
    assert out.shape == (6, 6, 5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    x_batched = xd[None].clone().requires_grad_(True)
    layer(x_batched).sum().backward()
    torch.testing.assert_close(x.grad, x_batched.grad[0])


def test_packed_conv_unbatched_input():
    from lightning_ovsw.packed_layers import PackedConv2d

    layer = BinaryConv2d(3, 6, 3, padding=1, bias=True).eval()
    packed = PackedConv2d.from_binary(layer)
    x = torch.randn(3, 6, 5)
    with torch.no_grad():
        want = layer(x)
    got = packed(x)
    assert got.shape == want.shape == (6, 6, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: BinaryLinear(1, 4, dtype=torch.float64),
                                  lambda: BinaryConv2d(1, 4, 1, bias=True, dtype=torch.float64)])
def test_one_element_rows_get_alpha_one(make):
    """A one-element row has no variance; alpha is defined as 1 (training, eval and packed alike), and a
    one-element sample is not standardized."""
    from lightning_ovsw.packing import pack_model

    layer = make()
    assert torch.equal(layer.scale_factor(), torch.ones(4, dtype=torch.float64))
    x = torch.randn(5, 1, dtype=torch.float64)
    if isinstance(layer, BinaryConv2d):
        x = x.view(5, 1, 1, 1)
    x.requires_grad_(True)
    out = layer.train()(x)
    w = sign64(layer.weight.detach()).flatten(1)  # [4, 1]
    ref = sign64(x.detach()).flatten(1) @ w.T + layer.bias.detach()  # alpha = 1, no standardization
    torch.testing.assert_close(out.flatten(1), ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    packed = pack_model(layer.float())
    torch.testing.assert_close(packed(x.detach().float()).flatten(1), ref.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [1.0, 0.0, 1.5, True, "1", None, 2])
def test_pad_value_is_the_int_zero_or_one(bad):
    with pytest.raises(ValueError, match="pad_value"):
        BinaryOptions(pad_value=bad)
    with pytest.raises(ValueError, match="pad_value"):
        BinaryLinear(3, 3, pad_value=bad)


def test_options_travel_whole():
    from lightning_ovsw import binarize_model
    from lightning_ovsw.models._common import LayerFactory

    options = BinaryOptions(weight_estimator="clipped_ste", scale="none", pad_value=1)
    assert BinaryLinear.from_float(torch.nn.Linear(3, 2), options).options == options
    assert BinaryConv2d.from_float(torch.nn.Conv2d(3, 2, 3), options).options == options
    model = binarize_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Conv2d(1, 1, 1),
                                               torch.nn.Linear(4, 2)), pad_value=1)
    assert model[1].options.pad_value == 1 and model[1].options == model[2].options
    assert LayerFactory(True, {"pad_value": 1}).linear(3, 2).options.pad_value == 1
