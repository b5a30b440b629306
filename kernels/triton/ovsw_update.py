"""The OvSW callbacks' per-step update as two Triton kernels over flat buffers (Eq. 14-16).

``ags_rows_kernel``: one program per filter row; both norms in one pass, the Eq. 14 factor, the scaled
row written back in a second pass over the (cache-resident) row. ``sign_update_kernel``: one pass over
every binary weight for the previous-sign bits, the SAD tracker and penalty, and the flip counts, with
the GradScaler's skip flag read on the device. PyTorch references: ``lightning_ovsw.callbacks._update``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BYTES_PER_PROGRAM = 128  # 1024 weights per program


@triton.jit
def ags_rows_kernel(w_ptr, g_ptr, starts_ptr, lengths_ptr, ratio_ptr, delta, BLOCK: tl.constexpr):
    """Row ``r`` = ``[start, start + K)`` of the flat vectors: ``G[r] *= factor`` (Eq. 14), ratio out."""
    row = tl.program_id(0)
    start = tl.load(starts_ptr + row)
    length = tl.load(lengths_ptr + row)
    g_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    w_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, length, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < length
        g = tl.load(g_ptr + start + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + start + offs, mask=mask, other=0.0)
        g_sq += g * g
        w_sq += w * w
    g_norm = tl.maximum(tl.sqrt(tl.sum(g_sq, axis=0)), 1e-6)
    w_norm = tl.maximum(tl.sqrt(tl.sum(w_sq, axis=0)), 1e-3)
    ratio = g_norm / w_norm
    factor = tl.where(ratio < delta, delta * w_norm / g_norm, 1.0)
    tl.store(ratio_ptr + row, ratio)
    for k in range(0, length, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < length
        g = tl.load(g_ptr + start + offs, mask=mask, other=0.0)
        tl.store(g_ptr + start + offs, g * factor, mask=mask)


@triton.jit
def sign_update_kernel(
    w_ptr, bits_ptr, skip_ptr, g_ptr, tracker_ptr, counts_ptr, silent_ptr,
    n, n_bytes, momentum, one_minus_momentum, threshold, penalty,
    HAS_SKIP: tl.constexpr, HAS_TRACKER: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_COUNTS: tl.constexpr,
    BYTES: tl.constexpr,
):
    """``BYTES`` bytes of packed previous signs (``8 * BYTES`` weights) per program; see
    ``lightning_ovsw.callbacks._update.sign_update_`` for the equations."""
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    offs = byte[:, None].to(tl.int64) * 8 + bit[None, :]
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    negative = (w < 0).to(tl.int32)
    prev_bytes = tl.load(bits_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    prev = (prev_bytes[:, None] >> bit[None, :]) & 1
    flipped = (negative != prev) & mask
    if HAS_SKIP:
        skip = tl.load(skip_ptr) != 0
        flipped = flipped & (skip == 0)
        negative = tl.where(skip, prev, negative)
    packed = tl.sum((negative & mask.to(tl.int32)) << bit[None, :], axis=1)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)
    if HAS_COUNTS:
        counts = tl.load(counts_ptr + offs, mask=mask, other=0)
        tl.store(counts_ptr + offs, counts + flipped.to(tl.int32), mask=mask)
    if HAS_TRACKER:
        tracker = tl.load(tracker_ptr + offs, mask=mask, other=0.0)
        updated = momentum * tracker + one_minus_momentum * flipped.to(tl.float32)
        if HAS_SKIP:
            updated = tl.where(skip, tracker, updated)
        tl.store(tracker_ptr + offs, updated, mask=mask)
        silent = (updated < threshold) & mask
        if HAS_GRAD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            tl.store(g_ptr + offs, g + tl.where(silent, penalty * w, 0.0), mask=mask)
        tl.store(silent_ptr + tl.program_id(0), tl.sum(tl.sum(silent.to(tl.int32), axis=1), axis=0))


def _check(name: str, t: Tensor | None, dtype: torch.dtype, numel: int | None = None) -> None:
    if t is None:
        return
    if t.dtype != dtype or not t.is_contiguous() or (numel is not None and t.numel() != numel):
        raise ValueError(f"{name}: need a contiguous {dtype} tensor of {numel} elements, got {t.dtype} {tuple(t.shape)}")


def triton_ags_scale_(weights: Tensor, grad: Tensor, row_starts: Tensor, row_lengths: Tensor, max_row_length: int,
                      delta: float) -> Tensor:
    """Triton ``ags_scale_`` (see ``lightning_ovsw.callbacks._update``) on the flat float32 ``weights`` /
    ``grad``: row ``r`` is ``[row_starts[r], row_starts[r] + row_lengths[r])`` (int64 tensors on their device),
    ``max_row_length`` the longest row (sizes the block). Returns the per-row ratio ``||G[r]|| / ||W[r]||``."""
    _check("weights", weights, torch.float32)
    _check("grad", grad, torch.float32, weights.numel())
    rows = row_starts.numel()
    _check("row_starts", row_starts, torch.int64)
    _check("row_lengths", row_lengths, torch.int64, rows)
    ratio = torch.empty(rows, dtype=torch.float32, device=grad.device)
    block = min(1024, triton.next_power_of_2(max(int(max_row_length), 16)))
    ags_rows_kernel[(rows,)](weights, grad, row_starts, row_lengths, ratio, float(delta), BLOCK=block)
    return ratio


def triton_sign_update_(
    weights: Tensor,
    bits: Tensor,
    skip: Tensor | None,
    grad: Tensor | None,
    tracker: Tensor | None,
    counts: Tensor | None,
    momentum: float,
    threshold: float,
    penalty: float,
) -> Tensor | None:
    """Triton ``sign_update_`` (see ``lightning_ovsw.callbacks._update``)."""
    n = weights.numel()
    _check("weights", weights, torch.float32)
    _check("bits", bits, torch.uint8, (n + 7) // 8)
    _check("grad", grad, torch.float32, n)
    _check("tracker", tracker, torch.float32, n)
    _check("counts", counts, torch.int32, n)
    grid = triton.cdiv(bits.numel(), _BYTES_PER_PROGRAM)
    silent = torch.empty(grid if tracker is not None else 1, dtype=torch.int32, device=weights.device)
    sign_update_kernel[(grid,)](
        weights, bits, skip if skip is not None else bits, grad if grad is not None else weights,
        tracker if tracker is not None else weights, counts if counts is not None else bits, silent,
        n, bits.numel(), float(momentum), float(1 - momentum), float(threshold), float(penalty),
        HAS_SKIP=skip is not None, HAS_TRACKER=tracker is not None, HAS_GRAD=grad is not None,
        HAS_COUNTS=counts is not None, BYTES=_BYTES_PER_PROGRAM,
    )
    if tracker is None:
        return None
    count = silent.sum()
    return count if skip is None else count * ~skip
