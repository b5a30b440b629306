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
