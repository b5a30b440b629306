"""16-mixed and bf16-mixed on CUDA: the Trainer with AGS/SAD equals a plain autocast (+ GradScaler) loop.

Skipped without CUDA; run on a GPU before resolving changes to the callbacks.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from test_callbacks import DELTA, LR, SIGMA, TAU, WD, M, Module, binary_named, make_data, make_model
from torch.utils.data import DataLoader

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback

pytestmark = requires_cuda


def reference_amp_loop(model, data, steps, dtype):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    weights = binary_named(model)
    prev, tracker = {}, {n: torch.zeros_like(w) for n, w in weights}
    for (x, y), _ in zip(DataLoader(data, batch_size=8), range(steps), strict=False):
        x, y = x.cuda(), y.cuda()
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        with torch.no_grad():
            for _, w in weights:
                g = w.grad.flatten(1).norm(dim=1).clamp_min(1e-6)
                p = w.flatten(1).norm(dim=1).clamp_min(1e-3)
                w.grad.mul_(torch.where(g / p < DELTA, DELTA * p / g, torch.ones_like(g)).view(-1, *[1] * (w.ndim - 1)))
            for n, w in weights:
                sign = torch.where(w < 0, -1.0, 1.0)
                if finite:
                    flip = torch.zeros_like(w) if n not in prev else (sign != prev[n]).float()
                    tracker[n] = M * tracker[n] + (1 - M) * flip
                    prev[n] = sign
                w.grad.add_(SIGMA * (tracker[n] < TAU) * w)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return model, tracker


@pytest.mark.parametrize("fused", ["1", "0"], ids=["triton", "pytorch"])
@pytest.mark.parametrize("precision,dtype", [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_amp_trainer_matches_plain_loop(precision, dtype, fused, monkeypatch):
    """Few steps: a BNN amplifies rounding differences (Triton's norms vs torch's) through sign flips."""
    monkeypatch.setenv("LIGHTNING_OVSW_FUSED", fused)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    steps = 6
    data = make_data(8 * steps)
    ref, ref_tracker = reference_amp_loop(make_model().cuda(), data, steps, dtype)
    sad = SADCallback(SIGMA, M, TAU)
    module = Module(make_model())
    pl.Trainer(
        max_steps=steps, accelerator="cuda", devices=1, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FlipMonitor(histograms=False), sad, AGSCallback(DELTA)],
    ).fit(module, DataLoader(data, batch_size=8))
    for (name, p), q in zip(module.model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for name, t in ref_tracker.items():
        torch.testing.assert_close(sad.trackers["model." + name], t, rtol=1e-5, atol=1e-7)
        assert torch.isfinite(sad.trackers["model." + name]).all()
