"""AGS / SAD / FlipMonitor in a Trainer against a hand-written loop of Eq. 14-16, resume, AMP skip, errors."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback, binarize_model
from lightning_ovsw.callbacks._coordinator import canonical_name

DELTA, SIGMA, M, TAU = 0.04, 9e-4, 0.999, 1e-4
LR, WD = 0.1, 5e-4


def make_model() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Hardtanh(), nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.Hardtanh(),
        nn.Conv2d(12, 16, 3, padding=1), nn.Hardtanh(), nn.Flatten(), nn.Linear(16 * 16, 32), nn.Hardtanh(),
        nn.Linear(32, 5),
    )
    return binarize_model(net)


def make_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def binary_named(model):
    return [(n, m.weight) for n, m in model.named_modules() if hasattr(m, "options")]


class Module(pl.LightningModule):
    def __init__(self, model, manual: bool = False):
        super().__init__()
        self.model = model
        self.automatic_optimization = not manual

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, weight_decay=WD)


def reference_loop(model, data, steps, accumulate=1, clip=None, ags=True, sad=True):
    """Plain PyTorch: Eq. 14 then Eq. 15-16 on the accumulated gradient, clip, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    batches = iter(DataLoader(data, batch_size=8))
    weights = binary_named(model)
    prev = {n: None for n, _ in weights}
    tracker = {n: torch.zeros_like(w) for n, w in weights}
    for _ in range(steps):
        for _ in range(accumulate):
            x, y = next(batches)
            (F.cross_entropy(model(x), y) / accumulate).backward()
        with torch.no_grad():
            for _, w in weights:
                if ags:
                    rows = w.grad.flatten(1)
                    g = rows.norm(dim=1).clamp_min(1e-6)
                    p = w.flatten(1).norm(dim=1).clamp_min(1e-3)
                    factor = torch.where(g / p < DELTA, DELTA * p / g, torch.ones_like(g))
                    w.grad.mul_(factor.view(-1, *([1] * (w.ndim - 1))))
            for n, w in weights:
                if sad:
                    sign = torch.where(w < 0, -1.0, 1.0)
                    flip = torch.zeros_like(w) if prev[n] is None else (sign != prev[n]).float()
                    tracker[n] = M * tracker[n] + (1 - M) * flip
                    w.grad.add_(SIGMA * (tracker[n] < TAU) * w)
                    prev[n] = sign
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return model, tracker


def fit(model, data, steps, callbacks, manual=False, **trainer_kwargs):
    module = Module(model, manual)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer, module


def assert_same_weights(a, b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        assert torch.equal(pa, pb), f"{na} differs by {(pa - pb).abs().max()}"


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(accumulate=3),
        dict(clip=0.5),
        dict(reverse=True),
        dict(manual=True),
    ],
    ids=["plain", "accumulate3", "clip", "reversed", "manual"],
)
def test_trainer_matches_plain_loop(case):
    steps, data = 24, make_data(8 * 24 * case.get("accumulate", 1))
    ref, ref_tracker = reference_loop(make_model(), data, steps, case.get("accumulate", 1), case.get("clip"))
    callbacks = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    if case.get("reverse"):
        callbacks.reverse()
    kwargs = {}
    if case.get("accumulate"):
        kwargs["accumulate_grad_batches"] = case["accumulate"]
    if case.get("clip"):
        kwargs["gradient_clip_val"] = case["clip"]
    _, module = fit(make_model(), data, steps, callbacks, manual=case.get("manual", False), **kwargs)
    assert_same_weights(module.model, ref)
    sad = next(cb for cb in callbacks if isinstance(cb, SADCallback))
    for name, t in ref_tracker.items():
        assert torch.equal(sad.trackers["model." + name], t)
    # the run changed something: OvSW is not a no-op on this model
    plain, _ = reference_loop(make_model(), data, steps, case.get("accumulate", 1), case.get("clip"), ags=False, sad=False)
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), ref.parameters(), strict=True))


def test_only_ags_and_only_sad_match_loop():
    data = make_data(8 * 20)
    for ags, sad, cbs in [(True, False, [AGSCallback(DELTA)]), (False, True, [SADCallback(SIGMA, M, TAU)])]:
        ref, _ = reference_loop(make_model(), data, 20, ags=ags, sad=sad)
        _, module = fit(make_model(), data, 20, cbs)
        assert_same_weights(module.model, ref)


def test_resume_matches_uninterrupted(tmp_path):
    data = make_data(32)  # 4 steps per epoch: checkpoint at an epoch boundary
    full_cbs = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    _, full = fit(make_model(), data, -1, full_cbs, max_epochs=6)
    first_cbs = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    trainer, _ = fit(make_model(), data, -1, first_cbs, max_epochs=3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_cbs = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    module = Module(make_model())
    pl.Trainer(
        max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=resumed_cbs,
    ).fit(module, DataLoader(data, batch_size=8), ckpt_path=tmp_path / "mid.ckpt")
    assert_same_weights(module.model, full.model)
    for name, t in full_cbs[1].trackers.items():
        assert torch.equal(resumed_cbs[1].trackers[name], t)
        assert torch.equal(resumed_cbs[2].flip_counts[name], full_cbs[2].flip_counts[name])
        assert torch.equal(resumed_cbs[1].coordinator.signs.by_name()[name], full_cbs[1].coordinator.signs.by_name()[name])


def test_skipped_amp_step_advances_no_state():
    """A GradScaler step with inf gradients (16-mixed on CPU) must leave SAD/flip state untouched."""
    from lightning.pytorch.plugins import MixedPrecision

    class InfAt(Module):
        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            return loss * float("inf") if i == 3 else loss

    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            if i in (3, 4):
                snapshots[i] = {n: t.clone() for n, t in sad.trackers.items()}

    sad, monitor = SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)
    module = InfAt(make_model())
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[AGSCallback(DELTA), sad, monitor, Snapshot()],
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    trainer.fit(module, DataLoader(make_data(64), batch_size=8))
    for name in snapshots[3]:
        assert torch.equal(snapshots[3][name], snapshots[4][name]), "the skipped step advanced the tracker"
        assert torch.isfinite(sad.trackers[name]).all()
    assert all(c.min() >= 0 for c in monitor.flip_counts.values())


