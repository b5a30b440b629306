"""The one owner of a Trainer's OvSW work: which weights are binary, their sign state, the step pipeline.

Every OvSW callback of a Trainer attaches to one ``OvSWCoordinator``. It resolves the binary weights once
per fit, in ``on_fit_start`` (after ``configure_model``, so models converted there are found), and runs
each optimizer step in straight-line code: gather the step's weights and gradients into flat vectors,
AGS (Eq. 14), one fused sign update for SAD (Eq. 15-16) and FlipMonitor, one copy of the gradient back.
The order is AGS -> SAD -> FlipMonitor whatever order the callbacks are listed in.

State is keyed by canonical layer names (``_orig_mod.`` of ``torch.compile`` and similar wrapper
segments removed), so a run saved compiled resumes uncompiled and the other way round.
"""

from __future__ import annotations

import math
import weakref
from functools import cached_property
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_ovsw.callbacks._flat import FlatLayout, SignState
from lightning_ovsw.callbacks._update import ags_scale_, sign_update_
from lightning_ovsw.registry import binary_weights

if TYPE_CHECKING:
    from lightning_ovsw.callbacks._base import OvSWCallback

_WRAPPER_SEGMENTS = {"_orig_mod", "_forward_module", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


class DivergenceError(RuntimeError):
    """The training diverged: a binary layer's latent weight is NaN or infinite."""


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``model._orig_mod.conv`` -> ``model.conv``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Device flag: the GradScaler will skip this step (``unscale_`` found inf/NaN); None without a scaler.

    GradScaler has no public way to ask this before ``step``; its per-optimizer state is read, and a torch
    whose GradScaler keeps it elsewhere is a loud error, never a silently unguarded step.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", None)
    found = states.get(id(optimizer), {}).get("found_inf_per_device") if isinstance(states, dict) else None
    if not found:
        raise RuntimeError(
            "lightning-ovsw cannot read this torch version's GradScaler state (found_inf_per_device after "
            "unscale_), so it cannot tell skipped steps from real ones. Train with precision='bf16-mixed' "
            "or '32-true', or report this torch version."
        )
    return torch.stack([v.reshape(()) for v in found.values()]).sum() > 0


class FlatStep:
    """One optimizer step as the callbacks see it: its binary weights and gradients as flat vectors in
    ``layout`` order (copies; the gradient gathered on first use) and the GradScaler's skip flag (or None).
    A callback that changes ``grad`` sets ``grad_changed``; the coordinator then copies it back once."""

    def __init__(self, layout: FlatLayout, params: list[nn.Parameter], skip: Tensor | None) -> None:
        self.layout = layout
        self.params = params
        self.weights = layout.gather(dict(zip(layout.names, params, strict=True)))
        self.skip = skip
        self.grad_changed = False

    @cached_property
    def grad(self) -> Tensor:
        return self.layout.gather({n: p.grad for n, p in zip(self.layout.names, self.params, strict=True)})

    def write_back(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], list(self.layout.split(self.grad).values()))


