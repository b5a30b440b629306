"""OvSW callbacks around the update: where models are converted, names, logged values, bad input, divergence."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from test_callbacks import DELTA, SIGMA, TAU, M, Module, assert_same_weights, fit, make_data, make_model, reference_loop
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback, binarize_model
from lightning_ovsw.callbacks._coordinator import DivergenceError, found_inf
from lightning_ovsw.layers import BinaryConv2d, BinaryLinear


class Recorder(Logger):
    """A logger that keeps every logged scalar: ``history[tag] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))


def trainer(callbacks, **kwargs) -> pl.Trainer:
    kwargs = {"max_steps": 6, "logger": False, **kwargs}
    return pl.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, **kwargs)


def float_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardtanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Hardtanh(),
                         nn.Flatten(), nn.Linear(8 * 64, 16), nn.Hardtanh(), nn.Linear(16, 5))


def test_model_converted_in_configure_model():
    """Lightning's recommended place to build the model runs after the callbacks' setup."""

    class Late(Module):
        def __init__(self):
            super().__init__(None)

        def configure_model(self):
            if self.model is None:
                self.model = binarize_model(float_net())

    sad, monitor = SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)
    trainer([AGSCallback(DELTA), sad, monitor]).fit(Late(), DataLoader(make_data(48), batch_size=8))
    assert set(sad.trackers) == {"model.2", "model.5"} == set(monitor.flip_counts)


class Unwrapping(Module):
    """Loads a checkpoint of the wrapped network into the plain one (the model's own keys are the user's
    business; the callbacks' state must follow by itself)."""

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k.replace("_orig_mod.", "").replace("renamed", "7"): v
                                    for k, v in checkpoint["state_dict"].items()}


