"""Shared machinery of the OvSW callbacks: one pipeline per optimizer step, one sign state.

All three callbacks act in ``on_before_optimizer_step``: there the gradient is fully accumulated,
already unscaled by the GradScaler under ``16-mixed``, already all-reduced under DDP, and not yet
clipped. The first OvSW callback in ``trainer.callbacks`` runs every OvSW callback of the trainer in the
fixed order AGS -> SAD -> FlipMonitor, so the order the user lists them in does not matter.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_ovsw.registry import binary_weights

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor into uint8 (8 per byte, LSB first)."""
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask.reshape(-1), mask.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of ``pack_bits``: a flat bool tensor of ``numel`` elements."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


class SignState:
    """Signs of every binary weight one optimizer step ago, one bit per weight (``1`` = negative).

    ``flips`` compares the current signs with them, returns the flip mask (``sign(W) != S_prev``) and
    stores the current signs; on a step the GradScaler skips nothing is stored and no flip is counted.
    """

    def __init__(self) -> None:
        self.prev: dict[str, Tensor] = {}

    def flips(self, name: str, weight: Tensor, skip: Tensor | None) -> Tensor:
        negative = (weight.detach() < 0).reshape(-1)
        if name not in self.prev:
            self.prev[name] = pack_bits(negative)
            return torch.zeros_like(weight, dtype=torch.bool)
        prev = unpack_bits(self.prev[name].to(weight.device), negative.numel())
        flipped = negative != prev
        if skip is not None:
            flipped = flipped & ~skip
            negative = torch.where(skip, prev, negative)
        self.prev[name] = pack_bits(negative)
        return flipped.view_as(weight)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.prev)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.prev = dict(state)


class StepContext:
    """What one optimizer step gives the callbacks: the binary weights it updates, once-computed flips."""

    def __init__(self, weights: list[tuple[str, Tensor]], skip: Tensor | None, signs: SignState | None):
        self.weights = weights
        self.skip = skip
        self._signs = signs
        self._flips: dict[str, Tensor] = {}

    def flips(self, name: str, weight: Tensor) -> Tensor:
        if name not in self._flips:
            assert self._signs is not None
            self._flips[name] = self._signs.flips(name, weight, self.skip)
        return self._flips[name]


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
    """Base of AGS, SAD and FlipMonitor: discovery, ordering, sharing, logging cadence."""

    order: ClassVar[int]
    needs_signs: ClassVar[bool] = False

    def __init__(self) -> None:
        self._leader = False
        self._peers: list[OvSWCallback] = []
        self._signs: SignState | None = None
        self._names: dict[int, str] = {}
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
        peers = [cb for cb in trainer.callbacks if isinstance(cb, OvSWCallback)]
        self._leader = peers[0] is self
        if self._leader:
            self._peers = sorted(peers, key=lambda cb: cb.order)
            shared = next((cb._signs for cb in self._peers if cb._signs is not None), None) or SignState()
            for cb in self._peers:
                if cb.needs_signs:
                    if cb._signs is not None and cb._signs is not shared:
                        shared.prev.update(cb._signs.prev)
                    cb._signs = shared

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._leader:
            return
        weights = [
            (self._names[id(p)], p)
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in self._names and p.grad is not None
        ]
        if not weights:
            return
        ctx = StepContext(weights, _found_inf(trainer, optimizer), self._peers_signs())
        for cb in self._peers:
            cb._steps += 1
            cb.apply(ctx)
            if cb._steps % trainer.log_every_n_steps == 0:
                metrics = cb.metrics()
                if metrics:
                    for logger in trainer.loggers:
                        logger.log_metrics(metrics, step=trainer.global_step)

    def _peers_signs(self) -> SignState | None:
        return next((cb._signs for cb in self._peers if cb._signs is not None), None)

    def apply(self, ctx: StepContext) -> None:
        """Act on this step's gradients (and state)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Scalars averaged over the logging interval (read from the device only here); resets them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self._steps}
        if self._signs is not None:
            state["signs"] = self._signs.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = state_dict["steps"]
        if "signs" in state_dict:
            self._signs = self._signs or SignState()
            self._signs.load_state_dict(state_dict["signs"])
