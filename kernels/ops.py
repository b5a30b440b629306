"""The ``ovsw`` packed ops (``torch.ops.ovsw.*``), with the semantics of ``kernels/reference.py``.

Importing this module registers, through ``torch.library``:

- ``ovsw::sign_pack(Tensor x) -> Tensor``: ``[..., K]`` float -> ``[..., ceil(K/32)]`` int32 sign words;
- ``ovsw::sign_pack_nchw(Tensor x) -> Tensor``: NCHW float -> NHWC words, the input of ``packed_conv2d``;
- ``ovsw::packed_linear(x_bits, w_bits, k, scale, bias, residual, out_dtype)``;
- ``ovsw::packed_conv2d(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias,
  residual, out_dtype)``;
- ``ovsw::packed_conv2d_sign(...)``: the same without ``out_dtype``, fused with the next layer's
  sign-and-pack (returns the packed sign bits of the float32 result);
- ``ovsw::packed_conv2d_act(..., min_val, max_val, out_dtype) -> (y, y_bits)``: ``y = hardtanh(packed_conv2d
  (...))`` in ``out_dtype`` (float32 if None) and its packed sign bits, from one epilogue on CPU (a block
  output that feeds both a float shortcut and the next binary conv);
- ``ovsw::max_pool2d_act(x, kernel_size, stride, padding, dilation, ceil_mode, min_val, max_val) -> (y,
  y_bits)``: ``y = hardtanh(max_pool2d(x))`` and its packed NHWC sign bits, in one pass on CPU (a ResNet
  stem's pool, activation and the first binary conv's sign-and-pack);

each with a fake (meta) kernel, so ``torch.compile`` and ``torch.export`` trace them and an exported
program runs in any process that imports ``lightning_ovsw.kernels.ops``. Dispatch: CPU tensors run the C++
popcount kernels (``kernels/cpu``, built on first use by a Python CPU kernel that then gives way to the
C++ ones, registered with ``TORCH_LIBRARY_IMPL``), or the reference when the extension could not be built
(with one warning that says why); CUDA tensors run the Triton kernels
(``lightning_ovsw.kernels.triton.launch``), or the reference if Triton cannot be imported; other devices run
the reference. Without ``scale``, ``bias``, ``residual`` and ``out_dtype`` the ops return the raw int32
accumulator ``dot(sign(x), sign(w))``; otherwise ``acc * scale + bias + residual`` (float32) in
``out_dtype`` (float32 if None).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import cpu, reference
from .reference import conv_output_size, num_words

__all__ = ["max_pool2d_act", "packed_conv2d", "packed_conv2d_act", "packed_conv2d_sign", "packed_linear", "sign_pack",
           "sign_pack_nchw"]

_LIB = torch.library.Library("ovsw", "DEF")
_LIB.define("sign_pack(Tensor x) -> Tensor")
_LIB.define("sign_pack_nchw(Tensor x) -> Tensor")
_LIB.define(
    "packed_linear(Tensor x_bits, Tensor w_bits, int k, Tensor? scale=None, Tensor? bias=None, "
    "Tensor? residual=None, ScalarType? out_dtype=None) -> Tensor"
)
_LIB.define(
    "packed_conv2d(Tensor x_bits, Tensor w_bits, int in_channels, int[2] stride=[1, 1], "
    "int[2] padding=[0, 0], int[2] dilation=[1, 1], int pad_value=0, Tensor? scale=None, "
    "Tensor? bias=None, Tensor? residual=None, ScalarType? out_dtype=None) -> Tensor"
)
_LIB.define(
    "packed_conv2d_sign(Tensor x_bits, Tensor w_bits, int in_channels, int[2] stride=[1, 1], "
    "int[2] padding=[0, 0], int[2] dilation=[1, 1], int pad_value=0, Tensor? scale=None, "
    "Tensor? bias=None, Tensor? residual=None) -> Tensor"
)

_LIB.define(
    "packed_conv2d_act(Tensor x_bits, Tensor w_bits, int in_channels, int[2] stride=[1, 1], "
    "int[2] padding=[0, 0], int[2] dilation=[1, 1], int pad_value=0, Tensor? scale=None, "
    "Tensor? bias=None, Tensor? residual=None, float min_val=-1., float max_val=1., "
    "ScalarType? out_dtype=None) -> (Tensor, Tensor)"
)
_LIB.define(
    "max_pool2d_act(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding=[0, 0], int[2] dilation=[1, 1], "
    "bool ceil_mode=False, float min_val=-1., float max_val=1.) -> (Tensor, Tensor)"
)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------- validation
# The one validation of each op's arguments: every kernel (reference, Triton, fake) runs behind it, and
# ``kernels/triton/launch.py`` calls it for direct callers; those add only their own limits.
def _check_bits(t: Tensor, name: str, ndim: int | None) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int32:
        raise TypeError(
            f"{name} must be an int32 tensor of packed sign words (from ovsw.sign_pack), "
            f"got {getattr(t, 'dtype', type(t).__name__)}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")


def _check_float(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _FLOATS:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be a floating point tensor, got {got}")


def _check_same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {found}. Move them with .to(device).")


def _check_epilogue(out_shape: tuple[int, ...], scale: Tensor | None, bias: Tensor | None,
                    residual: Tensor | None, out_dtype: torch.dtype | None) -> None:
    n = out_shape[-1]
    for name, v in (("scale", scale), ("bias", bias)):
        if v is not None:
            _check_float(v, name)
            if v.numel() != n:
                raise ValueError(
                    f"{name} must hold one value per output channel ({n}), got shape {list(v.shape)}")
    if residual is not None:
        _check_float(residual, "residual")
        if tuple(residual.shape) != tuple(out_shape):
            raise ValueError(
                f"residual must have the output's shape {list(out_shape)}, got {list(residual.shape)}")
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise ValueError(
            f"out_dtype must be None (int32 or float32 output) or a floating point dtype, got {out_dtype}")


def _result_dtype(scale, bias, residual, out_dtype) -> torch.dtype:
    if scale is None and bias is None and residual is None and out_dtype is None:
        return torch.int32
    return out_dtype or torch.float32


def pair(v: Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and i >= minimum for i in pair):
        raise ValueError(f"{name} must be a pair of ints >= {minimum}, got {list(v) if isinstance(v, tuple) else v!r}")
    return pair


def check_sign_pack(x: Tensor) -> None:
    _check_float(x, "x")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim to pack, got shape {list(x.shape)}")


def check_sign_pack_nchw(x: Tensor) -> None:
    _check_float(x, "x")
    if x.dim() != 4 or x.shape[1] == 0:
        raise ValueError(f"x must be NCHW [N, C, H, W] with C > 0, got shape {list(x.shape)}")


def linear_shape(x_bits, w_bits, k, scale, bias, residual, out_dtype) -> tuple[int, ...]:
    """Validate ``packed_linear``'s arguments; return the output shape."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (the number of packed bits), got {k!r}")
    _check_bits(x_bits, "x_bits", None)
    _check_bits(w_bits, "w_bits", 2)
    if x_bits.dim() < 1:
        raise ValueError("x_bits must be a tensor [..., ceil(k/32)] of packed sign words, got a scalar")
    _check_same_device(x_bits=x_bits, w_bits=w_bits, scale=scale, bias=bias, residual=residual)
    kw = num_words(k)
    if x_bits.shape[-1] != kw or w_bits.shape[-1] != kw:
        raise ValueError(
            f"k={k} bits need {kw} words per row; got x_bits {list(x_bits.shape)}, w_bits "
            f"{list(w_bits.shape)}. Pack both with ovsw.sign_pack over the same k features."
        )
    out_shape = (*x_bits.shape[:-1], w_bits.shape[0])
    _check_epilogue(out_shape, scale, bias, residual, out_dtype)
    return out_shape


