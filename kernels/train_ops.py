"""Fused training ops of the binary layers (``torch.ops.ovsw.*``), Triton kernels with registered autograd.

The plain PyTorch path in ``lightning_ovsw.layers`` (composed ``standardize_input`` + sign estimators +
``standardized_scale``) is the reference; these ops compute the same values in fewer passes:

- ``ovsw::binarize_act(x, standardize, estimator, dtype) -> (sign, inv_std)``: ``sign(x)`` written directly
  in ``dtype`` (the dtype the conv runs in, e.g. float16 under autocast) and, from the same read of ``x`` (the
  sign does not need the std), the per-sample ``1 / sqrt(var + 1e-5)`` in float32 (unbiased ``var`` over the
  non-batch dims; no float32 copy of ``x``; no gradient, the authors detach it). For the backward it keeps
  ``x`` itself (+ one float per sample): ``x`` is the producer's output, so autograd shares its storage with
  any other op that saves it, instead of a new ``x / std`` tensor per layer as the plain path keeps. The
  estimator derivative is recomputed from ``x`` in one fused pass, ``dL/dx = dL/dsign * f'(x * inv_std) *
  inv_std`` (``ovsw::binarize_act_backward``); the straight-through estimator keeps nothing. A 1-byte code
  cannot hold Bi-Real's derivative exactly, and the derivative in the compute dtype is as large as ``x``.
- ``ovsw::binary_conv2d(x, w_sign, standardize, estimator, stride, pad, dilation, pad_value)``: the same
  binarization followed by the convolution, keeping ``x`` (not ``sign(x)``) for the backward and recomputing
  the signs there: one saved activation per binary conv, as for a float conv (the plain path keeps two:
  ``x / std`` for the estimator and ``sign(x)`` for the weight gradient).
- ``ovsw::binary_linear(x, w_sign, standardize, estimator)``: the same for ``F.linear``.
- ``ovsw::binarize_weight(w, estimator, dtype, scaled)``: ``(sign(W) in dtype, alpha)`` in one kernel, with
  ``alpha_i = mean(|standardize(W[i])|)`` (float32); with ``scaled`` the first output is ``alpha_i *
  sign(W[i])``, so that the conv applies the scale (``conv(s, sign(W)) * alpha = conv(s, alpha * sign(W))``)
  and no pass over the layer's output (forward and backward) is needed. Backward: straight through
  (``clipped_ste``: masked by ``|W| <= 1``), times the detached ``alpha`` if ``scaled``.

Each op has a fake kernel, so ``torch.compile`` traces it without a graph break. The ops run on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). ``use_fused`` picks the path: ``FUSED``
if set, else the environment variable ``LIGHTNING_OVSW_FUSED`` (read at each call, as the OvSW callbacks
do): ``1`` forces these ops, ``0`` the plain path, unset or ``auto``: these ops for CUDA tensors when Triton
is installed.
"""

import importlib.util
import os

import torch
from torch import Tensor

from .codes import ACTIVATION_ESTIMATORS as ACTIVATION_CODES
from .codes import WEIGHT_ESTIMATORS as WEIGHT_CODES
from .codes import Estimator

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _mode_from_env() -> bool | None:
    value = os.environ.get("LIGHTNING_OVSW_FUSED", "auto").strip().lower()
    modes = {"1": True, "true": True, "0": False, "false": False, "auto": None, "": None}
    if value not in modes:
        raise ValueError(f"LIGHTNING_OVSW_FUSED={value!r} is not understood; use 1 (fused), 0 (plain) or auto.")
    return modes[value]


#: ``True``: always the fused ops; ``False``: always the plain PyTorch path; ``None`` (default): as the
#: environment variable ``LIGHTNING_OVSW_FUSED`` says at each call (``1``, ``0``, or ``auto``/unset: fused for
#: CUDA tensors when Triton is installed). Set it to switch in code (tests, benchmarks).
FUSED: bool | None = None


#: Triton is installed (looked up, not imported: importing the package stays cheap).
_TRITON_OK = importlib.util.find_spec("triton") is not None


