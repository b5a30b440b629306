"""Fused training ops (``kernels/train_ops.py``, Triton) against float64 formulas and the plain PyTorch path.

Without CUDA the Triton kernels run on CPU tensors in the interpreter (conftest sets TRITON_INTERPRET=1),
so shapes stay small; ragged sizes (not multiples of any block) on purpose.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import requires_cuda
from lightning_ovsw.kernels import train_ops

from lightning_ovsw import BinaryConv2d, BinaryLinear

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DERIVATIVES = {
    "approx_sign": lambda z: (2 - 2 * z.abs()).clamp_min(0),
    "ste": torch.ones_like,
    "clipped_ste": lambda z: (z.abs() <= 1).double(),
}


def sign64(x):
    return torch.where(x < 0, -1.0, 1.0).double()


def inv_std64(x):
    return 1 / torch.sqrt(x.double().flatten(1).var(dim=1) + 1e-5)


def with_specials(x):
    """``x`` with 0.0, -0.0, +-tiny (subnormal in float16) and +-inf in its first sample."""
    flat = x.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, 1e-6, -1e-6, float("inf"), float("-inf")]).to(x.dtype)
    return x


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 4097), (5, 3, 1, 1), (2, 3, 4100)])
def test_inv_std_matches_float64_var(shape, dtype):
    x = (torch.randn(shape) * 3 + 1.5).to(dtype)
    sign, inv_std = train_ops.binarize_act(x, True, 0, torch.float32)
    torch.testing.assert_close(inv_std.double(), inv_std64(x), rtol=1e-5, atol=0)
    assert torch.equal(sign.double(), sign64(x))
    assert train_ops.binarize_act(x, False, 0, torch.float32)[1].numel() == 0


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_binarize_act_forward_is_exact(dtype, out_dtype):
    x = with_specials(torch.randn(3, 5, 7, 9).to(dtype))
    out = train_ops.binarize_act(x, False, 0, out_dtype)[0]
    assert out.dtype == out_dtype
    assert torch.equal(out.double(), sign64(x))
    assert out.view(-1)[:6].tolist() == [1, 1, 1, -1, 1, -1]


def test_binarize_act_and_weight_keep_channels_last():
    x = torch.randn(2, 6, 5, 3).to(memory_format=torch.channels_last)
    out = train_ops.binarize_act(x, True, 0, torch.float16)[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.double(), sign64(x))
    sign, alpha = train_ops.binarize_weight(x, 1, torch.float16, False)
    assert sign.is_contiguous(memory_format=torch.channels_last) and torch.equal(sign.double(), sign64(x))
    torch.testing.assert_close(alpha, train_ops.binarize_weight(x.contiguous(), 1, torch.float16, False)[1])


def test_conv_layer_channels_last(monkeypatch):
    layer = BinaryConv2d(6, 4, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last)
    _assert_paths_agree(layer, x, monkeypatch)


@pytest.mark.parametrize("estimator", list(DERIVATIVES))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("standardize", [True, False])
def test_binarize_act_gradient(estimator, dtype, standardize):
    """``dL/dx = g * f'(x / std) / std`` (design §2; std detached), in ``x``'s dtype."""
    x = (torch.randn(4, 3, 5, 7) * 0.7).to(dtype).requires_grad_(True)
    out, inv_std = train_ops.binarize_act(x, standardize, train_ops.ACTIVATION_CODES[estimator], torch.float16)
    g = torch.randn(out.shape, dtype=torch.float16)
    out.backward(g)
    assert x.grad.dtype == dtype
    s = (inv_std64(x.detach()) if standardize else torch.ones(4, dtype=torch.float64)).view(-1, 1, 1, 1)
    expected = g.double() * DERIVATIVES[estimator](x.detach().double() * s) * s
    torch.testing.assert_close(x.grad.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (3, 1030), (3, 2), (4, 3, 1, 1)])
def test_binarize_weight_sign_and_alpha(shape, dtype):
    w = with_specials(torch.randn(shape) * 0.1)
    w.view(-1)[4:6] = 0.5  # no infinities in weights: alpha would be NaN
    w = w.to(dtype)
    rows = w.double().flatten(1)
    ref = ((rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, keepdim=True) + 1e-5)).abs().mean(1)
    for out_dtype in FLOATS:
        sign, alpha = train_ops.binarize_weight(w, 1, out_dtype, False)
        assert sign.dtype == out_dtype and torch.equal(sign.double(), sign64(w))
        torch.testing.assert_close(alpha.double(), ref, rtol=1e-6, atol=0)
        scaled, alpha2 = train_ops.binarize_weight(w, 1, out_dtype, True)
        assert torch.equal(alpha2, alpha)
        assert torch.equal(scaled < 0, w < 0)
        expected = sign64(w) * alpha.double().view(-1, *[1] * (w.dim() - 1))  # rounded once to out_dtype
        torch.testing.assert_close(scaled.double(), expected, rtol=torch.finfo(out_dtype).eps, atol=0)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("estimator", ["ste", "clipped_ste"])
def test_binarize_weight_gradient(estimator, scaled):
    """Straight through ``sign`` (``clipped_ste``: masked by ``|W| <= 1``), times the detached ``alpha``."""
    w = (torch.randn(6, 4, 3, 3) * 1.5).requires_grad_(True)
    out, alpha = train_ops.fused_binary_weight(w, estimator, torch.float16, scaled)
    assert not alpha.requires_grad
    g = torch.randn(out.shape).to(torch.float16)
    out.backward(g)
    mask = (w.detach().abs() <= 1).float() if estimator == "clipped_ste" else torch.ones_like(w)
    factor = alpha.view(-1, 1, 1, 1) if scaled else 1.0
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, g.float() * factor * mask, rtol=1e-6, atol=0)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        train_ops.binarize_act(torch.randn(2, 3, dtype=torch.float64), True, 0, torch.float32)
    with pytest.raises(ValueError, match="non-empty"):
        train_ops.binarize_act(torch.randn(0, 3), True, 0, torch.float32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        train_ops.binarize_act(torch.randn(2, 3), True, 0, torch.int8)
    with pytest.raises(ValueError, match="estimator"):
        train_ops.binarize_weight(torch.randn(2, 3), 0, torch.float32, True)
    with pytest.raises(ValueError, match="same C"):
        train_ops.binary_conv2d(torch.randn(1, 3, 4, 4), torch.ones(2, 4, 1, 1), True, 0, [1, 1], [0] * 4, [1, 1], 0)
    with pytest.raises(ValueError, match="same K"):
        train_ops.binary_linear(torch.randn(2, 3), torch.ones(4, 5), True, 0)


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("auto", None), ("", None)])
def test_switch_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv("LIGHTNING_OVSW_FUSED", value)
    assert train_ops._mode_from_env() is expected


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("auto", torch.cuda.is_available())])
def test_use_fused_reads_the_environment_at_each_call(monkeypatch, value, expected):
    monkeypatch.setattr(train_ops, "FUSED", None)
    monkeypatch.setenv("LIGHTNING_OVSW_FUSED", value)
    x = torch.ones(2, 3, device=DEVICE)
    assert train_ops.use_fused(x, x) is expected
    monkeypatch.setattr(train_ops, "FUSED", not expected)  # the module flag wins
    assert train_ops.use_fused(x, x) is (not expected)
    monkeypatch.setattr(train_ops, "FUSED", True)  # float64 and empty inputs always take the plain path
    assert not train_ops.use_fused(x.double(), x) and not train_ops.use_fused(x, x.double())
    assert not train_ops.use_fused(x[:0], x)


def test_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("LIGHTNING_OVSW_FUSED", "yes please")
    with pytest.raises(ValueError, match="LIGHTNING_OVSW_FUSED"):
        train_ops._mode_from_env()


def _fwd_bwd(layer, x, fused, monkeypatch, autocast=None):
    monkeypatch.setattr(train_ops, "FUSED", fused)
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        out = layer(x)
    out.float().mul(torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    return out, grads


def _assert_paths_agree(layer, x, monkeypatch, autocast=None, tol=1e-5):
    out_p, grads_p = _fwd_bwd(layer, x, False, monkeypatch, autocast)
    out_f, grads_f = _fwd_bwd(layer, x, True, monkeypatch, autocast)
    assert out_f.dtype == out_p.dtype
    torch.testing.assert_close(out_f, out_p, rtol=tol, atol=tol * out_p.abs().max().item())
    for gf, gp in zip(grads_f, grads_p, strict=True):
        torch.testing.assert_close(gf, gp, rtol=tol, atol=tol * gp.abs().max().item())


@pytest.mark.parametrize("estimator", list(DERIVATIVES))
@pytest.mark.parametrize("pad_value,padding,stride", [(0, 1, 1), (1, 1, 2), (0, "same", 1), (1, 0, 1)])
def test_conv_layer_fused_equals_plain(estimator, pad_value, padding, stride, monkeypatch):
    layer = BinaryConv2d(5, 7, (3, 2) if padding == "same" else 3, stride, padding, bias=True,
                         activation_estimator=estimator, pad_value=pad_value,
                         weight_estimator="clipped_ste" if estimator == "ste" else "ste")
    x = with_specials(torch.randn(3, 5, 9, 11))
    x.view(-1)[4:6] = 0.3
    for mode in (True, False):
        _assert_paths_agree(layer.train(mode), x, monkeypatch)


@pytest.mark.parametrize("scale", ["standardized", "mean", "learnable", "none"])
def test_linear_layer_fused_equals_plain(scale, monkeypatch):
    layer = BinaryLinear(13, 6, scale=scale)
    x = torch.randn(4, 2, 13)
    for mode in (True, False):
        _assert_paths_agree(layer.train(mode), x, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_layer_under_autocast(dtype, monkeypatch):
    """Autocast: the fused path writes the signs in the autocast dtype; same result as the plain path."""
    layer = BinaryConv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 7, 7)
    _assert_paths_agree(layer, x, monkeypatch, autocast=dtype, tol=TOL[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_resnet18_shapes(dtype, monkeypatch):
    for cin, cout, k, stride, hw in [(64, 64, 3, 1, 32), (128, 256, 3, 2, 16), (256, 512, 1, 2, 8)]:
        layer = BinaryConv2d(cin, cout, k, stride, k // 2).cuda()
        x = torch.randn(64, cin, hw, hw, device="cuda")
        _assert_paths_agree(layer, x, monkeypatch, autocast=dtype, tol=TOL[dtype])
    x = torch.randn(8, 300 * 4096 + 7, device="cuda")  # > 256 blocks per sample: the looped merge
    torch.testing.assert_close(train_ops.binarize_act(x, True, 0, dtype)[1].double(), inv_std64(x), rtol=1e-5, atol=0)
    w = torch.randn(512, 256, 3, 3, device="cuda")
    sign, alpha = train_ops.binarize_weight(w, 1, dtype, False)
    assert torch.equal(sign.double(), sign64(w))
    rows = w.double().flatten(1)
    ref = ((rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, keepdim=True) + 1e-5)).abs().mean(1)
    torch.testing.assert_close(alpha.double(), ref, rtol=1e-6, atol=0)


def test_trainer_fused_path_matches_plain_path(monkeypatch):
    """A Trainer with AGS + SAD + FlipMonitor, every Triton path on (layers and callback updates) vs every
    PyTorch path: the same weights and trackers after a few SGD steps (rounding only: few steps, since a BNN
    amplifies rounding differences through sign flips)."""
    from test_callbacks import DELTA, SIGMA, TAU, M, fit, make_data, make_model

    from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CPU Trainer through Triton needs TRITON_INTERPRET=1; tests/test_callbacks_cuda.py covers CUDA")
    steps, data, runs = 4, make_data(8 * 4), {}
    for fused in (False, True):
        monkeypatch.setattr(train_ops, "FUSED", fused)
        monkeypatch.setenv("LIGHTNING_OVSW_FUSED", "1" if fused else "0")
        callbacks = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
        _, module = fit(make_model(), data, steps, callbacks)
        runs[fused] = module.model, callbacks[1].trackers
    for (name, p), q in zip(runs[True][0].named_parameters(), runs[False][0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for name, t in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], t, rtol=1e-5, atol=1e-7)
