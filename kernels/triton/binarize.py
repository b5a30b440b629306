"""Triton kernels of the binary layers' training path (design §2): one pass per job, statistics in float32.

- ``sign_moments_kernel`` + ``inv_std_kernel``: ``sign(x)`` (+1 for ``x >= 0``) written in the conv's dtype
  and, in the same read of ``x``, the per-sample ``1 / sqrt(var + 1e-5)`` (unbiased ``var`` over all
  non-batch elements): block means and centred sums of squares, merged with Chan et al.'s pairwise formula
  (no float32 copy of ``x``).
- ``sign_backward_kernel``: ``dL/dx = dL/dsign * f'(x * inv_std) * inv_std`` with the estimator's
  derivative ``f'`` (Bi-Real ``max(0, 2 - 2|x_hat|)``, clipped ``[|x_hat| <= 1]`` or ``1``).
- ``weight_kernel``: per output row ``alpha_i = mean(|W[i] - mean|) / sqrt(var_unbiased + 1e-5)`` (1 for a
  one-element row) and ``sign(W[i])`` (or ``alpha_i * sign(W[i])``) in the conv's dtype.

Every kernel reads any float dtype and works on flat, dense buffers (rows contiguous). ``ESTIMATOR`` is a
``kernels.codes.Estimator`` code.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import EST_APPROX_SIGN, EST_CLIPPED_STE

#: ``+ 1e-5`` under the square roots, as ``lightning_ovsw.layers``.
EPS = tl.constexpr(1e-5)


@triton.jit
def sign_moments_kernel(x_ptr, sign_ptr, mean_ptr, m2_ptr, M, NB, MOMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``(row, b)`` on ``x[row, b*BLOCK : (b+1)*BLOCK]``: writes ``sign(x)`` (+1 for ``x >= 0``,
    ``-0.0`` and NaN included) in ``sign_ptr``'s dtype and, if ``MOMENTS``, the block's mean and centred sum
    of squares, so the forward reads ``x`` once for both (the sign does not need the std)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    x = tl.load(x_ptr + row * M + offs, mask=mask, other=0.0)
    tl.store(sign_ptr + row * M + offs, tl.where(x < 0, -1.0, 1.0).to(sign_ptr.dtype.element_ty), mask=mask)
    if MOMENTS:
        x = x.to(tl.float32)
        count = tl.minimum(M - blk * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        d = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row * NB + blk, mean)
        tl.store(m2_ptr + row * NB + blk, tl.sum(d * d, axis=0))


@triton.jit
def inv_std_kernel(mean_ptr, m2_ptr, out_ptr, M, NB, BLOCK: tl.constexpr, NB_BLOCK: tl.constexpr):
    """Program ``row``: merge the row's block moments (Chan et al.) into ``1 / sqrt(M2 / (M - 1) + EPS)``."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((NB_BLOCK,), tl.float32)
    for start in range(0, NB, NB_BLOCK):
        b = start + tl.arange(0, NB_BLOCK)
        count = tl.where(b < NB, tl.minimum(M - b * BLOCK, BLOCK), 0).to(tl.float32)
        acc += count * tl.load(mean_ptr + row * NB + b, mask=b < NB, other=0.0)
    mean = tl.sum(acc, axis=0) / M
    acc = tl.zeros((NB_BLOCK,), tl.float32)
    for start in range(0, NB, NB_BLOCK):
        b = start + tl.arange(0, NB_BLOCK)
        count = tl.where(b < NB, tl.minimum(M - b * BLOCK, BLOCK), 0).to(tl.float32)
        delta = tl.load(mean_ptr + row * NB + b, mask=b < NB, other=0.0) - mean
        acc += tl.load(m2_ptr + row * NB + b, mask=b < NB, other=0.0) + count * delta * delta
    var = tl.sum(acc, axis=0) / tl.maximum(M - 1, 1)
    # one element per sample has no spread: 1, as ``standardize_input`` leaves such an input unscaled
    tl.store(out_ptr + row, tl.where(M > 1, 1.0 / tl.sqrt(var + EPS), 1.0))


@triton.jit
def sign_backward_kernel(grad_ptr, x_ptr, inv_std_ptr, out_ptr, M, ESTIMATOR: tl.constexpr, HAS_STD: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Program ``(row, b)``: ``out = grad * f'(x * s) * s`` on block ``b`` of sample ``row``, ``s = inv_std[row]``
    (1 without ``HAS_STD``); a 2-D grid so that ``s`` is one scalar load, not a per-element division."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptrs = row * M + offs
    g = tl.load(grad_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_STD:
        s = tl.load(inv_std_ptr + row)
    else:
        s = 1.0
    if ESTIMATOR == EST_APPROX_SIGN:
        x_hat = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32) * s
        g = g * tl.maximum(2.0 - 2.0 * tl.abs(x_hat), 0.0)
    elif ESTIMATOR == EST_CLIPPED_STE:
        x_hat = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32) * s
        g = tl.where(tl.abs(x_hat) <= 1.0, g, 0.0)
    tl.store(out_ptr + ptrs, (g * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def weight_kernel(w_ptr, out_ptr, alpha_ptr, K, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``row``: the standardized scale ``alpha[row]`` and ``sign(W[row])`` into ``out_ptr`` (times
    ``alpha[row]`` if ``SCALED``: the conv then applies the scale, no pass over its output is needed)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * K
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + base + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc += w
    mean = tl.sum(acc, axis=0) / K
    sq = tl.zeros((BLOCK,), tl.float32)
    ab = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + base + offs, mask=offs < K, other=0.0).to(tl.float32)
        d = tl.where(offs < K, w - mean, 0.0)
        sq += d * d
        ab += tl.abs(d)
    alpha = tl.sum(ab, axis=0) / K / tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(K - 1, 1) + EPS)
    alpha = tl.where(K > 1, alpha, 1.0)  # a one-element row: 1, as ``standardized_scale``
    tl.store(alpha_ptr + row, alpha)
    one = alpha if SCALED else 1.0
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + base + offs, mask=offs < K, other=0.0)
        tl.store(out_ptr + base + offs, tl.where(w < 0, -one, one).to(out_ptr.dtype.element_ty), mask=offs < K)
