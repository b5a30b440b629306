"""Python entry points of the Triton packed kernels, with the semantics of ``kernels/reference.py``.

``triton_sign_pack``, ``triton_packed_linear`` and ``triton_packed_conv2d`` are what the
``torch.library`` ops dispatch to for CUDA tensors. Without an epilogue argument and with ``out_dtype``
None they return the raw int32 accumulator, like the reference. ``mode`` / ``config`` pin one
inner-product mode or one launch config (tests, benchmarks). By default autotuning picks the config and
in-kernel mode per shape, and for large shapes the two-pass path (``DENSE_*``: unpack to bytes, then a
dense ``tl.dot`` kernel) is timed against it once per shape and used when faster.

CUDA graphs: that tuning times kernels, which a stream capture forbids. Run each shape once eagerly
before capturing (``lightning_ovsw.packed_layers.warmup``); a shape that was never run raises a clear error
while the current stream is capturing instead of failing inside Triton. Pinned configs need no warm-up.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (and the two-pass path only when asked).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from .. import ops as validate  # the one validation of every op's arguments
from ..codes import InnerProduct
from ..reference import num_words
from ._common import DENSE_F8, DENSE_I8, DOT_F8, DOT_I8, INTERPRET, POPC
from .conv import packed_conv_kernel, packed_conv_tuned
from .dense import (
    dense_conv_kernel,
    dense_conv_tuned,
    dense_gemm_kernel,
    dense_gemm_tuned,
    unpack_rows_kernel,
)
from .gemm import packed_gemm_kernel, packed_gemm_tuned
from .pack import sign_pack_nchw_kernel, sign_pack_rows_kernel

__all__ = [
    "DENSE_F8",
    "DENSE_I8",
    "DOT_F8",
    "DOT_I8",
    "POPC",
    "triton_packed_conv2d",
    "triton_packed_linear",
    "triton_sign_pack",
    "triton_sign_pack_nchw",
]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


def _check_device(*tensors: Tensor | None) -> None:
    """The Triton-only condition (the rest is validated in ``kernels/ops.py``): CUDA, or the interpreter."""
    device = next(t.device for t in tensors if t is not None)
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"Triton kernels need CUDA tensors (got {device}); use the reference ops on CPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
        )


def _check_int32_indexing(t: Tensor, name: str) -> None:
    if t.numel() > _INT32_MAX:
        raise ValueError(f"{name} has {t.numel()} words; the kernels index with int32: split the batch")


def _epilogue_args(
    out_shape: tuple[int, ...],
    n: int,
    scale: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    out_dtype: torch.dtype | None,
    device: torch.device,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, bool]:
    """Epilogue operands as the kernels read them (fp32 contiguous scale/bias, contiguous residual; validated
    by ``kernels/ops.py``) and the output. The kernels write float32/16 and bfloat16 (``kernels/ops.py`` runs
    float64 through float32)."""
    raw = scale is None and bias is None and residual is None and out_dtype is None
    if out_dtype is not None and out_dtype not in _OUT_DTYPES:
        raise ValueError(f"the Triton kernels write out_dtype {_OUT_DTYPES} or None, got {out_dtype}")
    vectors = [None if v is None else v.reshape(n).to(torch.float32).contiguous() for v in (scale, bias)]
    residual = None if residual is None else residual.contiguous()
    if raw:
        out = torch.empty(out_shape, dtype=torch.int32, device=device)
    else:
        out = torch.empty(out_shape, dtype=out_dtype or torch.float32, device=device)
    return out, vectors[0], vectors[1], residual, raw


def _launch(tuned: dict, kernel, grid, args: tuple, flags: dict, mode: int | None,
            config: triton.Config | None) -> None:
    """Run ``kernel`` with a pinned ``config``, or its autotuner for ``mode`` (None: all modes)."""
    if config is not None:
        kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                     num_stages=config.num_stages)
        return
    tuned[mode][grid](*args, **flags)


def _check_mode(mode: int | None) -> None:
    if mode not in (None, POPC, DOT_I8, DOT_F8, DENSE_I8, DENSE_F8):
        raise ValueError(f"mode must be None, POPC, DOT_I8, DOT_F8, DENSE_I8 or DENSE_F8 (0..4), got {mode!r}"
                         )
    if mode in (DOT_F8, DENSE_F8) and not INTERPRET and torch.cuda.get_device_capability() < (8, 9):
        raise ValueError("the fp8 modes need a GPU with compute capability >= 8.9")


def _unpack(bits: Tensor, k: int, mode: int) -> Tensor:
    """``[R, KW]`` words -> ``[R, KW * 32]`` int8 (``DENSE_I8``) or fp8 e4m3 (``DENSE_F8``, returned as a
    uint8 view) +-1, 0 past ``k``."""
    r, kw = bits.shape
    dtype = torch.float8_e4m3fn if mode == DENSE_F8 else torch.int8
    out = torch.empty(r, kw * 32, device=bits.device, dtype=dtype)
    if r:
        block_r, block_kw = (16, 2) if INTERPRET else (32, 4)
        grid = (triton.cdiv(r, block_r), triton.cdiv(kw, block_kw))
        unpack_rows_kernel[grid](bits, out, r, k, kw, MODE=int(InnerProduct(mode).in_registers), BLOCK_R=block_r,
                                 BLOCK_KW=block_kw)
    return out.view(torch.uint8) if mode == DENSE_F8 else out


_PREFER_DENSE: dict[tuple, bool] = {}
#: Keys of the shapes whose autotuned launch (config and two-pass choice) has run outside a capture.
_TUNED: set[tuple] = set()


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (where kernels cannot be timed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tuned_launch(key: tuple, device: torch.device, launch) -> None:
    """Run ``launch`` (which may autotune and time); inside a CUDA graph capture only for a ``key`` that
    already ran eagerly, so that every choice is cached and the capture records plain launches."""
    if _capturing(device):
        if key not in _TUNED:
            raise RuntimeError(
                f"lightning_ovsw: the packed {key[0]} kernel has not been tuned for this shape yet and cannot "
                "be timed while a CUDA graph is being captured. Run the model once eagerly on an input of "
                "the same shape and dtype before capturing, e.g. lightning_ovsw.packed_layers.warmup(model, x)."
            )
        launch()
        return
    launch()
    _TUNED.add(key)


def _prefer_dense(key: tuple, packed_run, dense_run) -> bool:
    """Whether the two-pass path beats the in-kernel one for this shape: timed once per ``key`` (after
    both have autotuned), like Triton's autotuner, and cached."""
    if key not in _PREFER_DENSE:
        from triton.testing import do_bench

        _PREFER_DENSE[key] = do_bench(dense_run, rep=25) < do_bench(packed_run, rep=25)
    return _PREFER_DENSE[key]


