"""Sign-and-pack kernels: float -> int32 words of sign bits (bit = ``x < 0``, LSB first, padding 0).

``sign_pack_rows_kernel`` packs the contiguous last dim of a ``[R, K]`` matrix in one coalesced pass;
``sign_pack_nchw_kernel`` packs the channels of an NCHW tensor straight into NHWC words (conv inputs),
reading along the contiguous pixel axis so that no NHWC float copy is needed.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pack_tile(x, BLOCK_R: tl.constexpr, BLOCK_KW: tl.constexpr):
    """``[BLOCK_R, BLOCK_KW * 32]`` floats -> ``[BLOCK_R, BLOCK_KW]`` int32 (``-0.0`` and NaN give 0)."""
    bits = tl.reshape((x < 0).to(tl.int32), (BLOCK_R, BLOCK_KW, 32))
    return tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)


@triton.jit
def sign_pack_rows_kernel(x_ptr, out_ptr, R, K, KW, stride_r, BLOCK_R: tl.constexpr, BLOCK_KW: tl.constexpr):
    """``x [R, K]`` (unit stride along K) -> ``out [R, KW]`` contiguous."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_k = tl.program_id(1) * BLOCK_KW * 32 + tl.arange(0, BLOCK_KW * 32)
    rows = offs_r.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_r + offs_k[None, :],
                mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
    words = _pack_tile(x, BLOCK_R, BLOCK_KW)
    tl.store(out_ptr + rows[:, None] * KW + offs_w[None, :], words,
             mask=(offs_r[:, None] < R) & (offs_w[None, :] < KW))


@triton.jit
def sign_pack_nchw_kernel(x_ptr, out_ptr, C, HW, CW, BLOCK_P: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Contiguous ``x [N, C, HW]`` -> ``out [N, HW, CW]``: each program packs ``BLOCK_P`` pixels of
    ``BLOCK_KW`` channel words of one image."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_w = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_c = tl.program_id(1) * BLOCK_KW * 32 + tl.arange(0, BLOCK_KW * 32)
    n = tl.program_id(2).to(tl.int64)
    x = tl.load(x_ptr + n * C * HW + offs_c[None, :].to(tl.int64) * HW + offs_p[:, None],
                mask=(offs_p[:, None] < HW) & (offs_c[None, :] < C), other=0.0)
    words = _pack_tile(x, BLOCK_P, BLOCK_KW)
    tl.store(out_ptr + (n * HW + offs_p[:, None]) * CW + offs_w[None, :], words,
             mask=(offs_p[:, None] < HW) & (offs_w[None, :] < CW))
