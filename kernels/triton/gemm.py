"""Packed binary GEMM ``[M, KW] x [N, KW] -> [M, N]`` (both operands K-contiguous int32 words).

Two inner-product modes, a constexpr of each autotune config (design §3):

- ``POPC``: ``K - 2 * sum popcount(a XOR b)`` over ``[BLOCK_M, BLOCK_N, BLOCK_KW]`` word triples;
- ``DOT_I8`` / ``DOT_F8``: each word tile is unpacked in registers to +-1 and fed to ``tl.dot``. Words
  past ``KW`` load as 0 and padding bits are 0 in both operands, so each of the ``Kp - K`` extra bits of
  the processed tiles adds exactly ``+1 * +1``: the kernel subtracts ``Kp - K``. Each tile's ``tl.dot``
  starts from zero and is added to the accumulator, so fp8 partial sums stay small integers (exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DENSE_F8,
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


def _cfg(mode: int, bm: int, bn: int, bkw: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"MODE": mode, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "GROUP_M": group},
        num_warps=warps,
        num_stages=stages,
    )


#: Explicit single configs used under the interpreter (one per mode; fp8 also runs there) and by tests
#: that pin a mode.
INTERPRET_CONFIGS = {
    POPC: _cfg(POPC, 16, 16, 4, 4, 1),
    DOT_I8: _cfg(DOT_I8, 16, 16, 2, 4, 1),
    DOT_F8: _cfg(DOT_F8, 16, 16, 2, 4, 1),
}


def gemm_configs() -> list[triton.Config]:
    """Autotune candidates. Under ``TRITON_INTERPRET=1`` a single small config (autotuning would run every
    config through the interpreter; tests pin the other mode explicitly); on the GPU all modes, large
    tiles for compute-bound shapes and narrow-N / deep-K tiles that stream the packed weights at full
    bandwidth for small batches."""
    if INTERPRET:
        return [INTERPRET_CONFIGS[DOT_I8]]
    configs = [
        # popcount: batch ~1 (one row per program, many weight rows streamed), small batches, mid sizes
        _cfg(POPC, 1, 32, 32, 4, 4),
        _cfg(POPC, 1, 64, 16, 4, 4),
        _cfg(POPC, 1, 128, 8, 4, 3),
        _cfg(POPC, 16, 32, 16, 4, 4),
        _cfg(POPC, 16, 64, 8, 4, 4),
        _cfg(POPC, 32, 64, 4, 8, 3),
        _cfg(POPC, 64, 64, 2, 8, 3),
        # int8 tensor cores (configs that spilled registers when compiled for sm_90 were dropped)
        _cfg(DOT_I8, 16, 32, 8, 4, 4),
        _cfg(DOT_I8, 16, 64, 8, 4, 4),
        _cfg(DOT_I8, 64, 128, 4, 8, 3),
        _cfg(DOT_I8, 128, 128, 4, 8, 3),
        _cfg(DOT_I8, 128, 256, 2, 8, 3),
        _cfg(DOT_I8, 256, 128, 2, 8, 3),
    ]
    # fp8 tensor cores (sm >= 89; pruned at run time elsewhere)
    configs += [
        _cfg(DOT_F8, 16, 64, 8, 4, 4),
        _cfg(DOT_F8, 128, 128, 4, 8, 3),
        _cfg(DOT_F8, 64, 256, 2, 8, 3),
        _cfg(DOT_F8, 256, 64, 2, 8, 3),
    ]
    return configs


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop fp8 configs on GPUs without fp8 tensor cores (capability < 8.9); the interpreter runs them."""
    if INTERPRET or torch.cuda.get_device_capability() >= (8, 9):
        return configs
    return [c for c in configs if c.kwargs["MODE"] not in (DOT_F8, DENSE_F8)]


@triton.jit
def packed_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    M,
    N,
    K,
    KW,
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
    """One ``[BLOCK_M, BLOCK_N]`` output tile; ``a [M, KW]``, ``b [N, KW]`` row-major int32 words."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kw = tl.arange(0, BLOCK_KW)
    # ragged M/N: wrap the load rows (their results are masked at the store), no load masks on rows
    a_ptrs = a_ptr + (offs_m % M)[:, None] * KW + offs_kw[None, :]
    b_ptrs = b_ptr + (offs_n % N)[:, None] * KW + offs_kw[None, :]
    if MODE == MODE_DOT_F8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kw0 in range(0, KW, BLOCK_KW):
        kmask = (kw0 + offs_kw) < KW
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=kmask[None, :], other=0)
        if MODE == MODE_POPC:
            acc += tl.sum(popcount(a[:, None, :] ^ b[None, :, :], INTERPRET), axis=2)
        elif MODE == MODE_DOT_I8:
            av = unpack_signs(a, None, BLOCK_M, BLOCK_KW, MODE, False)
            bv = unpack_signs(b, None, BLOCK_N, BLOCK_KW, MODE, False)
            acc += tl.dot(av, tl.trans(bv), out_dtype=tl.int32)
        else:
            av = unpack_signs(a, None, BLOCK_M, BLOCK_KW, MODE, False)
            bv = unpack_signs(b, None, BLOCK_N, BLOCK_KW, MODE, False)
            acc += tl.dot(av, tl.trans(bv), out_dtype=tl.float32)
        a_ptrs += BLOCK_KW
        b_ptrs += BLOCK_KW
    if MODE == MODE_POPC:
        res = K - 2 * acc
    else:
        extra = tl.cdiv(KW, BLOCK_KW) * BLOCK_KW * 32 - K
        res = acc.to(tl.int32) - extra
    store_epilogue(res, offs_m, offs_n, M, N, out_ptr, scale_ptr, bias_ptr, res_ptr, HAS_SCALE, HAS_BIAS,
                   HAS_RES, RAW)


def autotuned(kernel, configs: list[triton.Config], key: list[str]):
    """``kernel`` autotuned over ``configs`` per ``key`` (fp8 configs pruned where unsupported)."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune_configs})(
        kernel
    )


def by_mode(configs: list[triton.Config], interpret_configs: dict, kernel, key: list[str],
            modes: tuple[int, ...] = (POPC, DOT_I8, DOT_F8)) -> dict:
    """Autotuned launchers: ``None`` -> all ``modes`` compete; one mode -> that mode's configs only
    (for tests and benchmarks that measure the modes separately)."""
    tuned = {None: autotuned(kernel, configs, key)}
    for mode in modes:
        own = [interpret_configs[mode]] if INTERPRET else [c for c in configs if c.kwargs["MODE"] == mode]
        tuned[mode] = autotuned(kernel, own, key)
    return tuned


GEMM_KEY = ["M", "N", "KW", "HAS_RES"]
packed_gemm_tuned = by_mode(gemm_configs(), INTERPRET_CONFIGS, packed_gemm_kernel, GEMM_KEY)
