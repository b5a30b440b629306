"""FlipMonitor: weight sign flipping of every binary layer (the paper's silent-weight analysis)."""

from __future__ import annotations

import numbers
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_ovsw.callbacks import dashboard
from lightning_ovsw.callbacks._base import OvSWCallback, publish
from lightning_ovsw.callbacks._coordinator import FlatStep, canonical_name
from lightning_ovsw.callbacks._flat import FlatState


class FlipMonitor(OvSWCallback):
    """Per binary layer and overall: flip rate per optimizer step of the optimizer that owns the layer
    (averaged over the logging interval), the share of silent (never flipped) weights over the epoch and
    over the run so far, and at each epoch end in TensorBoard: histograms of ``|W|`` and of per-weight flip
    counts, a flip-count-vs-``|W|`` figure per layer and overall, and the paper's Tab. 1(a) table (share of
    never-flipped weights per ``|W|`` bin).

    Scalars (``flips/rate/<layer>``, ``flips/silent_run/<layer>``, ``flips/silent_epoch/<layer>``, ``.../all``)
    go to every logger on the Trainer's ``log_every_n_steps`` cadence and into ``trainer.callback_metrics``
    (so ``ModelCheckpoint(monitor="flips/rate/all")`` works). A custom-scalars dashboard groups them by tag
    pattern. ``flip_counts`` (int32 per weight) is checkpointed and read by ``benchmarks/flip_analysis.py``.

    Args:
        histograms: write histograms, figures and the table to TensorBoard at each epoch end.
        heatmap_bins: bins along ``|W|`` of the flip-count figure (an integer >= 2).
    """

    order = 2
    needs_signs = True

    def __init__(self, histograms: bool = True, heatmap_bins: int = 64) -> None:
        super().__init__()
        if isinstance(heatmap_bins, bool) or not isinstance(heatmap_bins, numbers.Integral) or heatmap_bins < 2:
            raise ValueError(f"FlipMonitor(heatmap_bins={heatmap_bins!r}): need an integer number of bins >= 2.")
        if not isinstance(histograms, bool):
            raise TypeError(f"FlipMonitor(histograms={histograms!r}): histograms must be True or False.")
        self.histograms = histograms
        self.heatmap_bins = int(heatmap_bins)
        self._counts = FlatState(torch.int32, 0)
        self._epoch_start = FlatState(torch.int32, 0)  # counts at the start of ``_epoch_start_epoch``
        self._epoch_start_epoch: int | None = None
        self._interval_start: dict[str, Tensor] = {}
        self._interval_steps: dict[tuple[str, ...], int | Tensor] = {}  # unskipped steps per layout

    @property
    def flip_counts(self) -> dict[str, Tensor]:
        """How often each weight changed sign so far (int32, shaped like the weight), by layer name."""
        return self._counts.by_name()

    def sign_inputs(self, step: FlatStep) -> dict[str, Any]:
        return {"counts": self._counts.for_layout(step.layout)}

    def after_signs(self, step: FlatStep, silent: Tensor | None) -> None:
        key = step.layout.key
        self._interval_steps[key] = self._interval_steps.get(key, 0) + (1 if step.skip is None else (~step.skip).long())

    def rates(self) -> dict[str, float]:
        """Flips per weight and per step over the interval, per layer (steps of the optimizer that stepped
        it) and ``all`` (all flips over all weight-steps); resets the interval."""
        steps: dict[str, float] = {}
        for key, n in self._interval_steps.items():
            for name in key:
                steps[name] = steps.get(name, 0.0) + float(n)
        out, flips, weight_steps = {}, 0.0, 0.0
        totals = {}
        for name, counts in self.flip_counts.items():
            totals[name] = counts.sum(dtype=torch.int64)
            interval = float(totals[name] - self._interval_start.get(name, 0))
            n = steps.get(name, 0.0)
            out[name] = interval / (counts.numel() * n) if n else 0.0
            flips, weight_steps = flips + interval, weight_steps + counts.numel() * n
        out["all"] = flips / weight_steps if weight_steps else 0.0
        self._interval_start, self._interval_steps = totals, {}
        return out

    def silent_fractions(self, epoch: bool = False) -> dict[str, float]:
        """Share of weights that never flipped (over the run, or over the current epoch)."""
        start = self._epoch_start.by_name() if epoch else {}
        flipped = {name: counts > start.get(name, 0) for name, counts in self.flip_counts.items()}
        out = {name: 1.0 - f.float().mean().item() for name, f in flipped.items()}
        total = sum(f.numel() for f in flipped.values())
        if total:
            out["all"] = 1.0 - sum(f.sum().item() for f in flipped.values()) / total
        return out

    def metrics(self) -> dict[str, float]:
        out = {f"flips/rate/{k}": v for k, v in self.rates().items()}
        out.update({f"flips/silent_run/{k}": v for k, v in self.silent_fractions().items()})
        return out

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        for logger in self._tensorboards(trainer):
            logger.experiment.add_custom_scalars(dashboard.custom_scalars_layout())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start_epoch != trainer.current_epoch:  # kept when resuming inside this epoch
            self._epoch_start.load({name: counts.clone() for name, counts in self.flip_counts.items()})
            self._epoch_start_epoch = trainer.current_epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.coordinator.check_finite(trainer.global_step)
        publish(trainer, {f"flips/silent_epoch/{k}": v for k, v in self.silent_fractions(epoch=True).items()})
        if self.histograms:
            for logger in self._tensorboards(trainer):
                self._write_dashboard(logger.experiment, trainer.current_epoch, trainer.global_step)

    def _write_dashboard(self, writer: Any, epoch: int, step: int) -> None:
        params, magnitudes, all_flips = self.coordinator.params, [], []
        for name, counts in self.flip_counts.items():
            if name not in params:
                continue
            magnitude = params[name].detach().abs().float().flatten().cpu()
            flips = counts.flatten().float().cpu()
            magnitudes.append(magnitude)
            all_flips.append(flips)
            writer.add_histogram(f"flips/abs_weight/{name}", magnitude, step)
            writer.add_histogram(f"flips/flip_count/{name}", flips, step)
            figure = dashboard.flip_count_figure(magnitude, flips, self.heatmap_bins, f"{name}, epoch {epoch}")
            writer.add_figure(f"flips/count_vs_abs_weight/{name}", figure, step)
        if magnitudes:
            magnitude, flips = torch.cat(magnitudes), torch.cat(all_flips)
            figure = dashboard.flip_count_figure(magnitude, flips, self.heatmap_bins, f"all layers, epoch {epoch}")
            writer.add_figure("flips/count_vs_abs_weight/all", figure, step)
            table = dashboard.format_table(dashboard.never_flipped_by_magnitude(magnitude, flips))
            writer.add_text("flips/never_flipped_by_abs_weight/all", table, step)

    @staticmethod
    def _tensorboards(trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def state_names(self) -> set[str]:
        return set(self.flip_counts)

    def drop_state(self, name: str) -> None:
        self._counts.drop(name)
        self._epoch_start.drop(name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "flip_counts": self.flip_counts,
            "epoch_start_counts": self._epoch_start.by_name(), "epoch_start_epoch": self._epoch_start_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._counts.load({canonical_name(n): t for n, t in state_dict.get("flip_counts", {}).items()})
        self._epoch_start.load({canonical_name(n): t for n, t in state_dict.get("epoch_start_counts", {}).items()})
        self._epoch_start_epoch = state_dict.get("epoch_start_epoch")
        self._interval_start = {name: counts.sum(dtype=torch.int64) for name, counts in self.flip_counts.items()}