def conv_shape(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias, residual,
                out_dtype) -> tuple[int, ...]:
    """Validate ``packed_conv2d``'s arguments; return the NHWC output shape."""
    _check_bits(x_bits, "x_bits", 4)
    _check_bits(w_bits, "w_bits", 4)
    _check_same_device(x_bits=x_bits, w_bits=w_bits, scale=scale, bias=bias, residual=residual)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    cw = num_words(in_channels)
    if x_bits.shape[3] != cw or w_bits.shape[3] != cw:
        raise ValueError(
            f"in_channels={in_channels} needs {cw} words per pixel; got x_bits {list(x_bits.shape)}, w_bits "
            f"{list(w_bits.shape)} (expected packed NHWC input [N, H, W, CW], e.g. from "
            "ovsw.sign_pack_nchw, and weights [Cout, KH, KW, CW])"
        )
    if pad_value not in (0, 1):
        raise ValueError(
            f"pad_value must be 0 (padded taps contribute 0) or 1 (pad with +1), got {pad_value!r}")
    (sh, sw), (ph, pw), (dh, dw) = (pair(stride, "stride", 1), pair(padding, "padding", 0),
                                    pair(dilation, "dilation", 1))
    n, h, w, _ = x_bits.shape
    cout, kh, kwid, _ = w_bits.shape
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kwid, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the {kh}x{kwid} kernel (dilation {[dh, dw]}) does not fit the {h}x{w} input padded by "
            f"{[ph, pw]}"
        )
    out_shape = (n, ho, wo, cout)
    _check_epilogue(out_shape, scale, bias, residual, out_dtype)
    return out_shape


