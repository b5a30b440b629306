"""Base of AGS, SAD and FlipMonitor: attach to the Trainer's one ``OvSWCoordinator``, log on its cadence.

All three act in ``on_before_optimizer_step``: there the gradient is fully accumulated, already unscaled
by the GradScaler under ``16-mixed``, already all-reduced under DDP, and not yet clipped. The coordinator
(``_coordinator``) owns the registry of binary weights and the step pipeline; each callback holds its own
configuration and state, under explicit checkpoint keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_ovsw.callbacks._coordinator import FlatStep, OvSWCoordinator, canonical_name, coordinator_for


class OvSWCallback(Callback):
    """One OvSW part. Subclasses override the pipeline hooks (``transform``, ``sign_inputs``, ``after_signs``),
    ``metrics`` and their state (``state_dict`` / ``load_state_dict`` / ``state_names`` / ``drop_state``)."""

    order: ClassVar[int]
    needs_signs: ClassVar[bool] = False

    def __init__(self) -> None:
        self._coordinator: OvSWCoordinator | None = None
        self._pending_signs: dict[str, Tensor] | None = None
        self._steps = 0

    @property
    def coordinator(self) -> OvSWCoordinator:
        if self._coordinator is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet.")
        return self._coordinator

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise MisconfigurationException(
                f"{type(self).__name__} needs whole (unsharded) binary weights and gradients; "
                f"{type(trainer.strategy).__name__} shards them. Use DDP or a single device."
            )
        self._coordinator = coordinator_for(trainer)
        self._coordinator.attach(self)
        if self._pending_signs is not None:
            self._coordinator.signs.load(self._pending_signs)
            self._pending_signs = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.coordinator.resolve(pl_module)  # after configure_model: models converted there are found

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        coordinator = self.coordinator
        if not coordinator.drives(self, trainer):
            return
        coordinator.step(trainer, optimizer)
        for cb in coordinator.callbacks:
            cb._steps += 1
        if trainer.global_step % trainer.log_every_n_steps == 0:
            coordinator.check_finite(trainer.global_step)
            metrics: dict[str, float] = {}
            for cb in coordinator.callbacks:
                metrics.update(cb.metrics())
            publish(trainer, metrics)

    # ------------------------------------------------------------------ pipeline hooks
    def transform(self, step: FlatStep) -> None:
        """Change ``step.grad`` in place (and set ``step.grad_changed``); AGS does."""

    def sign_inputs(self, step: FlatStep) -> dict[str, Any]:
        """Keyword arguments this callback adds to the step's one ``sign_update_`` call."""
        return {}

    def after_signs(self, step: FlatStep, silent: Tensor | None) -> None:
        """Called after the sign update with its silent-weight count (or None)."""

    def metrics(self) -> dict[str, float]:
        """Scalars over the logging interval (read from the device only here); resets the interval."""
        return {}

    # ------------------------------------------------------------------ state
    def state_names(self) -> set[str]:
        """Layer names this callback holds checkpointed state for (to reconcile with the model)."""
        return set()

    def drop_state(self, name: str) -> None:
        """Forget the state of a checkpointed layer the model does not have."""

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self._steps}
        if self._coordinator is not None and self._coordinator.sign_owner() is self:
            state["signs"] = self._coordinator.signs.by_name()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = int(state_dict.get("steps", 0))
        if "signs" in state_dict:
            signs = {canonical_name(n): t for n, t in state_dict["signs"].items()}
            if self._coordinator is not None:
                self._coordinator.signs.load(signs)
            else:
                self._pending_signs = signs


def publish(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger at the current step and put them in ``trainer.callback_metrics``
    (as ``LearningRateMonitor`` does), so ``ModelCheckpoint`` / ``EarlyStopping`` can monitor them."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
