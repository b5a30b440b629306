"""Shared machinery of the OvSW callbacks: one pipeline per optimizer step, one sign state.

All three callbacks act in ``on_before_optimizer_step``: there the gradient is fully accumulated,
already unscaled by the GradScaler under ``16-mixed``, already all-reduced under DDP, and not yet
clipped. The first OvSW callback in ``trainer.callbacks`` runs every OvSW callback of the trainer in the
fixed order AGS -> SAD -> FlipMonitor, so the order the user lists them in does not matter.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_ovsw.callbacks._flat import FlatLayout, SignState
from lightning_ovsw.callbacks._update import sign_update_
from lightning_ovsw.registry import binary_weights


class FlatStep:
    """One optimizer step as the callbacks see it: its binary weights and their gradients as flat
    float32 vectors in ``layout`` order (copies; the gradient gathered on first use), and the GradScaler's
    skip flag (or None).

    Callbacks that change ``grad`` set ``grad_changed``; the leader then copies it back into the
    parameters' ``.grad`` with one multi-tensor copy.
    """

    def __init__(self, layout: FlatLayout, params: dict[str, Tensor], skip: Tensor | None) -> None:
        self.layout = layout
        self.params = [params[n] for n in layout.names]
        self.weights = layout.gather(params)
        self.skip = skip
        self.grad_changed = False

    @cached_property
    def grad(self) -> Tensor:
        return self.layout.gather({n: p.grad for n, p in zip(self.layout.names, self.params, strict=True)})

    def write_back(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], list(self.layout.split(self.grad).values()))


def _found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Device flag of a GradScaler that will skip this step (inf/NaN found by ``unscale_``), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None:
        return None
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = state.get("found_inf_per_device") or {}
    if not found:
        return None
    return torch.stack([v.reshape(()) for v in found.values()]).sum() > 0


class OvSWCallback(Callback):
    """Base of AGS, SAD and FlipMonitor: discovery, ordering, the fused step, logging cadence.

    Each step the leader gathers the step's binary weights and gradients once (``FlatStep``), lets every
    callback ``transform`` the flat gradient (AGS), runs one fused sign update that serves SAD and
    FlipMonitor together (``sign_inputs`` / ``after_signs``), and copies the gradient back once.
    """

    order: ClassVar[int]
    needs_signs: ClassVar[bool] = False

    def __init__(self) -> None:
        self._leader = False
        self._peers: list[OvSWCallback] = []
        self._signs: SignState | None = None
        self._names: dict[int, str] = {}
        self._layouts: dict[tuple[int, ...], FlatLayout] = {}
        self._steps = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise MisconfigurationException(
                f"{type(self).__name__} needs whole (unsharded) binary weights and gradients; "
                f"{type(trainer.strategy).__name__} shards them. Use DDP or a single device."
            )
        weights = binary_weights(pl_module)
        if not weights:
            raise MisconfigurationException(
                f"{type(self).__name__} found no binary layer in {type(pl_module).__name__}; convert the "
                "model with lightning_ovsw.binarize_model(...) or use the zoo in lightning_ovsw.models."
            )
        self._names = {id(p): n for n, p in weights}
        self._layouts = {}
        peers = [cb for cb in trainer.callbacks if isinstance(cb, OvSWCallback)]
        self._leader = peers[0] is self
        if self._leader:
            self._peers = sorted(peers, key=lambda cb: cb.order)
            shared = next((cb._signs for cb in self._peers if cb._signs is not None), None) or SignState()
            for cb in self._peers:
                if cb.needs_signs:
                    if cb._signs is not None and cb._signs is not shared:
                        shared.load({**cb._signs.by_name(), **shared.by_name()})
                    cb._signs = shared

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._leader:
            return
        params = [
            p for group in optimizer.param_groups for p in group["params"] if id(p) in self._names and p.grad is not None
        ]
        if not params:
            return
        key = tuple(id(p) for p in params)
        if key not in self._layouts:
            self._layouts[key] = FlatLayout([(self._names[id(p)], p) for p in params])
        self.run_step(FlatStep(self._layouts[key], {self._names[id(p)]: p for p in params}, _found_inf(trainer, optimizer)))
        for cb in self._peers:
            if cb._steps % trainer.log_every_n_steps == 0:
                metrics = cb.metrics()
                if metrics:
                    for logger in trainer.loggers:
                        logger.log_metrics(metrics, step=trainer.global_step)

    def run_step(self, step: FlatStep) -> None:
        """The leader's work for one optimizer step: every peer's gradient transform (AGS), one fused sign
        update for SAD and FlipMonitor, one copy of the gradient back into the parameters."""
        for cb in self._peers:
            cb._steps += 1
            cb.transform(step)
        inputs: dict[str, Any] = {}
        for cb in self._peers:
            inputs.update(cb.sign_inputs(step))
        if inputs:
            bits = self._signs_of_peers().for_layout(step.layout, step.weights)
            silent = sign_update_(step.weights, bits, step.skip, **inputs)
            for cb in self._peers:
                cb.after_signs(step, silent)
        if step.grad_changed:
            step.write_back()

    def _signs_of_peers(self) -> SignState:
        return next(cb._signs for cb in self._peers if cb._signs is not None)

    def transform(self, step: FlatStep) -> None:
        """Change ``step.grad`` in place (and set ``step.grad_changed``); AGS does."""

    def sign_inputs(self, step: FlatStep) -> dict[str, Any]:
        """Keyword arguments this callback adds to the step's one ``sign_update_`` call."""
        return {}

    def after_signs(self, step: FlatStep, silent: Tensor | None) -> None:
        """Called after the sign update with its silent-weight count (or None)."""

    def metrics(self) -> dict[str, float]:
        """Scalars averaged over the logging interval (read from the device only here); resets them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self._steps}
        if self._signs is not None:
            state["signs"] = self._signs.by_name()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = state_dict["steps"]
        if "signs" in state_dict:
            self._signs = self._signs or SignState()
            self._signs.load(state_dict["signs"])
