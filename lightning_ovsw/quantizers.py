"""Sign estimators: the forward is always ``sign`` with ``sign(0) = +1``; they differ in the gradient.

Each estimator is a small ``torch.autograd.Function`` whose backward is written out in its docstring,
in the style of Larq's ``quantizers.py``. ``x`` is the estimator's input and ``g = dL/dy`` the incoming
gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_ovsw.kernels import codes

ActivationEstimator = Literal["approx_sign", "ste", "clipped_ste"]
WeightEstimator = Literal["ste", "clipped_ste"]

ACTIVATION_ESTIMATORS: tuple[str, ...] = tuple(codes.ACTIVATION_ESTIMATORS)
WEIGHT_ESTIMATORS: tuple[str, ...] = tuple(codes.WEIGHT_ESTIMATORS)


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0`` (``-0.0`` included), ``-1`` where ``x < 0``; same dtype as ``x``.

    ``torch.sign`` maps 0 to 0; a binary network must not, and packed inference (bit = ``x < 0``)
    must agree with training bit for bit.
    """
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


class _ApproxSign(torch.autograd.Function):
    """Bi-Real Net's piecewise-polynomial estimator: ``dL/dx = g * max(0, 2 - 2|x|)``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_min(0)


class _STESign(torch.autograd.Function):
    """Plain straight-through estimator: ``dL/dx = g``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _ClippedSTESign(torch.autograd.Function):
    """Clipped straight-through estimator (hardtanh derivative): ``dL/dx = g * [|x| <= 1]``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


_ESTIMATORS = {"approx_sign": _ApproxSign, "ste": _STESign, "clipped_ste": _ClippedSTESign}


def approx_sign(x: Tensor) -> Tensor:
    """``sign`` with Bi-Real's gradient ``max(0, 2 - 2|x|)``."""
    return _ApproxSign.apply(x)


def ste_sign(x: Tensor) -> Tensor:
    """``sign`` with the identity gradient."""
    return _STESign.apply(x)


def clipped_ste_sign(x: Tensor) -> Tensor:
    """``sign`` with the gradient ``[|x| <= 1]``."""
    return _ClippedSTESign.apply(x)


def apply_estimator(name: str, x: Tensor) -> Tensor:
    """Binarize ``x`` with the estimator called ``name`` (one of ``ACTIVATION_ESTIMATORS``)."""
    return _ESTIMATORS[name].apply(x)
