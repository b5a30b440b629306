"""FlipMonitor: weight sign flipping of every binary layer (the paper's silent-weight analysis)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_ovsw.callbacks._base import FlatStep, OvSWCallback
from lightning_ovsw.callbacks._flat import FlatState


class FlipMonitor(OvSWCallback):
    """Per binary layer and overall: flip rate per optimizer step (averaged over the logging interval),
    silent-weight fraction over the epoch and over the run so far, and at epoch end TensorBoard
    histograms of ``|W|`` and of per-weight flip counts plus a flip-count-vs-``|W|`` heat map.

    Scalars (``flips/rate/<layer>``, ``flips/silent_run/<layer>``, ``flips/silent_epoch/<layer>``, ``.../all``)
    go to every logger; a custom-scalars dashboard groups them in TensorBoard. ``flip_counts`` (int32 per
    weight) is in the checkpoint and is what ``benchmarks/flip_analysis.py`` reads.

    Args:
        histograms: write histograms and the heat map to TensorBoard at each epoch end.
        heatmap_bins: bins per axis of the flip-count-vs-``|W|`` image.
    """

    order = 2
    needs_signs = True

    def __init__(self, histograms: bool = True, heatmap_bins: int = 64) -> None:
        super().__init__()
        if heatmap_bins < 2:
            raise ValueError(f"FlipMonitor(heatmap_bins={heatmap_bins}): need at least 2 bins.")
        self.histograms = histograms
        self.heatmap_bins = heatmap_bins
        self._counts = FlatState(torch.int32, 0)
        self._epoch_start: dict[str, Tensor] = {}
        self._interval_start: dict[str, Tensor] = {}
        self._interval_steps: int | Tensor = 0
        self._weights: dict[str, Tensor] = {}

    @property
    def flip_counts(self) -> dict[str, Tensor]:
        """How often each weight changed sign so far (int32, shaped like the weight), by parameter name."""
        return self._counts.by_name()

    def sign_inputs(self, step: FlatStep) -> dict[str, Any]:
        return {"counts": self._counts.for_layout(step.layout)}

    def after_signs(self, step: FlatStep, silent: Tensor | None) -> None:
        self._weights.update(zip(step.layout.names, step.params, strict=True))
        self._interval_steps = self._interval_steps + (1 if step.skip is None else (~step.skip).long())

    def rates(self) -> dict[str, float]:
        """Flip rate per step over the interval, per layer and ``all``; resets the interval.

        Flips in the interval are the growth of ``flip_counts`` since the last call (read only here).
        """
        steps = float(self._interval_steps)
        flip_counts = self.flip_counts
        totals = {name: counts.sum(dtype=torch.int64) for name, counts in flip_counts.items()}
        out, flips, numel = {}, 0.0, 0
        for name, counts in flip_counts.items():
            interval = (totals[name] - self._interval_start.get(name, 0)).item()
            out[name] = interval / (counts.numel() * steps) if steps else 0.0
            flips, numel = flips + interval, numel + counts.numel()
        out["all"] = flips / (numel * steps) if steps and numel else 0.0
        self._interval_start, self._interval_steps = totals, 0
        return out

    def silent_fractions(self, epoch: bool = False) -> dict[str, float]:
        """Share of weights that never flipped (over the run, or over the current epoch)."""
        flipped = {
            name: counts > self._epoch_start.get(name, 0) if epoch else counts > 0
            for name, counts in self.flip_counts.items()
        }
        out = {name: 1.0 - f.float().mean().item() for name, f in flipped.items()}
        total = sum(f.numel() for f in flipped.values())
        if total:
            out["all"] = 1.0 - sum(f.sum().item() for f in flipped.values()) / total
        return out

    def metrics(self) -> dict[str, float]:
        out = {f"flips/rate/{k}": v for k, v in self.rates().items()}
        out.update({f"flips/silent_run/{k}": v for k, v in self.silent_fractions().items()})
        return out

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = [*self._names.values(), "all"]
        layout = {
            "OvSW flips": {
                "flip rate per step": ["Multiline", [f"flips/rate/{n}" for n in names]],
                "silent weights (run)": ["Multiline", [f"flips/silent_run/{n}" for n in names]],
                "silent weights (epoch)": ["Multiline", [f"flips/silent_epoch/{n}" for n in names]],
            },
            "OvSW gradients": {
                "AGS": ["Multiline", ["ags/scaled_fraction", "ags/mean_grad_weight_ratio"]],
                "SAD": ["Multiline", ["sad/penalized_fraction"]],
            },
        }
        for logger in self._tensorboards(trainer):
            logger.experiment.add_custom_scalars(layout)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {f"flips/silent_epoch/{k}": v for k, v in self.silent_fractions(epoch=True).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.histograms:
            for logger in self._tensorboards(trainer):
                self._write_histograms(logger.experiment, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = {name: counts.clone() for name, counts in self.flip_counts.items()}

    def _write_histograms(self, writer: Any, step: int) -> None:
        for name, counts in self.flip_counts.items():
            magnitude = self._weights[name].detach().abs().float().flatten().cpu()
            flips = counts.flatten().float().cpu()
            writer.add_histogram(f"flips/abs_weight/{name}", magnitude, step)
            writer.add_histogram(f"flips/flip_count/{name}", flips, step)
            writer.add_image(f"flips/count_vs_abs_weight/{name}", self.heatmap(magnitude, flips), step)

    def heatmap(self, magnitude: Tensor, flips: Tensor) -> Tensor:
        """``[1, bins, bins]`` image: x = ``|W|``, y = flip count (up), brightness = log(1 + weights)."""
        b = self.heatmap_bins
        hist, _ = torch.histogramdd(
            torch.stack([flips, magnitude], dim=1), bins=[b, b],
            range=[0.0, max(flips.max().item(), 1.0), 0.0, max(magnitude.max().item(), 1e-12)],
        )
        img = torch.log1p(hist).flip(0)
        return (img / img.max().clamp_min(1e-12)).unsqueeze(0)

    @staticmethod
    def _tensorboards(trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "flip_counts": self.flip_counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._counts.load(state_dict["flip_counts"])
        self._interval_start = {name: counts.sum(dtype=torch.int64) for name, counts in self.flip_counts.items()}