class OvSWCoordinator:
    """Owns the binary-weight registry of the fit, the previous signs, and the per-step pipeline."""

    def __init__(self) -> None:
        self.callbacks: list[OvSWCallback] = []
        self.params: dict[str, nn.Parameter] = {}  # canonical name -> latent weight
        self._names: dict[int, str] = {}  # id(parameter) -> canonical name
        self._layouts: dict[tuple[int, ...], FlatLayout] = {}
        self._group_sizes: dict[int, tuple[int, ...]] = {}
        self._module: pl.LightningModule | None = None
        self.signs = SignState()

    # ------------------------------------------------------------------ membership and resolution
    def attach(self, callback: OvSWCallback) -> None:
        if any(type(cb) is type(callback) for cb in self.callbacks if cb is not callback):
            raise MisconfigurationException(f"the Trainer has two {type(callback).__name__}s; keep one.")
        if callback not in self.callbacks:
            self.callbacks.append(callback)
            self.callbacks.sort(key=lambda cb: cb.order)

    def drives(self, callback: OvSWCallback, trainer: pl.Trainer) -> bool:
        """The first attached callback in ``trainer.callbacks`` runs the pipeline; the others only hold state."""
        first = next(cb for cb in trainer.callbacks if any(cb is mine for mine in self.callbacks))
        return first is callback

    def sign_owner(self) -> OvSWCallback | None:
        """The callback whose checkpoint state carries the previous signs (SAD if present, else FlipMonitor)."""
        return next((cb for cb in self.callbacks if cb.needs_signs), None)

    def resolve(self, pl_module: pl.LightningModule) -> None:
        """Find the binary weights (once per fit) and reconcile them with checkpointed state."""
        if self._module is pl_module and self.params:
            return
        self._module = pl_module
        self._rescan()
        if not self.params:
            names = ", ".join(type(cb).__name__ for cb in self.callbacks)
            raise MisconfigurationException(
                f"{names} found no binary layer in {type(pl_module).__name__}; convert the model with "
                "lightning_ovsw.binarize_model(...) (in __init__, setup or configure_model) or use the zoo in "
                "lightning_ovsw.models."
            )
        known = set(self.params)
        saved = set(self.signs.by_name())
        for cb in self.callbacks:
            saved |= cb.state_names()
        foreign, missing = sorted(saved - known), sorted(known - saved) if saved else []
        if foreign or missing:
            parts = []
            if foreign:
                parts.append(f"checkpointed layers that match no binary layer of the model (dropped): {foreign}")
            if missing:
                parts.append(f"binary layers with no checkpointed state (start fresh): {missing}")
            rank_zero_warn("OvSW state from the checkpoint does not match the model: " + "; ".join(parts) + ".")
        for name in foreign:
            self.signs.drop(name)
            for cb in self.callbacks:
                cb.drop_state(name)

    def _rescan(self) -> None:
        assert self._module is not None
        weights = [(canonical_name(n), p) for n, p in binary_weights(self._module)]
        self.params = dict(weights)
        self._names = {id(p): n for n, p in weights}
        self._layouts, self._group_sizes = {}, {}

    # ------------------------------------------------------------------ the step
    def step(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """AGS -> SAD -> FlipMonitor on this optimizer's binary weights that have a gradient."""
        sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
        if self._group_sizes.get(id(optimizer), sizes) != sizes:
            self._rescan()  # add_param_group or a new head: layers that appear mid-run are tracked from here
        self._group_sizes[id(optimizer)] = sizes
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._names and p.grad is not None]
        if not params:
            return
        key = tuple(id(p) for p in params)
        if key not in self._layouts:
            self._layouts[key] = FlatLayout([(self._names[id(p)], p) for p in params])
        layout = self._layouts[key]
        by_name = {self._names[id(p)]: p for p in params}
        step = FlatStep(layout, [by_name[n] for n in layout.names], found_inf(trainer, optimizer))
        for cb in self.callbacks:
            cb.transform(step)
        inputs: dict[str, Any] = {}
        for cb in self.callbacks:
            inputs.update(cb.sign_inputs(step))
        if inputs:
            bits = self.signs.for_layout(layout, step.weights)
            silent = sign_update_(step.weights, bits, step.skip, **inputs)
            for cb in self.callbacks:
                cb.after_signs(step, silent)
        if step.grad_changed:
            step.write_back()

    def check_finite(self, step: int) -> None:
        """Raise ``DivergenceError`` naming the first binary layer whose latent weight is not finite."""
        for name, p in self.params.items():
            if not bool(torch.isfinite(p.detach()).all()):
                raise DivergenceError(
                    f"training diverged: the latent weight of binary layer {name!r} holds NaN or inf at step "
                    f"{step}. Lower the learning rate (or use a warm-up), check the inputs and activations of the "
                    "binary layers, and clip gradients if the loss spikes."
                )

    @staticmethod
    def ags_scale_(step: FlatStep, delta: float) -> Tensor:
        """Eq. 14 on the step's flat gradient (in place); returns ``||G[i]|| / ||W[i]||`` per filter."""
        step.grad_changed = True
        return ags_scale_(step.layout, step.weights, step.grad, delta)


_COORDINATORS: weakref.WeakKeyDictionary[pl.Trainer, OvSWCoordinator] = weakref.WeakKeyDictionary()


def coordinator_for(trainer: pl.Trainer) -> OvSWCoordinator:
    """The Trainer's coordinator (made on first use)."""
    if trainer not in _COORDINATORS:
        _COORDINATORS[trainer] = OvSWCoordinator()
    return _COORDINATORS[trainer]


def check_real(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds, or a ValueError/TypeError that names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}({name}={value!r}): {name} must be a real number, got {type(value).__name__}.")
    value = float(value)
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{owner}({name}={value!r}): {name} must be finite and in {lo or '(-inf'}, {hi or 'inf)'}.")
    return value