def use_fused(x: Tensor, w: Tensor) -> bool:
    """Whether a binary layer with weight ``w`` runs the fused ops on input ``x``.

    Only non-empty float16/bfloat16/float32 tensors can (the kernels accumulate in float32; float64 always
    takes the plain path). Among those: as ``FUSED`` or ``LIGHTNING_OVSW_FUSED`` force, else CUDA tensors
    when Triton is installed.
    """
    if x.dtype not in _FLOATS or w.dtype not in _FLOATS or x.numel() == 0:
        return False
    return wants_triton(x)


def wants_triton(t: Tensor) -> bool:
    """The switch of every fused path (binary layers, OvSW updates): ``FUSED``, else ``LIGHTNING_OVSW_FUSED``,
    else Triton for CUDA tensors when it is installed."""
    mode = FUSED if FUSED is not None else _mode_from_env()
    return mode if mode is not None else _TRITON_OK and t.is_cuda


# ----------------------------------------------------------------------------------------- helpers
def _kernels():
    from .triton import _common, binarize

    return _common.INTERPRET, binarize


def _check(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with a batch (or output-channel) dim, got {tuple(x.shape)}")
    interpret, _ = _kernels()
    if not x.is_cuda and not interpret:
        raise ValueError(
            f"the fused binary-layer kernels need CUDA tensors ({name} is on {x.device}); set "
            "lightning_ovsw.kernels.train_ops.FUSED = False (or LIGHTNING_OVSW_FUSED=0) for the plain path, "
            "or TRITON_INTERPRET=1 before importing triton to run them in the interpreter"
        )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _FLOATS:
        raise ValueError(f"dtype must be one of {_FLOATS} (the dtype the conv runs in), got {dtype}")


def _dense(x: Tensor) -> Tensor:
    """``x`` with every sample one contiguous run of memory: contiguous or channels_last, else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _like(x: Tensor, grad: Tensor) -> Tensor:
    """``grad`` in ``x``'s memory layout (the kernels index both with the same flat offsets)."""
    return grad if grad.stride() == x.stride() else torch.empty_like(x, dtype=grad.dtype).copy_(grad)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(n: int, cap: int) -> int:
    return min(cap, max(16, 1 << (n - 1).bit_length()))


def _signs(x: Tensor, dtype: torch.dtype, standardize: bool) -> tuple[Tensor, Tensor]:
    """``sign(x)`` in ``dtype`` and, if ``standardize``, the per-sample ``1 / sqrt(var + 1e-5)`` (float32
    ``[N]``; else an empty tensor), from one read of ``x``."""
    _, k = _kernels()
    x = _dense(x)
    n, m = x.shape[0], x.numel() // x.shape[0]
    block = _block(m, 4096)
    nb = _cdiv(m, block)
    sign = torch.empty_like(x, dtype=dtype)
    if not standardize:
        k.sign_moments_kernel[(n, nb)](x, sign, x, x, m, nb, MOMENTS=False, BLOCK=block, num_warps=8)
        return sign, x.new_empty(0, dtype=torch.float32)
    mean = torch.empty((n, nb), device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    inv_std = torch.empty(n, device=x.device, dtype=torch.float32)
    k.sign_moments_kernel[(n, nb)](x, sign, mean, m2, m, nb, MOMENTS=True, BLOCK=block, num_warps=8)
    k.inv_std_kernel[(n,)](mean, m2, inv_std, m, nb, BLOCK=block, NB_BLOCK=_block(nb, 256))
    return sign, inv_std


def _signs_fake(x: Tensor, dtype: torch.dtype, standardize: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(_dense(x), dtype=dtype), x.new_empty(x.shape[0] if standardize else 0, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ ops
@torch.library.custom_op("ovsw::binarize_act", mutates_args=())
def binarize_act(x: Tensor, standardize: bool, estimator: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(sign(x)`` in ``dtype`` (+1 for ``x >= 0``, ``-0.0`` included), ``inv_std)``: the per-sample
    ``1 / sqrt(var + 1e-5)`` (float32 ``[N]``) if ``standardize``, else empty; it only shapes the gradient."""
    _check(x, "x")
    _check_act_args(estimator, dtype)
    return _signs(x, dtype, standardize)


@binarize_act.register_fake
def _(x: Tensor, standardize: bool, estimator: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check_fake(x, "x")
    _check_act_args(estimator, dtype)
    return _signs_fake(x, dtype, standardize)


@torch.library.custom_op("ovsw::binarize_act_backward", mutates_args=())
def binarize_act_backward(grad: Tensor, x: Tensor, inv_std: Tensor, estimator: int) -> Tensor:
    """``dL/dx = grad * f'(x * inv_std) * inv_std`` (``f'`` of the estimator; no ``inv_std`` factor if it is
    empty), in ``x``'s dtype."""
    _, k = _kernels()
    x = _dense(x)
    grad = _like(x, grad)
    out = torch.empty_like(x)
    rows, m = x.shape[0], x.numel() // x.shape[0]
    block = _block(m, 2048)
    k.sign_backward_kernel[(rows, _cdiv(m, block))](grad, x, inv_std, out, m, ESTIMATOR=estimator,
                                                    HAS_STD=inv_std.numel() > 0, BLOCK=block)
    return out


@binarize_act_backward.register_fake
def _(grad: Tensor, x: Tensor, inv_std: Tensor, estimator: int) -> Tensor:
    return torch.empty_like(_dense(x))


def _act_setup(ctx, inputs, output) -> None:
    x, _, estimator, _ = inputs
    ctx.estimator = estimator
    ctx.x_meta = (x.dim(), x.dtype)
    ctx.save_for_backward(None if estimator == Estimator.STE else x, output[1])


def _act_backward(ctx, grad: Tensor, _grad_inv_std: Tensor | None):
    x, inv_std = ctx.saved_tensors
    if x is not None:
        return binarize_act_backward(grad, x, inv_std, ctx.estimator), None, None, None
    ndim, dtype = ctx.x_meta  # straight through: only the 1/std of the standardization
    if inv_std.numel() == 0:
        return grad.to(dtype), None, None, None
    return grad.to(dtype) * inv_std.view(-1, *[1] * (ndim - 1)).to(dtype), None, None, None


binarize_act.register_autograd(_act_backward, setup_context=_act_setup)


@torch.library.custom_op("ovsw::binarize_weight", mutates_args=())
def binarize_weight(w: Tensor, estimator: int, dtype: torch.dtype, scaled: bool) -> tuple[Tensor, Tensor]:
    """``(sign(W)`` in ``dtype`` (``alpha_i * sign(W[i])`` if ``scaled``), ``alpha`` float32 ``[out_channels])``
    with ``alpha_i = mean(|standardize(W[i])|)``."""
    _check(w, "w")
    _check_weight_args(w, estimator, dtype)
    _, k = _kernels()
    w = _dense(w)  # channels_last weights keep their layout: rows stay contiguous, alpha ignores the order
    rows, cols = w.shape[0], w.numel() // w.shape[0]
    out = torch.empty_like(w, dtype=dtype)
    alpha = torch.empty(rows, device=w.device, dtype=torch.float32)
    k.weight_kernel[(rows,)](w, out, alpha, cols, SCALED=scaled, BLOCK=_block(cols, 1024))
    return out, alpha


@binarize_weight.register_fake
def _(w: Tensor, estimator: int, dtype: torch.dtype, scaled: bool) -> tuple[Tensor, Tensor]:
    _check_fake(w, "w")
    _check_weight_args(w, estimator, dtype)
    return torch.empty_like(_dense(w), dtype=dtype), w.new_empty(w.shape[0], dtype=torch.float32)


def _weight_setup(ctx, inputs, output) -> None:
    w, estimator, _, scaled = inputs
    ctx.dtype = w.dtype
    ctx.save_for_backward(w if estimator == Estimator.CLIPPED_STE else None, output[1] if scaled else None)


def _weight_backward(ctx, grad_out: Tensor, _grad_alpha: Tensor | None):
    w, alpha = ctx.saved_tensors
    grad = grad_out.to(ctx.dtype)
    if alpha is not None:  # alpha is a detached constant of the product alpha * sign(W)
        grad = grad * alpha.view(-1, *[1] * (grad.dim() - 1)).to(grad.dtype)
    if w is not None:
        grad = grad * (w.abs() <= 1).to(grad.dtype)
    return grad, None, None, None


binarize_weight.register_autograd(_weight_backward, setup_context=_weight_setup)


@torch.library.custom_op("ovsw::binary_conv2d", mutates_args=())
def binary_conv2d(x: Tensor, w_sign: Tensor, standardize: bool, estimator: int, stride: list[int], pad: list[int],
                  dilation: list[int], pad_value: int) -> tuple[Tensor, Tensor]:
    """``(conv2d(pad(sign(x), pad, pad_value), w_sign), inv_std)`` (``pad`` in ``F.pad`` order: left, right, top,
    bottom; ``inv_std`` as in ``binarize_act``, kept for the backward).

    For the backward it saves ``x``, ``inv_std`` and ``w_sign``, not ``sign(x)``: the signs are recomputed (one
    elementwise pass), so a binary conv keeps one activation tensor alive, as a float conv does.
    """
    _check(x, "x")
    _check_conv_args(x, w_sign, estimator, stride, pad, dilation, pad_value)
    xb, inv_std = _signs(x, w_sign.dtype, standardize)
    xb, conv_pad = _pad(xb, pad, pad_value)
    return torch.ops.aten.convolution(xb, w_sign, None, stride, conv_pad, dilation, False, [0, 0], 1), inv_std


@binary_conv2d.register_fake
def _(x, w_sign, standardize, estimator, stride, pad, dilation, pad_value):
    _check_fake(x, "x")
    _check_conv_args(x, w_sign, estimator, stride, pad, dilation, pad_value)
    xb, inv_std = _signs_fake(x, w_sign.dtype, standardize)
    xb, conv_pad = _pad(xb, pad, pad_value)
    return torch.ops.aten.convolution(xb, w_sign, None, stride, conv_pad, dilation, False, [0, 0], 1), inv_std


def _pad(xb: Tensor, pad: list[int], pad_value: int) -> tuple[Tensor, list[int]]:
    """``xb`` padded explicitly unless the conv's own (symmetric, zero) padding does it; returns it with the
    padding left for the conv."""
    left, right, top, bottom = pad
    if (pad_value == 0 or not any(pad)) and left == right and top == bottom:
        return xb, [top, left]
    return torch.nn.functional.pad(xb, pad, value=float(pad_value)), [0, 0]


def _conv_setup(ctx, inputs, output) -> None:
    x, w_sign, _, estimator, stride, pad, dilation, pad_value = inputs
    ctx.args = (estimator, stride, pad, dilation, pad_value)
    ctx.save_for_backward(x, output[1], w_sign)


def _conv_backward(ctx, grad: Tensor, _grad_inv_std: Tensor | None):
    x, inv_std, w_sign = ctx.saved_tensors
    estimator, stride, pad, dilation, pad_value = ctx.args
    xb, conv_pad = _pad(binarize_act(x, False, int(Estimator.STE), w_sign.dtype)[0], pad, pad_value)
    grad_xb, grad_w, _ = torch.ops.aten.convolution_backward(
        grad.to(w_sign.dtype), xb, w_sign, None, stride, conv_pad, dilation, False, [0, 0], 1, [True, True, False])
    if list(conv_pad) != [pad[2], pad[0]]:  # explicitly padded: drop the gradient of the padding
        grad_xb = grad_xb[:, :, pad[2]:pad[2] + x.shape[2], pad[0]:pad[0] + x.shape[3]]
    return binarize_act_backward(grad_xb, x, inv_std, estimator), grad_w, None, None, None, None, None, None


binary_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("ovsw::binary_linear", mutates_args=())
def binary_linear(x: Tensor, w_sign: Tensor, standardize: bool, estimator: int) -> tuple[Tensor, Tensor]:
    """``(linear(sign(x), w_sign), inv_std)``; like ``binary_conv2d`` it keeps ``x``, not ``sign(x)``."""
    _check(x, "x")
    _check_linear_args(x, w_sign, estimator)
    xb, inv_std = _signs(x, w_sign.dtype, standardize)
    return torch.nn.functional.linear(xb, w_sign), inv_std


@binary_linear.register_fake
def _(x, w_sign, standardize, estimator):
    _check_fake(x, "x")
    _check_linear_args(x, w_sign, estimator)
    xb, inv_std = _signs_fake(x, w_sign.dtype, standardize)
    return torch.nn.functional.linear(xb, w_sign), inv_std


def _linear_setup(ctx, inputs, output) -> None:
    x, w_sign, _, estimator = inputs
    ctx.estimator = estimator
    ctx.save_for_backward(x, output[1], w_sign)


def _linear_backward(ctx, grad: Tensor, _grad_inv_std: Tensor | None):
    x, inv_std, w_sign = ctx.saved_tensors
    xb = binarize_act(x, False, int(Estimator.STE), w_sign.dtype)[0]
    grad = grad.to(w_sign.dtype)
    grad_w = grad.reshape(-1, grad.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1])
    return binarize_act_backward(grad @ w_sign, x, inv_std, ctx.estimator), grad_w, None, None


binary_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------ validation
def _check_conv_args(x, w_sign, estimator, stride, pad, dilation, pad_value) -> None:
    _check_act_args(estimator, w_sign.dtype)
    if x.dim() != 4 or w_sign.dim() != 4 or x.shape[1] != w_sign.shape[1]:
        raise ValueError(
            f"binary_conv2d needs x [N, C, H, W] and w_sign [Cout, C, KH, KW] with the same C, got "
            f"{tuple(x.shape)} and {tuple(w_sign.shape)}")
    if x.device != w_sign.device:
        raise ValueError(f"x is on {x.device} but w_sign on {w_sign.device}; move both to one device.")
    if len(pad) != 4 or min(pad) < 0 or pad_value not in (0, 1):
        raise ValueError(f"pad must be 4 non-negative ints (left, right, top, bottom) and pad_value 0 or 1, got "
                         f"{pad}, {pad_value}")


def _check_fake(x: Tensor, name: str) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16, bfloat16 or float32 tensor, got {x.dtype}")


def _check_act_args(estimator: int, dtype: torch.dtype) -> None:
    _check_dtype(dtype)
    if estimator not in ACTIVATION_CODES.values():
        raise ValueError(f"estimator must be one of the codes {ACTIVATION_CODES}, got {estimator!r}")


def _check_linear_args(x: Tensor, w_sign: Tensor, estimator: int) -> None:
    _check_act_args(estimator, w_sign.dtype)
    if x.dim() < 2 or w_sign.dim() != 2 or x.shape[-1] != w_sign.shape[1]:
        raise ValueError(
            f"binary_linear needs x [N, ..., K] and w_sign [out, K] with the same K, got {tuple(x.shape)} and "
            f"{tuple(w_sign.shape)}")
    if x.device != w_sign.device:
        raise ValueError(f"x is on {x.device} but w_sign on {w_sign.device}; move both to one device.")


def _check_weight_args(w: Tensor, estimator: int, dtype: torch.dtype) -> None:
    _check_dtype(dtype)
    if estimator not in WEIGHT_CODES.values():
        raise ValueError(f"estimator must be one of the codes {WEIGHT_CODES}, got {estimator!r}")


# ------------------------------------------------------------------------------------- layer entry points
def fused_binary_linear(x: Tensor, w_sign: Tensor, standardize: bool, estimator: str) -> Tensor:
    """``linear(sign(x), w_sign)`` with the activation gradient of ``estimator`` on ``x / std``
    (``standardize``) or ``x``; keeps ``x`` (not ``sign(x)``) for the backward."""
    return binary_linear(x, w_sign, standardize, int(ACTIVATION_CODES[estimator]))[0]


def fused_binary_conv2d(x: Tensor, w_sign: Tensor, standardize: bool, estimator: str, stride: tuple[int, int],
                        pad: tuple[int, int, int, int], dilation: tuple[int, int], pad_value: int) -> Tensor:
    """``conv2d`` of the padded ``sign(x)`` with ``w_sign`` (``pad`` in ``F.pad`` order), the activation
    gradient of ``estimator`` on ``x / std`` (``standardize``) or ``x``."""
    return binary_conv2d(x, w_sign, standardize, int(ACTIVATION_CODES[estimator]), list(stride), list(pad),
                         list(dilation), pad_value)[0]


def fused_binary_weight(w: Tensor, estimator: str, dtype: torch.dtype, scaled: bool) -> tuple[Tensor, Tensor]:
    """``(sign(W)`` in ``dtype``, or ``alpha * sign(W)`` if ``scaled``; detached standardized ``alpha)`` — the
    fused twin of ``binary_weight`` and ``standardized_scale``."""
    out, alpha = binarize_weight(w, int(WEIGHT_CODES[estimator]), dtype, scaled)
    return out, alpha.detach()