def test_flip_monitor_exact_on_hand_built_trajectory():
    from lightning_ovsw.callbacks._coordinator import OvSWCoordinator

    w = nn.Parameter(torch.tensor([[1.0, -1.0, 2.0, 0.0]]))
    trajectory = [[1, -1, 2, 0], [-1, -1, 2, -0.0], [1, -1, 2, -1], [1, 1, 2, -2]]
    monitor, coordinator = FlipMonitor(histograms=False), OvSWCoordinator()
    monitor._coordinator = coordinator
    coordinator.attach(monitor)
    coordinator.params, coordinator._names = {"fc": w}, {id(w): "fc"}
    optimizer = torch.optim.SGD([w], lr=0.0)
    trainer = type("T", (), {"precision_plugin": None})()
    for values in trajectory:
        w.data = torch.tensor([values], dtype=torch.float32)
        w.grad = torch.zeros_like(w)
        coordinator.step(trainer, optimizer)
    # flips per step: [0], [1 (w0)], [1 (w0), 1 (w3)], [1 (w1)]; -0.0 is +1 so step 2 has no w3 flip
    assert monitor.flip_counts["fc"].tolist() == [[2, 1, 0, 1]]
    rates = monitor.rates()
    assert rates["fc"] == pytest.approx(4 / (4 * 4))
    assert monitor.silent_fractions()["fc"] == pytest.approx(1 / 4)
    assert monitor.silent_fractions(epoch=True)["fc"] == pytest.approx(1 / 4)


def test_tensorboard_tags(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    module = Module(make_model())
    pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=logger, log_every_n_steps=2, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor()],
    ).fit(module, DataLoader(make_data(32), batch_size=8))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0}).Reload()
    tags = events.Tags()
    for tag in ["ags/scaled_fraction", "sad/penalized_fraction", "flips/rate/all", "flips/silent_run/model.2",
                "flips/silent_epoch/all"]:
        assert tag in tags["scalars"], tag
    assert "flips/flip_count/model.2" in tags["histograms"] and "flips/abs_weight/model.4" in tags["histograms"]
    assert "flips/count_vs_abs_weight/model.2" in tags["images"]


@pytest.mark.parametrize(
    "make",
    [lambda: AGSCallback(delta=-1), lambda: SADCallback(momentum=1.0), lambda: SADCallback(penalty=-1),
     lambda: SADCallback(threshold=0), lambda: SADCallback(tracker_init="half"), lambda: FlipMonitor(heatmap_bins=1)],
)
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_no_binary_layer_is_a_clear_error():
    with pytest.raises(MisconfigurationException, match="binarize_model"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(192, 5)), make_data(16), 1, [SADCallback()])


def test_only_stepped_optimizer_params_are_touched():
    model = make_model()
    before = copy.deepcopy(model)

    class TwoOpt(Module):
        def training_step(self, batch, _):
            x, y = batch
            opt_a, _ = self.optimizers()
            opt_a.zero_grad()
            self.manual_backward(F.cross_entropy(self.model(x), y))
            opt_a.step()

        def configure_optimizers(self):
            first = list(self.model[2].parameters())
            rest = [p for p in self.parameters() if all(p is not q for q in first)]
            return torch.optim.SGD(first, lr=LR), torch.optim.SGD(rest, lr=LR)

    sad = SADCallback(SIGMA, M, TAU)
    module = TwoOpt(model, manual=True)
    pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[sad]).fit(module, DataLoader(make_data(32), batch_size=8))
    assert set(sad.trackers) == {"model.2"}
    assert torch.equal(model[4].weight, before[4].weight)


def test_callbacks_with_compiled_model_match_plain_loop():
    """``torch.compile`` on the network: the callbacks see the same Parameters and gradients. The loop
    runs the compiled network too (a BNN amplifies the compiler's rounding differences through flips)."""
    steps, data = 8, make_data(8 * 8)
    ref, ref_tracker = reference_loop(torch.compile(make_model()), data, steps)
    callbacks = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    _, module = fit(torch.compile(make_model()), data, steps, callbacks)
    for p, q in zip(module.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for name, t in ref_tracker.items():
        # state is keyed by canonical names: torch.compile's ``_orig_mod.`` is not part of them
        torch.testing.assert_close(callbacks[1].trackers[canonical_name("model." + name)], t, rtol=1e-5, atol=1e-7)
    assert sum(c.sum() for c in callbacks[2].flip_counts.values()) > 0