# ------------------------------------------------------------------------------------------- backends
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_backend():
    """``lightning_ovsw.kernels.triton.launch``, or None (warned once) when it cannot be imported."""
    try:
        from .triton import launch as triton_ops
    except Exception as err:  # noqa: BLE001  (any import failure means: use the reference)
        _warn_once("cuda", f"lightning_ovsw: the Triton kernels cannot be imported ({err!r}); the ovsw ops "
                           "run on the slow PyTorch reference path on CUDA.")
        return None
    return triton_ops


def _sign_pack_nchw_reference(x: Tensor) -> Tensor:
    return reference.sign_pack(x.permute(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------- impls
def _full_args(reference_fn: Callable, check: Callable, args: tuple, kwargs: dict) -> tuple:
    """All arguments, defaults included (the dispatcher drops trailing defaults), validated."""
    bound = inspect.signature(reference_fn).bind(*args, **kwargs)
    bound.apply_defaults()
    check(*bound.args)
    return bound.args


def validate(name: str, *args, **kwargs) -> tuple:
    """Run ``ovsw::name``'s one argument validation (what every Python kernel runs first) and return all
    its arguments; the C++ CPU kernels make the same checks with the same messages."""
    reference_fn, _, check = _IMPLS[name]
    return _full_args(reference_fn, check, args, kwargs)


def _cpu_kernel(name: str, reference_fn: Callable, check: Callable) -> Callable:
    """Python CPU kernel of ``ovsw::name``: loads the C++ kernels on first use (they then replace this one
    in the dispatcher), or runs the reference when they cannot be built (warned once)."""

    def kernel(*args, **kwargs):
        if cpu.load_extension() is not None:
            return getattr(torch.ops.ovsw, name)(*args, **kwargs)  # dispatches to the C++ kernel now
        _warn_once("cpu", f"lightning_ovsw: the C++ CPU kernels are not available ({cpu.build_error()}); "
                          "the ovsw ops run on the slow PyTorch reference path.")
        return reference_fn(*_full_args(reference_fn, check, args, kwargs))

    return kernel


def _impl(name: str, reference_fn: Callable, cuda_fn: Callable, check: Callable) -> None:
    """Register the CUDA (Triton) and fallback (reference, any other device) kernels."""

    def cuda_kernel(*args, **kwargs):
        args = _full_args(reference_fn, check, args, kwargs)
        tri = _triton_backend()
        return reference_fn(*args) if tri is None else cuda_fn(tri, *args)

    def other_kernel(*args, **kwargs):
        return reference_fn(*_full_args(reference_fn, check, args, kwargs))

    _LIB.impl(name, cuda_kernel, "CUDA")
    _LIB.impl(name, other_kernel, "CompositeExplicitAutograd")


def _register_python_cpu_kernels() -> None:
    global _CPU_LIB
    _CPU_LIB = torch.library.Library("ovsw", "IMPL")
    for name, (reference_fn, _, check) in _IMPLS.items():
        _CPU_LIB.impl(name, _cpu_kernel(name, reference_fn, check), "CPU")


def _drop_python_cpu_kernels() -> None:
    """Before the C++ library loads and registers its CPU kernels: remove the Python ones."""
    _CPU_LIB._destroy()


def _conv_reference(x_bits, w_bits, in_channels, stride=(1, 1), padding=(0, 0), dilation=(1, 1), pad_value=0,
                    scale=None, bias=None, residual=None, out_dtype=None):
    return reference.packed_conv2d(x_bits, w_bits, in_channels, tuple(stride), tuple(padding),
                                   tuple(dilation), pad_value, scale, bias, residual, out_dtype)


def _conv_sign_reference(x_bits, w_bits, in_channels, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         pad_value=0, scale=None, bias=None, residual=None):
    y = _conv_reference(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias,
                        residual, torch.float32)
    return reference.sign_pack(y)


def _conv_sign_shape(*args) -> tuple[int, ...]:
    return conv_shape(*args, torch.float32)


def _conv_act_reference(x_bits, w_bits, in_channels, stride=(1, 1), padding=(0, 0), dilation=(1, 1), pad_value=0,
                        scale=None, bias=None, residual=None, min_val=-1.0, max_val=1.0, out_dtype=None):
    return reference.packed_conv2d_act(x_bits, w_bits, in_channels, tuple(stride), tuple(padding),
                                       tuple(dilation), pad_value, scale, bias, residual, min_val, max_val,
                                       out_dtype)


def _check_bounds(min_val: float, max_val: float) -> None:
    for name, v in (("min_val", min_val), ("max_val", max_val)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a float, got {v!r}")
    if min_val > max_val:
        raise ValueError(f"min_val must be <= max_val (the hardtanh range), got {min_val:g} > {max_val:g}")


def _conv_act_shape(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias, residual,
                    min_val, max_val, out_dtype) -> tuple[int, ...]:
    """Validate ``packed_conv2d_act``'s arguments; return the NHWC output shape."""
    _check_bounds(min_val, max_val)
    return conv_shape(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias, residual,
                       out_dtype or torch.float32)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """torch's ``max_pool2d`` output size (``ceil_mode``: one more, partial window if it starts inside the
    input or its left padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    if span < 0:
        return 0
    out = span // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + padding else out


def pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode, min_val, max_val) -> tuple[int, ...]:
    """Validate ``max_pool2d_act``'s arguments; return the (NCHW) output shape."""
    _check_float(x, "x")
    if x.dim() != 4 or 0 in x.shape[1:]:
        raise ValueError(f"x must be NCHW [N, C, H, W] with C, H, W > 0, got shape {list(x.shape)}")
    (kh, kw), (sh, sw) = pair(kernel_size, "kernel_size", 1), pair(stride, "stride", 1)
    (ph, pw), (dh, dw) = pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding must be at most half the kernel size (as in max_pool2d), got padding "
                         f"{[ph, pw]} for kernel_size {[kh, kw]}")
    _check_bounds(min_val, max_val)
    n, c, h, w = x.shape
    ho, wo = pool_output_size(h, kh, sh, ph, dh, ceil_mode), pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if ho < 1 or wo < 1:
        raise ValueError(f"the {kh}x{kw} window (dilation {[dh, dw]}) does not fit the {h}x{w} input padded "
                         f"by {[ph, pw]}")
    return (n, c, ho, wo)


def _max_pool2d_act_reference(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
                              min_val=-1.0, max_val=1.0):
    y = _pool_hardtanh(x, kernel_size, stride, padding, dilation, ceil_mode, min_val, max_val)
    return y, _sign_pack_nchw_reference(y)


def _pool_hardtanh(x, kernel_size, stride, padding, dilation, ceil_mode, min_val, max_val) -> Tensor:
    pooled = torch.nn.functional.max_pool2d(x, tuple(kernel_size), tuple(stride), tuple(padding),
                                            tuple(dilation), ceil_mode)
    return torch.nn.functional.hardtanh(pooled, min_val, max_val)


def _in_dtype(out_dtype: torch.dtype | None, run: Callable[[torch.dtype | None], Tensor]) -> Tensor:
    """Run a Triton kernel for ``out_dtype``; float64 (which the kernels do not write) via float32, as the
    reference computes the epilogue in float32 anyway."""
    if out_dtype == torch.float64:
        return run(torch.float32).to(torch.float64)
    return run(out_dtype)


def _linear_triton(tri, x, w, k, scale, bias, residual, out_dtype):
    return _in_dtype(out_dtype, lambda dt: tri.triton_packed_linear(x, w, k, scale, bias, residual, dt))


def _conv_triton(tri, x, w, c, s, p, d, pad_value, scale, bias, residual, out_dtype):
    return _in_dtype(out_dtype, lambda dt: tri.triton_packed_conv2d(
        x, w, c, tuple(s), tuple(p), tuple(d), pad_value, scale, bias, residual, dt))


def _conv_sign_triton(tri, x, w, c, s, p, d, pad_value, scale, bias, residual):
    y = tri.triton_packed_conv2d(x, w, c, tuple(s), tuple(p), tuple(d), pad_value, scale, bias, residual,
                                 torch.float32)
    return tri.triton_sign_pack(y)


def _max_pool2d_act_triton(tri, x, *pool):
    """torch's own max_pool2d and hardtanh on the GPU, then the Triton sign-and-pack."""
    y = _pool_hardtanh(x, *pool)
    return y, tri.triton_sign_pack_nchw(y)


def _conv_act_triton(tri, x, w, c, s, p, d, pad_value, scale, bias, residual, min_val, max_val, out_dtype):
    y = _conv_triton(tri, x, w, c, s, p, d, pad_value, scale, bias, residual, out_dtype or torch.float32)
    y = torch.nn.functional.hardtanh(y, min_val, max_val)
    return y, tri.triton_sign_pack(y)


_IMPLS = {
    "sign_pack": (reference.sign_pack, lambda tri, x: tri.triton_sign_pack(x), check_sign_pack),
    "sign_pack_nchw": (_sign_pack_nchw_reference, lambda tri, x: tri.triton_sign_pack_nchw(x),
                       check_sign_pack_nchw),
    "packed_linear": (reference.packed_linear, _linear_triton, linear_shape),
    "packed_conv2d": (_conv_reference, _conv_triton, conv_shape),
    "packed_conv2d_sign": (_conv_sign_reference, _conv_sign_triton, _conv_sign_shape),
    "packed_conv2d_act": (_conv_act_reference, _conv_act_triton, _conv_act_shape),
    "max_pool2d_act": (_max_pool2d_act_reference, _max_pool2d_act_triton, pool_shape),
}
for _name, (_reference_fn, _cuda_fn, _check) in _IMPLS.items():
    _impl(_name, _reference_fn, _cuda_fn, _check)
_CPU_LIB: torch.library.Library
_register_python_cpu_kernels()
cpu.BEFORE_LOAD.append(_drop_python_cpu_kernels)
cpu.AFTER_FAILED_LOAD.append(_register_python_cpu_kernels)


# ------------------------------------------------------------------------------------------ fakes
@torch.library.register_fake("ovsw::sign_pack", lib=_LIB)
def _sign_pack_fake(x: Tensor) -> Tensor:
    check_sign_pack(x)
    return x.new_empty((*x.shape[:-1], num_words(x.shape[-1])), dtype=torch.int32)


@torch.library.register_fake("ovsw::sign_pack_nchw", lib=_LIB)
def _sign_pack_nchw_fake(x: Tensor) -> Tensor:
    check_sign_pack_nchw(x)
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, num_words(c)), dtype=torch.int32)


