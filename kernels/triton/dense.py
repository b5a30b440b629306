"""Two-pass modes (``DENSE_I8`` / ``DENSE_F8``): unpack packed operands to +-1 bytes once, then dense
``tl.dot`` GEMM / implicit-GEMM conv kernels whose main loop only loads and multiplies.

``unpack_rows_kernel`` writes ``[R, KW * 32]`` int8 or fp8 e4m3 values, +-1 for the first ``K`` bits of
each row and 0 past them, so the dense kernels need no padding correction: padded channels, padded
words and (``pad_value=0``) out-of-image taps all contribute 0. The dense kernels read fp8 operands
through uint8 views and bitcast after the masked load (whose fill value must be the integer 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import DENSE_F8, DENSE_I8, INTERPRET, MODE_DENSE_F8, grouped_tile, store_epilogue, unpack_signs
from .gemm import by_mode


def _cfg(mode: int, bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"MODE": mode, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


INTERPRET_CONFIGS = {DENSE_I8: _cfg(DENSE_I8, 16, 16, 64, 4, 1), DENSE_F8: _cfg(DENSE_F8, 16, 16, 64, 4, 1)}


def dense_configs() -> list[triton.Config]:
    """Large tensor-core tiles (8192^3-class GEMMs, batch-64+ convs); one config under the interpreter.
    Tiles whose sm_90 build spilled registers (``acc += tl.dot`` holds a second accumulator) are left out."""
    if INTERPRET:
        return [INTERPRET_CONFIGS[DENSE_I8]]
    return [
        _cfg(DENSE_I8, 128, 128, 256, 8, 3),
        _cfg(DENSE_I8, 128, 128, 128, 8, 4),
        _cfg(DENSE_I8, 128, 64, 64, 4, 4),
        _cfg(DENSE_F8, 128, 128, 256, 8, 3),
        _cfg(DENSE_F8, 128, 128, 128, 8, 4),
        _cfg(DENSE_F8, 64, 256, 128, 8, 3),
        _cfg(DENSE_F8, 128, 64, 64, 4, 4),
    ]


@triton.jit
def unpack_rows_kernel(bits_ptr, out_ptr, R, K, KW, MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_KW: tl.constexpr):
    """``bits [R, KW]`` int32 -> ``out [R, KW * 32]`` of +-1 (0 past ``K``): int8 or fp8 as the in-register
    ``MODE`` (``DOT_I8`` / ``DOT_F8``) of the two-pass mode (``InnerProduct.in_registers``)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_k = tl.program_id(1) * BLOCK_KW * 32 + tl.arange(0, BLOCK_KW * 32)
    rows = offs_r.to(tl.int64)
    words = tl.load(bits_ptr + rows[:, None] * KW + offs_w[None, :],
                    mask=(offs_r[:, None] < R) & (offs_w[None, :] < KW), other=0)
    v = unpack_signs(words, (offs_k < K)[None, :], BLOCK_R, BLOCK_KW, MODE, True)
    tl.store(out_ptr + rows[:, None] * (KW * 32) + offs_k[None, :], v,
             mask=(offs_r[:, None] < R) & (offs_k[None, :] < KW * 32))


@triton.jit
def dense_gemm_kernel(a_ptr, b_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr, M, N, KP,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                      RAW: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``a [M, KP] x b [N, KP]^T`` of +-1/0 bytes (K-contiguous) -> int32 dots, then the epilogue."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * KP + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N).to(tl.int64)[:, None] * KP + offs_k[None, :]
    if MODE == MODE_DENSE_F8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, KP, BLOCK_K):
        kmask = (k0 + offs_k) < KP
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=kmask[None, :], other=0)
        if MODE == MODE_DENSE_F8:
            a = a.to(tl.float8e4nv, bitcast=True)
            b = b.to(tl.float8e4nv, bitcast=True)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        else:
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    store_epilogue(acc.to(tl.int32), offs_m, offs_n, M, N, out_ptr, scale_ptr, bias_ptr, res_ptr, HAS_SCALE,
                   HAS_BIAS, HAS_RES, RAW)


@triton.jit
def dense_conv_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr, M, COUT, C, CP, H, W, HO, WO,
                      KH, KW, SH, SW, PH, PW, DH, DW, PAD_ONE: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RAW: tl.constexpr, MODE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """Implicit-GEMM conv over unpacked NHWC ``x [N, H, W, CP]`` and ``w [COUT, KH, KW, CP]`` bytes
    (+-1 for ``c < C``, 0 past). Out-of-image taps load 0 (``pad_value=0``) or +1 on real channels."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, COUT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m = offs_m % M
    ow = m % WO
    oh = (m // WO) % HO
    x_img = (m // (WO * HO)).to(tl.int64) * (H * W * CP)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    w_rows = (offs_n % COUT).to(tl.int64) * (KH * KW * CP)
    n_chunks = tl.cdiv(CP, BLOCK_K)
    if MODE == MODE_DENSE_F8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for r in range(0, KH * KW * n_chunks):
        tap = r // n_chunks
        cs = (r % n_chunks) * BLOCK_K + offs_k
        ih = ih0 + (tap // KW) * DH
        iw = iw0 + (tap % KW) * DW
        valid = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cmask = cs < CP
        a = tl.load(x_ptr + (x_img + (ih * W + iw) * CP)[:, None] + cs[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0)
        if PAD_ONE:
            # +1 (int8 1, or e4m3 0x38) on the real channels of out-of-image taps
            one = tl.where(cs < C, 0x38 if MODE == MODE_DENSE_F8 else 1, 0).to(a.dtype)
            a = tl.where(valid[:, None], a, one[None, :])
        b = tl.load(w_ptr + (w_rows + tap * CP)[:, None] + cs[None, :], mask=cmask[None, :], other=0)
        if MODE == MODE_DENSE_F8:
            a = a.to(tl.float8e4nv, bitcast=True)
            b = b.to(tl.float8e4nv, bitcast=True)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        else:
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    store_epilogue(acc.to(tl.int32), offs_m, offs_n, M, COUT, out_ptr, scale_ptr, bias_ptr, res_ptr,
                   HAS_SCALE, HAS_BIAS, HAS_RES, RAW)


dense_gemm_tuned = by_mode(dense_configs(), INTERPRET_CONFIGS, dense_gemm_kernel, ["M", "N", "KP", "HAS_RES"],
                           modes=(DENSE_I8, DENSE_F8))
dense_conv_tuned = by_mode(dense_configs(), INTERPRET_CONFIGS, dense_conv_kernel,
                           ["M", "COUT", "C", "H", "W", "KH", "KW", "SH", "DH", "PAD_ONE", "HAS_RES"],
                           modes=(DENSE_I8, DENSE_F8))
