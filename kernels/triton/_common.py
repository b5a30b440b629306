"""Building blocks shared by the packed Triton kernels: popcount, in-register unpacking, the epilogue.

Bit layout (design §3): int32 words, least significant bit first, bit 1 meaning -1, so over ``K`` valid
bits ``dot(a, b) = K - 2 * popcount(a XOR b)``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ..codes import Estimator, InnerProduct

#: ``triton.jit`` reads the variable when a kernel is decorated, so it is read once, at import.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Inner-product modes (``kernels/codes.py``), a constexpr of every GEMM/conv config: the enum members for
# Python code, and their ``tl.constexpr`` twins (``MODE_*``, ``EST_*``) for use inside the kernels.
POPC, DOT_I8, DOT_F8, DENSE_I8, DENSE_F8 = (int(m) for m in InnerProduct)  # plain ints for configs
MODE_POPC = tl.constexpr(int(InnerProduct.POPC))
MODE_DOT_I8 = tl.constexpr(int(InnerProduct.DOT_I8))
MODE_DOT_F8 = tl.constexpr(int(InnerProduct.DOT_F8))
MODE_DENSE_F8 = tl.constexpr(int(InnerProduct.DENSE_F8))
EST_APPROX_SIGN = tl.constexpr(int(Estimator.APPROX_SIGN))
EST_CLIPPED_STE = tl.constexpr(int(Estimator.CLIPPED_STE))


@triton.jit
def popcount(x, INTERPRET: tl.constexpr):
    """Bits set in each int32 of ``x``: libdevice ``popc`` on the GPU, shift-and-mask (SWAR) when
    interpreting (libdevice does not run under ``TRITON_INTERPRET=1``).

    The SWAR steps are exact on int32 with arithmetic shifts: every mask clears the sign-filled bits.
    """
    if INTERPRET:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        return x & 0x3F
    else:
        return libdevice.popc(x)


@triton.jit
def unpack_signs(words, keep, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr, MODE: tl.constexpr,
                 MASKED: tl.constexpr):
    """``[ROWS, BLOCK_KW]`` int32 words -> ``[ROWS, BLOCK_KW * 32]`` of +-1 (int8, or fp8 e4m3 if
    ``MODE == DOT_F8``), bit ``j`` of word ``w`` at column ``32 * w + j``; if ``MASKED``, 0 where the
    boolean ``keep`` (broadcastable to the result) is false.

    Shifts only (no gathers): ``(w << (31 - j)) >> 31`` is 0 or -1 (arithmetic shift of bit ``j``).
    """
    j = tl.arange(0, 32)
    s = tl.reshape((words[:, :, None] << (31 - j)[None, None, :]) >> 31, (ROWS, BLOCK_KW * 32))
    if MODE == MODE_DOT_F8:
        # e4m3: +1 = 0x38, -1 = 0xB8 (the sign bit set), 0 = 0x00
        v = (s & 0x80) | 0x38
    else:
        v = s | 1
    if MASKED:
        v = tl.where(keep, v, 0)
    if MODE == MODE_DOT_F8:
        return v.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return v.to(tl.int8)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), ``GROUP_M`` row tiles at a time so that neighbouring programs
    share operand tiles in L2 (Triton's matrix-multiplication tutorial)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_size)
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def store_epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    out_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RAW: tl.constexpr,
):
    """Store ``acc`` (int32 ``[BLOCK_M, BLOCK_N]``) into the row-major ``[M, N]`` output, either raw or as
    ``acc * scale[n] + bias[n] + residual[m, n]`` in float32, cast to the output's dtype (the reference
    epilogue's order)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    if RAW:
        tl.store(out_ptr + idx, acc, mask=mask)
    else:
        y = acc.to(tl.float32)
        nmask = offs_n < N
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + offs_n, mask=nmask, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0)[None, :]
        if HAS_RES:
            y = y + tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)