@torch.library.register_fake("ovsw::packed_linear", lib=_LIB)
def _packed_linear_fake(x_bits, w_bits, k, scale=None, bias=None, residual=None, out_dtype=None):
    shape = linear_shape(x_bits, w_bits, k, scale, bias, residual, out_dtype)
    return x_bits.new_empty(shape, dtype=_result_dtype(scale, bias, residual, out_dtype))


@torch.library.register_fake("ovsw::packed_conv2d", lib=_LIB)
def _packed_conv2d_fake(x_bits, w_bits, in_channels, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                        pad_value=0, scale=None, bias=None, residual=None, out_dtype=None):
    shape = conv_shape(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias,
                        residual, out_dtype)
    return x_bits.new_empty(shape, dtype=_result_dtype(scale, bias, residual, out_dtype))


@torch.library.register_fake("ovsw::packed_conv2d_sign", lib=_LIB)
def _packed_conv2d_sign_fake(x_bits, w_bits, in_channels, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                             pad_value=0, scale=None, bias=None, residual=None):
    n, ho, wo, cout = _conv_sign_shape(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value,
                                       scale, bias, residual)
    return x_bits.new_empty((n, ho, wo, num_words(cout)), dtype=torch.int32)


@torch.library.register_fake("ovsw::packed_conv2d_act", lib=_LIB)
def _packed_conv2d_act_fake(x_bits, w_bits, in_channels, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                            pad_value=0, scale=None, bias=None, residual=None, min_val=-1.0, max_val=1.0,
                            out_dtype=None):
    n, ho, wo, cout = _conv_act_shape(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale,
                                      bias, residual, min_val, max_val, out_dtype)
    y = x_bits.new_empty((n, ho, wo, cout), dtype=out_dtype or torch.float32)
    return y, x_bits.new_empty((n, ho, wo, num_words(cout)), dtype=torch.int32)