def _auto_dense_mode() -> int | None:
    """The two-pass mode that competes when no mode is given (None: not under the interpreter)."""
    if INTERPRET:
        return None
    return DENSE_F8 if torch.cuda.get_device_capability() >= (8, 9) else DENSE_I8


def triton_sign_pack(x: Tensor) -> Tensor:
    """``[..., K]`` float -> ``[..., ceil(K/32)]`` int32 sign words (bit = ``x < 0``, LSB first)."""
    validate.check_sign_pack(x)
    _check_device(x)
    k = x.shape[-1]
    kw = num_words(k)
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], kw, dtype=torch.int32, device=x.device)
    if rows.shape[0]:
        block_r, block_kw = (16, 2) if INTERPRET else (16, 4)
        grid = (triton.cdiv(rows.shape[0], block_r), triton.cdiv(kw, block_kw))
        sign_pack_rows_kernel[grid](rows, out, rows.shape[0], k, kw, rows.stride(0), BLOCK_R=block_r,
                                    BLOCK_KW=block_kw)
    return out.reshape(*x.shape[:-1], kw)


def triton_sign_pack_nchw(x: Tensor) -> Tensor:
    """NCHW float ``[N, C, H, W]`` -> NHWC words ``[N, H, W, ceil(C/32)]`` for ``triton_packed_conv2d``.

    A channels_last input is packed along its contiguous channels; a contiguous NCHW one by a kernel that
    reads along pixels, so neither makes an NHWC float copy.
    """
    validate.check_sign_pack_nchw(x)
    _check_device(x)
    if x.is_contiguous(memory_format=torch.channels_last):
        return triton_sign_pack(x.permute(0, 2, 3, 1))
    x = x.contiguous()
    n, c, h, w = x.shape
    cw = num_words(c)
    out = torch.empty(n, h, w, cw, dtype=torch.int32, device=x.device)
    if out.numel():
        block_p, block_kw = (16, 2) if INTERPRET else (64, 2)
        grid = (triton.cdiv(h * w, block_p), triton.cdiv(cw, block_kw), n)
        sign_pack_nchw_kernel[grid](x, out, c, h * w, cw, BLOCK_P=block_p, BLOCK_KW=block_kw)
    return out


