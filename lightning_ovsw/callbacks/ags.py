"""AGS, Adaptive Gradient Scaling (paper Eq. 13-14)."""

from __future__ import annotations

from lightning_ovsw.callbacks._base import OvSWCallback
from lightning_ovsw.callbacks._coordinator import FlatStep, check_real


class AGSCallback(OvSWCallback):
    """Per output filter ``i`` of every binary weight (Eq. 14)::

        g = max(||G[i]||, 1e-6);  p = max(||W[i]||, 1e-3)
        if g / p < delta:  G[i] <- (delta * p / g) * G[i]

    Runs on the true gradient of each optimizer step (see ``callbacks._base``), before SAD and
    before gradient clipping, over all binary weights at once (one kernel on CUDA). Logs
    ``ags/scaled_fraction`` (share of filters scaled up) and ``ags/mean_grad_weight_ratio``.

    Args:
        delta: the threshold ``lambda``, finite and > 0 (0.04 for the CIFAR-10 recipes, 0.01 for ImageNet).
    """

    order = 0

    def __init__(self, delta: float = 0.04) -> None:
        super().__init__()
        self.delta = check_real("AGSCallback", "delta", delta, low=0.0, low_open=True)
        self._scaled = self._filters = self._ratio_sum = None

    def transform(self, step: FlatStep) -> None:
        ratio = self.coordinator.ags_scale_(step, self.delta)
        keep = 1.0 if step.skip is None else (~step.skip).float()
        scaled = (ratio < self.delta).sum().float() * keep
        ratio_sum = ratio.nan_to_num(0.0, 0.0, 0.0).sum() * keep
        count = keep * ratio.numel()
        if self._scaled is None:
            self._scaled, self._ratio_sum, self._filters = scaled, ratio_sum, count
        else:
            self._scaled, self._ratio_sum, self._filters = (
                self._scaled + scaled, self._ratio_sum + ratio_sum, self._filters + count,
            )

    def metrics(self) -> dict[str, float]:
        if self._filters is None:
            return {}
        n = max(float(self._filters), 1.0)
        out = {"ags/scaled_fraction": float(self._scaled) / n, "ags/mean_grad_weight_ratio": float(self._ratio_sum) / n}
        self._scaled = self._filters = self._ratio_sum = None
        return out