@torch.library.register_fake("ovsw::max_pool2d_act", lib=_LIB)
def _max_pool2d_act_fake(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False, min_val=-1.0,
                         max_val=1.0):
    n, c, ho, wo = pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode, min_val, max_val)
    y = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)  # torch's layout
    return y, x.new_empty((n, ho, wo, num_words(c)), dtype=torch.int32)


# ---------------------------------------------------------------------------------- python entry points
def sign_pack(x: Tensor) -> Tensor:
    """``[..., K]`` float -> ``[..., ceil(K/32)]`` int32 words, bit ``i`` = ``x[..., i] < 0`` (LSB first)."""
    return torch.ops.ovsw.sign_pack(x)


def sign_pack_nchw(x: Tensor) -> Tensor:
    """Conv input helper: NCHW float ``[N, C, H, W]`` (any memory format) -> packed NHWC words
    ``[N, H, W, ceil(C/32)]``, in one pass (no NHWC float copy)."""
    return torch.ops.ovsw.sign_pack_nchw(x)


def packed_linear(x_bits: Tensor, w_bits: Tensor, k: int, scale: Tensor | None = None,
                  bias: Tensor | None = None, residual: Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> Tensor:
    """``x_bits [..., KW] . w_bits [N, KW]`` over ``k`` bits -> int32 ``[..., N]``, or the epilogue
    ``acc * scale + bias + residual`` in ``out_dtype``."""
    return torch.ops.ovsw.packed_linear(x_bits, w_bits, k, scale, bias, residual, out_dtype)


def packed_conv2d(x_bits: Tensor, w_bits: Tensor, in_channels: int, stride: Sequence[int] = (1, 1),
                  padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), pad_value: int = 0,
                  scale: Tensor | None = None, bias: Tensor | None = None, residual: Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> Tensor:
    """Binary conv2d on packed NHWC signs -> NHWC ``[N, Ho, Wo, Cout]`` (see ``reference.packed_conv2d``)."""
    return torch.ops.ovsw.packed_conv2d(
        x_bits, w_bits, in_channels, list(pair(stride, "stride", 1)), list(pair(padding, "padding", 0)),
        list(pair(dilation, "dilation", 1)), pad_value, scale, bias, residual, out_dtype)


def packed_conv2d_sign(x_bits: Tensor, w_bits: Tensor, in_channels: int, stride: Sequence[int] = (1, 1),
                       padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), pad_value: int = 0,
                       scale: Tensor | None = None, bias: Tensor | None = None,
                       residual: Tensor | None = None) -> Tensor:
    """``packed_conv2d`` fused with the next binary layer's sign-and-pack: the sign bits of the float32
    epilogue ``acc * scale + bias + residual`` as packed NHWC words ``[N, Ho, Wo, ceil(Cout/32)]``
    (equal to ``sign_pack(packed_conv2d(..., out_dtype=torch.float32))``), without writing the floats."""
    return torch.ops.ovsw.packed_conv2d_sign(
        x_bits, w_bits, in_channels, list(pair(stride, "stride", 1)), list(pair(padding, "padding", 0)),
        list(pair(dilation, "dilation", 1)), pad_value, scale, bias, residual)