def triton_packed_linear(
    x_bits: Tensor,
    w_bits: Tensor,
    k: int,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    mode: int | None = None,
    config: triton.Config | None = None,
) -> Tensor:
    """``x_bits [M, KW]`` (or ``[..., KW]``) times ``w_bits [N, KW]`` over ``k`` bits -> ``[M, N]``
    (``[..., N]``): int32 dot products of +-1, or ``acc * scale + bias + residual`` in ``out_dtype``."""
    validate.linear_shape(x_bits, w_bits, k, scale, bias, residual, out_dtype)
    lead = tuple(x_bits.shape[:-1])
    a = x_bits.reshape(-1, x_bits.shape[-1])
    _check_int32_indexing(a, "x_bits")
    _check_int32_indexing(w_bits, "w_bits")
    _check_device(a, w_bits, scale, bias, residual)
    kw = num_words(k)
    m, n = a.shape[0], w_bits.shape[0]
    if m * n > _INT32_MAX:
        raise ValueError(f"output of {m}x{n} exceeds int32 indexing; split the batch")
    out, scale, bias, residual, raw = _epilogue_args(lead + (n,), n, scale, bias, residual, out_dtype,
                                                    a.device)
    if m == 0 or n == 0:
        return out
    _check_mode(mode)
    a, b = a.contiguous(), w_bits.contiguous()
    flags = dict(HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                 RAW=raw)
    epi = (out, _or(scale, out), _or(bias, out), _or(residual, out))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    def packed_run(mode=mode):
        _launch(packed_gemm_tuned, packed_gemm_kernel, grid, (a, b, *epi, m, n, k, kw),
                dict(flags, INTERPRET=INTERPRET), mode, config)

    def dense_run(mode=mode):
        a8, b8 = _unpack(a, k, mode), _unpack(b, k, mode)
        _launch(dense_gemm_tuned, dense_gemm_kernel, grid, (a8, b8, *epi, m, n, kw * 32), flags, mode, config)

    def run() -> None:
        dense = _auto_dense_mode() if mode is None and config is None and m >= 256 and n >= 256 else None
        if mode in (DENSE_I8, DENSE_F8) or (config is not None and config.kwargs["MODE"] in (DENSE_I8, DENSE_F8)):
            dense_run(mode if config is None else config.kwargs["MODE"])
        elif dense is not None and _prefer_dense(("gemm", m, n, kw, *flags.values()), packed_run,
                                                 lambda: dense_run(dense)):
            dense_run(dense)
        else:
            packed_run()

    if config is not None:
        run()
    else:
        _tuned_launch(("gemm", m, n, kw, mode, out.dtype, _dtype(residual), *flags.values()), out.device, run)
    return out


def triton_packed_conv2d(
    x_bits: Tensor,
    w_bits: Tensor,
    in_channels: int,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    pad_value: int = 0,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    mode: int | None = None,
    config: triton.Config | None = None,
) -> Tensor:
    """Binary conv2d on packed NHWC signs: ``x_bits [N, H, W, CW]``, ``w_bits [Cout, KH, KW, CW]`` ->
    NHWC ``[N, Ho, Wo, Cout]``. ``pad_value=0``: padded taps contribute 0 (``F.conv2d`` on ``sign(x)``);
    ``pad_value=1``: the padded input is +1. ``residual`` is NHWC ``[N, Ho, Wo, Cout]``."""
    (sh, sw), (ph, pw), (dh, dw) = (validate.pair(stride, "stride", 1), validate.pair(padding, "padding", 0),
                                    validate.pair(dilation, "dilation", 1))
    n, ho, wo, cout = validate.conv_shape(x_bits, w_bits, in_channels, (sh, sw), (ph, pw), (dh, dw), pad_value, scale,
                                          bias, residual, out_dtype)
    _check_int32_indexing(x_bits, "x_bits")
    _check_int32_indexing(w_bits, "w_bits")
    _check_device(x_bits, w_bits, scale, bias, residual)
    cw = num_words(in_channels)
    _, h, w, _ = x_bits.shape
    _, kh, kw_, _ = w_bits.shape
    m = n * ho * wo
    if m * cout > _INT32_MAX:
        raise ValueError(f"output of {m}x{cout} exceeds int32 indexing; split the batch")
    out, scale, bias, residual, raw = _epilogue_args((n, ho, wo, cout), cout, scale, bias, residual,
                                                    out_dtype, x_bits.device)
    if m == 0 or cout == 0:
        return out
    _check_mode(mode)
    x, wt = x_bits.contiguous(), w_bits.contiguous()
    flags = dict(PAD_ONE=pad_value == 1, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None, RAW=raw)
    epi = (out, _or(scale, out), _or(bias, out), _or(residual, out))
    geometry = (h, w, ho, wo, kh, kw_, sh, sw, ph, pw, dh, dw)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)

    def packed_run(mode=mode):
        args = (x, wt, *epi, m, cout, in_channels, cw, *geometry)
        _launch(packed_conv_tuned, packed_conv_kernel, grid, args, dict(flags, INTERPRET=INTERPRET), mode,
                config)

    def dense_run(mode=mode):
        x8 = _unpack(x.view(-1, cw), in_channels, mode)
        w8 = _unpack(wt.view(-1, cw), in_channels, mode)
        _launch(dense_conv_tuned, dense_conv_kernel, grid, (x8, w8, *epi, m, cout, in_channels, cw * 32,
                                                             *geometry), flags, mode, config)

    def run() -> None:
        dense = _auto_dense_mode() if mode is None and config is None and m >= 1024 and cout >= 64 else None
        if mode in (DENSE_I8, DENSE_F8) or (config is not None and config.kwargs["MODE"] in (DENSE_I8, DENSE_F8)):
            dense_run(mode if config is None else config.kwargs["MODE"])
        elif dense is not None and _prefer_dense(("conv", m, cout, cw, *geometry, *flags.values()), packed_run,
                                                 lambda: dense_run(dense)):
            dense_run(dense)
        else:
            packed_run()

    if config is not None:
        run()
    else:
        key = ("conv", m, cout, in_channels, *geometry, mode, out.dtype, _dtype(residual), *flags.values())
        _tuned_launch(key, out.device, run)
    return out


def _dtype(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """A pointer argument for an absent optional operand (never read: its constexpr flag is off)."""
    return dummy if t is None else t
