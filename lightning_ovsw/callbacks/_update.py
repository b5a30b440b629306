"""The fused OvSW gradient/state updates over flat buffers (Eq. 14-16), in PyTorch and in Triton.

``ags_scale_`` and ``sign_update_`` take the flat vectors of one step (see ``_flat``). On CUDA they run
as one Triton kernel each (``lightning_ovsw.kernels.triton.ovsw_update``); elsewhere as a handful of
whole-vector PyTorch ops, which are also the reference. The switch is the binary layers' one
(``kernels.train_ops.wants_triton``): ``LIGHTNING_OVSW_FUSED=0`` forces PyTorch, ``=1`` forces Triton (on CPU
tensors only under ``TRITON_INTERPRET=1``: how CI tests the kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ovsw.callbacks._flat import FlatLayout, pack_bits, unpack_bits
from lightning_ovsw.kernels.train_ops import wants_triton


@torch.no_grad()
def ags_scale_(layout: FlatLayout, weights: Tensor, grad: Tensor, delta: float) -> Tensor:
    """Eq. 14 on every filter row of the flat ``grad`` in place; returns ``||G[i]|| / ||W[i]||`` per row
    (with the clamps ``1e-6`` / ``1e-3``), in layout row order."""
    if wants_triton(grad) and grad.dtype == torch.float32:  # float64 models take the PyTorch path
        from lightning_ovsw.kernels.triton.ovsw_update import triton_ags_scale_

        return triton_ags_scale_(weights, grad, layout.row_starts, layout.row_lengths,
                                 max(k for *_, k in layout.groups), delta)
    return torch_ags_scale_(layout, weights, grad, delta)


def torch_ags_scale_(layout: FlatLayout, weights: Tensor, grad: Tensor, delta: float) -> Tensor:
    """PyTorch reference of ``ags_scale_``: one norm per distinct row length."""
    g_rows = [grad[s:e].view(r, k) for s, e, r, k in layout.groups]
    w_rows = [weights[s:e].view(r, k) for s, e, r, k in layout.groups]
    g = torch.cat([rows.norm(dim=1) for rows in g_rows]).clamp_min(1e-6)
    p = torch.cat([rows.norm(dim=1) for rows in w_rows]).clamp_min(1e-3)
    ratio = g / p
    factor = torch.where(ratio < delta, delta * p / g, torch.ones_like(g))
    for rows, f in zip(g_rows, factor.split([r for _, _, r, _ in layout.groups]), strict=True):
        rows.mul_(f.unsqueeze(1))
    return ratio


@torch.no_grad()
def sign_update_(
    weights: Tensor,
    bits: Tensor,
    skip: Tensor | None,
    grad: Tensor | None = None,
    tracker: Tensor | None = None,
    counts: Tensor | None = None,
    momentum: float = 0.999,
    threshold: float = 1e-4,
    penalty: float = 0.0,
) -> Tensor | None:
    """One step of the sign state over flat vectors, all in place (Eq. 15-16)::

        flipped = [sign(W) != S_prev] and not skip
        T <- m * T + (1 - m) * flipped        (kept as is on a skipped step)
        G <- G + penalty * [T < threshold] * W
        counts <- counts + flipped
        S_prev <- sign(W)                     (kept as is on a skipped step)

    ``bits`` holds ``S_prev`` packed (``1`` = negative). ``tracker`` / ``grad`` are given for SAD,
    ``counts`` for FlipMonitor. Returns the number of silent weights ``[T < threshold]`` (a device scalar,
    zero on a skipped step) when ``tracker`` is given, else None.
    """
    if wants_triton(weights) and weights.dtype == torch.float32:
        from lightning_ovsw.kernels.triton.ovsw_update import triton_sign_update_

        return triton_sign_update_(weights, bits, skip, grad, tracker, counts, momentum, threshold, penalty)
    return torch_sign_update_(weights, bits, skip, grad, tracker, counts, momentum, threshold, penalty)


def torch_sign_update_(
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
    """PyTorch reference of ``sign_update_``."""
    negative = weights < 0
    prev = unpack_bits(bits, weights.numel())
    flipped = negative != prev
    if skip is not None:
        flipped &= ~skip
        negative = torch.where(skip, prev, negative)
    bits.copy_(pack_bits(negative))
    if counts is not None:
        counts += flipped
    if tracker is None:
        return None
    updated = momentum * tracker + (1 - momentum) * flipped.float()
    tracker.copy_(updated if skip is None else torch.where(skip, tracker, updated))
    silent = tracker < threshold
    if grad is not None:
        grad.add_(penalty * silent * weights)
    count = silent.sum()
    return count if skip is None else count * ~skip