class Wrapped(nn.Module):
    """Stands for ``torch.compile``'s ``OptimizedModule``: the network under ``_orig_mod``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._orig_mod = net

    def forward(self, x):
        return self._orig_mod(x)


def test_compiled_checkpoint_resumes_uncompiled(tmp_path):
    first = [SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    t, module = fit(Wrapped(make_model()), make_data(48), 6, first)
    assert set(first[0].trackers) == {"model.2", "model.4", "model.7"}  # canonical names
    t.save_checkpoint(tmp_path / "compiled.ckpt")
    resumed = [SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    plain = Unwrapping(make_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(resumed, max_steps=6).fit(plain, DataLoader(make_data(48), batch_size=8),
                                          ckpt_path=tmp_path / "compiled.ckpt")
    assert not [w for w in caught if "OvSW state" in str(w.message)]
    for name, tracker in first[0].trackers.items():
        assert torch.equal(resumed[0].trackers[name], tracker)  # restored, not restarted from zero
        assert torch.equal(resumed[1].flip_counts[name], first[1].flip_counts[name])


def test_renamed_and_frozen_layers_are_named_in_one_warning(tmp_path):
    first = [SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    t, _ = fit(make_model(), make_data(48), 4, first)
    t.save_checkpoint(tmp_path / "a.ckpt")
    layers = list(make_model().named_children())
    layers[7] = ("renamed", layers[7][1])  # the classifier-side binary layer gets a new name
    model = nn.Sequential(OrderedDict(layers))
    model[2].weight.requires_grad_(False)  # frozen: still a binary layer, no gradient, no steps
    callbacks = [SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]

    class Renamed(Module):
        def on_load_checkpoint(self, checkpoint):
            checkpoint["state_dict"] = {k.replace("model.7.", "model.renamed."): v
                                        for k, v in checkpoint["state_dict"].items()}

    with pytest.warns(UserWarning, match=r"OvSW state .*match no binary layer.*model\.7.*no checkpointed state.*model\.renamed"):
        trainer(callbacks, max_epochs=2, max_steps=-1).fit(
            Renamed(model), DataLoader(make_data(32), batch_size=8), ckpt_path=tmp_path / "a.ckpt")
    assert "model.7" not in callbacks[0].trackers and "model.7" not in callbacks[1].flip_counts  # stale state dropped
    assert "model.renamed" in callbacks[0].trackers
    assert torch.equal(callbacks[1].flip_counts["model.2"], first[1].flip_counts["model.2"])  # frozen: kept as is


def test_layer_added_mid_run_is_tracked_from_its_first_step():
    """A new binary head built after fit start (and given to the optimizer) is scaled, penalised and counted."""

    class Grows(Module):
        def forward(self, x):
            out = self.model(x)
            return self.extra(out) if hasattr(self, "extra") else out

        def training_step(self, batch, i):
            opt = self.optimizers()
            if i == 2:
                self.extra = BinaryLinear(5, 5)
                opt.add_param_group({"params": list(self.extra.parameters())})
            x, y = batch
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()

    sad, monitor = SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)
    trainer([sad, monitor], max_steps=8).fit(Grows(make_model(), manual=True), DataLoader(make_data(64), batch_size=8))
    assert "extra" in sad.trackers and sad.trackers["extra"].shape == (5, 5)
    assert "extra" in monitor.flip_counts


def test_two_optimizers_rates_per_owning_optimizer():
    """Layer A steps every batch, layer B every other batch: each rate is its flips over its own steps."""
    signs: dict[str, list[torch.Tensor]] = {"model.0": [], "model.4": []}

    class TwoOpt(Module):
        def training_step(self, batch, i):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            opt_a.zero_grad()
            opt_b.zero_grad()
            self.manual_backward(F.cross_entropy(self.model(x), y))
            opt_a.step()
            signs["model.0"].append(self.model[0].weight.detach() < 0)
            if i % 2 == 0:
                opt_b.step()
                signs["model.4"].append(self.model[4].weight.detach() < 0)

        def configure_optimizers(self):
            a = list(self.model[0].parameters())
            b = [p for p in self.parameters() if all(p is not q for q in a)]
            return torch.optim.SGD(a, lr=2.0), torch.optim.SGD(b, lr=2.0)

    monitor = FlipMonitor(histograms=False)
    model = make_model()
    model[0] = BinaryConv2d(3, 8, 3, padding=1)  # the first layer binary too, owned by optimizer A
    before = {n: (model.get_submodule(n[len("model."):]).weight.detach() < 0) for n in signs}
    # log only at global step 0, so the interval that rates() reads spans the rest of the run
    trainer([monitor], max_steps=1000, max_epochs=1, log_every_n_steps=10_000).fit(
        TwoOpt(model, manual=True), DataLoader(make_data(96), batch_size=8))
    rates = monitor.rates()
    for name, history in signs.items():
        states = [before[name], *history]
        flips = sum(int((a != b).sum()) for a, b in zip(states[:-2], states[1:-1], strict=True))
        steps = len(history) - (1 if name == "model.0" else 0)  # model.0's first step preceded the reset
        assert flips > 0
        assert rates[name] == pytest.approx(flips / (history[0].numel() * steps))


def test_skipped_step_keeps_nonzero_trackers_and_found_inf_sees_it():
    """A GradScaler step with inf gradients (16-mixed on CPU, a real GradScaler) advances no state."""
    from lightning.pytorch.plugins import MixedPrecision

    skip_at = 6

    class InfAt(Module):
        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            return loss * float("inf") if i == skip_at else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=3.0)

    seen, snapshots = {}, {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            self.batch = i
            if i in (skip_at, skip_at + 1):
                snapshots[i] = ({n: t.clone() for n, t in sad.trackers.items()},
                                {n: t.clone() for n, t in monitor.flip_counts.items()})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[self.batch] = bool(found_inf(trainer, optimizer))

    sad, monitor = SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)
    pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[Probe(), AGSCallback(DELTA), sad, monitor],
               plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=16.0))],
               ).fit(InfAt(make_model()), DataLoader(make_data(96), batch_size=8))
    assert [s for s, inf in seen.items() if inf] == [skip_at]
    trackers, counts = snapshots[skip_at]
    assert any(t.abs().sum() > 0 for t in trackers.values()), "trackers must be non-zero for the test to mean anything"
    for name in trackers:
        assert torch.equal(snapshots[skip_at + 1][0][name], trackers[name]), "the skipped step advanced the tracker"
        assert torch.equal(snapshots[skip_at + 1][1][name], counts[name])


@pytest.mark.parametrize(
    "make, error",
    [(lambda: SADCallback(penalty=math.nan), ValueError), (lambda: SADCallback(penalty=math.inf), ValueError),
     (lambda: AGSCallback(delta=math.inf), ValueError), (lambda: AGSCallback(delta="0.04"), TypeError),
     (lambda: AGSCallback(delta=True), TypeError), (lambda: SADCallback(threshold=math.nan), ValueError),
     (lambda: FlipMonitor(heatmap_bins=2.5), ValueError), (lambda: FlipMonitor(heatmap_bins=1), ValueError)],
)
def test_bad_arguments_are_refused_with_the_name(make, error):
    with pytest.raises(error, match=r"\((delta|penalty|threshold|heatmap_bins)="):
        make()


def test_divergence_is_reported_as_such():
    class Diverge(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            if i == 3:
                with torch.no_grad():
                    pl_module.model[4].weight[0, 0] = float("nan")

    with pytest.raises(DivergenceError, match=r"diverged.*'model\.4'.*step 3.*learning rate"):
        trainer([Diverge(), SADCallback(SIGMA, M, TAU), FlipMonitor()], log_every_n_steps=1).fit(
            Module(make_model()), DataLoader(make_data(64), batch_size=8))


def test_metrics_reach_callback_metrics():
    t = trainer([AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)], log_every_n_steps=1)
    t.fit(Module(make_model()), DataLoader(make_data(48), batch_size=8))
    for key in ("flips/rate/all", "flips/silent_run/all", "ags/scaled_fraction", "sad/penalized_fraction"):
        assert key in t.callback_metrics


def test_float64_model_keeps_float64_gradients():
    """The flat buffers follow the weights' dtype: a float64 run equals the float64 plain loop bit for bit."""
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(48, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (48,), generator=g))
    ref, _ = reference_loop(make_model().double(), data, 5)
    _, module = fit(make_model().double(), data, 5, [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU)])
    assert_same_weights(module.model, ref)


def test_scalars_follow_the_trainer_cadence():
    """The scalars go to every logger on the Trainer's cadence (checked against the step axis)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Hardtanh(), BinaryLinear(16, 16), nn.Hardtanh(),
                          nn.Linear(16, 5))
    recorder = Recorder()
    trainer([FlipMonitor(histograms=False)], logger=recorder, log_every_n_steps=2, max_steps=6).fit(
        Module(model), DataLoader(make_data(48), batch_size=8))
    assert [s for s, _ in recorder.history["flips/rate/all"]] == [0, 2, 4]