def packed_conv2d_act(x_bits: Tensor, w_bits: Tensor, in_channels: int, stride: Sequence[int] = (1, 1),
                      padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), pad_value: int = 0,
                      scale: Tensor | None = None, bias: Tensor | None = None, residual: Tensor | None = None,
                      min_val: float = -1.0, max_val: float = 1.0,
                      out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``packed_conv2d`` followed by ``hardtanh(min_val, max_val)``: returns ``(y, y_bits)``, ``y`` NHWC
    ``[N, Ho, Wo, Cout]`` in ``out_dtype`` (float32 if None) and ``y_bits = sign_pack(y)``, the next binary
    layer's packed input (equal to the unfused ops; one pass over the output on CPU)."""
    return torch.ops.ovsw.packed_conv2d_act(
        x_bits, w_bits, in_channels, list(pair(stride, "stride", 1)), list(pair(padding, "padding", 0)),
        list(pair(dilation, "dilation", 1)), pad_value, scale, bias, residual, float(min_val), float(max_val),
        out_dtype)


def max_pool2d_act(x: Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, ceil_mode: bool = False,
                   min_val: float = -1.0, max_val: float = 1.0) -> tuple[Tensor, Tensor]:
    """``y = hardtanh(max_pool2d(x, ...), min_val, max_val)`` (NCHW shape, ``x``'s dtype and memory format)
    and ``y_bits = sign_pack_nchw(y)``, the next binary conv's packed input; one pass over the pooled output
    for a channels-last float32 ``x`` on CPU. ``stride`` None means ``kernel_size``, as in ``max_pool2d``."""
    kernel = pair(kernel_size, "kernel_size", 1)
    return torch.ops.ovsw.max_pool2d_act(
        x, list(kernel), list(kernel if stride is None else pair(stride, "stride", 1)),
        list(pair(padding, "padding", 0)), list(pair(dilation, "dilation", 1)), bool(ceil_mode), float(min_val),
        float(max_val))
