"""SAD, Silence Awareness Decaying (paper Eq. 15-16)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ovsw.callbacks._base import OvSWCallback
from lightning_ovsw.callbacks._coordinator import FlatStep, canonical_name, check_real
from lightning_ovsw.callbacks._flat import FlatState

TRACKER_INITS = ("zeros", "ones")


class SADCallback(OvSWCallback):
    """Elementwise on every binary weight, once per optimizer step (Eq. 15-16)::

        T <- m * T + (1 - m) * [sign(W) != S_prev]
        G <- G + penalty * [T < threshold] * W
        S_prev <- sign(W)

    ``T`` is float32 (initialised to zeros, or ones), ``S_prev`` one bit per weight, shared with
    ``FlipMonitor``. At the first step ``S_prev`` is taken from the weights (no flip counted).
    Runs after AGS and before gradient clipping, over all binary weights at once in one fused update
    with FlipMonitor's (one kernel on CUDA). Logs ``sad/penalized_fraction``.

    Args:
        penalty: ``sigma``, finite and >= 0 (9e-4 CIFAR-10, 2e-5 ImageNet).
        momentum: ``m`` in [0, 1) (paper: 0.999).
        threshold: ``tau``, finite and > 0 (paper: 1e-4).
        tracker_init: ``"zeros"`` or ``"ones"``.
    """

    order = 1
    needs_signs = True

    def __init__(
        self, penalty: float = 9e-4, momentum: float = 0.999, threshold: float = 1e-4, tracker_init: str = "zeros"
    ) -> None:
        super().__init__()
        self.penalty = check_real("SADCallback", "penalty", penalty, low=0.0)
        self.momentum = check_real("SADCallback", "momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.threshold = check_real("SADCallback", "threshold", threshold, low=0.0, low_open=True)
        if tracker_init not in TRACKER_INITS:
            raise ValueError(f"SADCallback(tracker_init={tracker_init!r}): choose one of {TRACKER_INITS}.")
        self.tracker_init = tracker_init
        self._trackers = FlatState(torch.float32, 0.0 if tracker_init == "zeros" else 1.0)
        self._penalized: Tensor | None = None
        self._total: Tensor | float | None = None

    @property
    def trackers(self) -> dict[str, Tensor]:
        """``T`` of every binary weight seen so far, by parameter name."""
        return self._trackers.by_name()

    def sign_inputs(self, step: FlatStep) -> dict[str, Any]:
        step.grad_changed = True
        return {
            "grad": step.grad, "tracker": self._trackers.for_layout(step.layout),
            "momentum": self.momentum, "threshold": self.threshold, "penalty": self.penalty,
        }

    def after_signs(self, step: FlatStep, silent: Tensor | None) -> None:
        total = step.layout.numel if step.skip is None else (~step.skip).float() * step.layout.numel
        self._penalized = silent.float() if self._penalized is None else self._penalized + silent
        self._total = total if self._total is None else self._total + total

    def metrics(self) -> dict[str, float]:
        if self._total is None:
            return {}
        out = {"sad/penalized_fraction": float(self._penalized) / max(float(self._total), 1.0)}
        self._penalized = self._total = None
        return out

    def state_names(self) -> set[str]:
        return set(self.trackers)

    def drop_state(self, name: str) -> None:
        self._trackers.drop(name)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "trackers": self.trackers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._trackers.load({canonical_name(n): t for n, t in state_dict.get("trackers", {}).items()})
