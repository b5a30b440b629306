"""Packed binary conv2d as an implicit GEMM over NHWC packed input.

Rows are output pixels (``M = N * Ho * Wo``), columns output channels, and the reduction runs over the
``KH * KW`` taps times the channel words of each tap (weights ``[Cout, KH, KW, CW]``, K-contiguous).
Exact zero padding (design §2): a tap that falls outside the input contributes 0 with ``pad_value=0``
and ``+1 * w`` with ``pad_value=1``:

- ``POPC``: a valid tap adds ``C - 2 * popcount(x ^ w)``; with ``pad_value=0`` invalid taps are masked
  out and the row's ``C`` term counts only its valid taps; with ``pad_value=1`` an invalid tap loads
  x bits 0 (= +1) and counts like any other.
- ``DOT_I8`` / ``DOT_F8``: unpacked ``x`` is set to 0 at channel-padding bits and (``pad_value=0``) at
  invalid taps, so ``tl.dot`` needs no correction.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    DOT_F8,
    DOT_I8,
    INTERPRET,
    MODE_DOT_F8,
    MODE_DOT_I8,
    MODE_POPC,
    POPC,
    grouped_tile,
    popcount,
    store_epilogue,
    unpack_signs,
)
from .gemm import _cfg, by_mode

INTERPRET_CONFIGS = {
    POPC: _cfg(POPC, 16, 16, 2, 4, 1),
    DOT_I8: _cfg(DOT_I8, 16, 16, 2, 4, 1),
    DOT_F8: _cfg(DOT_F8, 16, 16, 2, 4, 1),
}


def conv_configs() -> list[triton.Config]:
    """Autotune candidates (a single config under the interpreter). ResNet-18 has 64..512 input channels
    (2..16 words per tap) and 64..512 output channels."""
    if INTERPRET:
        return [INTERPRET_CONFIGS[DOT_I8]]
    return [  # none of these spills registers when compiled for sm_90 (larger int8/fp8 tiles did)
        _cfg(POPC, 64, 64, 2, 8, 3),
        _cfg(POPC, 32, 64, 4, 8, 3),
        _cfg(DOT_I8, 64, 64, 2, 4, 3),
        _cfg(DOT_I8, 128, 64, 2, 8, 3),
        _cfg(DOT_I8, 64, 128, 2, 8, 3),
        _cfg(DOT_I8, 128, 128, 2, 8, 3),
        _cfg(DOT_F8, 128, 64, 2, 8, 3),
        _cfg(DOT_F8, 64, 128, 2, 8, 3),
    ]


@triton.jit
def packed_conv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    M,
    COUT,
    C,
    CW,
    H,
    W,
    HO,
    WO,
    KH,
    KW,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    PAD_ONE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RAW: tl.constexpr,
    INTERPRET: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M pixels, BLOCK_N channels]`` tile of the NHWC output ``[M, COUT]``."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, COUT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kw = tl.arange(0, BLOCK_KW)
    m = offs_m % M
    ow = m % WO
    oh = (m // WO) % HO
    x_img = (m // (WO * HO)) * (H * W * CW)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    w_rows = (offs_n % COUT) * (KH * KW * CW)
    n_chunks = tl.cdiv(CW, BLOCK_KW)
    if MODE == MODE_DOT_F8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for r in range(0, KH * KW * n_chunks):
        tap = r // n_chunks
        cws = (r % n_chunks) * BLOCK_KW + offs_kw
        ih = ih0 + (tap // KW) * DH
        iw = iw0 + (tap % KW) * DW
        valid = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cmask = cws < CW
        a = tl.load(x_ptr + (x_img + (ih * W + iw) * CW)[:, None] + cws[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0)
        b = tl.load(w_ptr + (w_rows + tap * CW)[:, None] + cws[None, :], mask=cmask[None, :], other=0)
        if MODE == MODE_POPC:
            x = a[:, None, :] ^ b[None, :, :]
            if not PAD_ONE:
                x = tl.where(valid[:, None, None], x, 0)
            acc += tl.sum(popcount(x, INTERPRET), axis=2)
        else:
            chan = ((r % n_chunks) * BLOCK_KW * 32 + tl.arange(0, BLOCK_KW * 32)) < C
            if PAD_ONE:
                keep = chan[None, :]
            else:
                keep = valid[:, None] & chan[None, :]
            av = unpack_signs(a, keep, BLOCK_M, BLOCK_KW, MODE, True)
            bv = unpack_signs(b, None, BLOCK_N, BLOCK_KW, MODE, False)
            if MODE == MODE_DOT_I8:
                acc += tl.dot(av, tl.trans(bv), out_dtype=tl.int32)
            else:
                acc += tl.dot(av, tl.trans(bv), out_dtype=tl.float32)
    if MODE == MODE_POPC:
        if PAD_ONE:
            res = KH * KW * C - 2 * acc
        else:
            taps = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for tap in range(0, KH * KW):
                ih = ih0 + (tap // KW) * DH
                iw = iw0 + (tap % KW) * DW
                taps += ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)).to(tl.int32)
            res = (taps * C)[:, None] - 2 * acc
    else:
        res = acc.to(tl.int32)
    store_epilogue(res, offs_m, offs_n, M, COUT, out_ptr, scale_ptr, bias_ptr, res_ptr, HAS_SCALE,
                   HAS_BIAS, HAS_RES, RAW)


CONV_KEY = ["M", "COUT", "C", "H", "W", "KH", "KW", "SH", "DH", "PAD_ONE", "HAS_RES"]
packed_conv_tuned = by_mode(conv_configs(), INTERPRET_CONFIGS, packed_conv_kernel, CONV_KEY)
