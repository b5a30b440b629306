"""The fused OvSW update: flat layout and state, PyTorch flat path vs per-layer equations, Triton kernels
vs the PyTorch flat path (on CUDA, or on CPU tensors under TRITON_INTERPRET=1 without CUDA), and a Trainer
run on the Triton path against the plain Eq. 14-16 loop."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import requires_cuda
from lightning_ovsw.kernels.triton.ovsw_update import triton_ags_scale_, triton_sign_update_

from lightning_ovsw.callbacks._flat import FlatLayout, FlatState, SignState, pack_bits, unpack_bits
from lightning_ovsw.callbacks._update import torch_ags_scale_, torch_sign_update_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(8, 3, 3, 3), (5, 7), (12, 8, 3, 3), (3, 27), (6, 8, 1, 1), (16, 72), (1, 13)]


def random_weights(shapes=SHAPES, device=DEVICE, seed=0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        w = (torch.randn(s, generator=g) * (0.01 if i % 3 == 0 else 1.0)).to(device).requires_grad_()
        w.grad = (torch.randn(s, generator=g) * (1e-5 if i % 2 else 1.0)).to(device)
        out.append((f"layer{i}", w))
    return out


def test_layout_groups_rows_by_length_and_round_trips():
    weights = random_weights()
    layout = FlatLayout(weights)
    flat = layout.gather(dict(weights))
    for name, view in layout.split(flat).items():
        assert torch.equal(view, dict(weights)[name])
    lengths = [k for _, _, _, k in layout.groups]
    assert lengths == sorted(set(lengths))  # one group per distinct row length, ascending
    assert layout.rows == sum(w.shape[0] for _, w in weights) == layout.row_lengths.numel()
    assert int(layout.row_lengths.sum()) == layout.numel
    for start, length in zip(layout.row_starts.tolist(), layout.row_lengths.tolist(), strict=True):
        row = flat[start : start + length]
        assert any(torch.equal(row, w.reshape(w.shape[0], -1)[i]) for _, w in weights for i in range(w.shape[0])
                   if w[0].numel() == length)


def test_torch_ags_matches_per_layer_eq14():
    weights = random_weights()
    layout = FlatLayout(weights)
    grad = layout.gather({n: w.grad for n, w in weights})
    torch_ags_scale_(layout, layout.gather(dict(weights)), grad, 0.04)
    out = layout.split(grad)
    for name, w in weights:
        g64, w64 = w.grad.double().flatten(1), w.double().flatten(1)
        gn, pn = g64.norm(dim=1).clamp_min(1e-6), w64.norm(dim=1).clamp_min(1e-3)
        factor = torch.where(gn / pn < 0.04, 0.04 * pn / gn, torch.ones_like(gn))
        torch.testing.assert_close(out[name].double().flatten(1), g64 * factor[:, None], rtol=1e-5, atol=1e-12)
    assert any((dict(weights)[n].grad != out[n]).any() for n in layout.names)  # something was scaled


def test_sign_state_and_flat_state_follow_layout_changes():
    weights = dict(random_weights())
    a = FlatLayout([(n, weights[n]) for n in ("layer0", "layer1", "layer2")])
    b = FlatLayout([(n, weights[n]) for n in ("layer1", "layer3")])
    signs, counts = SignState(), FlatState(torch.int32, 0)
    bits_a = signs.for_layout(a, a.gather(weights))
    counts.for_layout(a).add_(torch.arange(a.numel, dtype=torch.int32, device=a.device))
    before = {n: c.clone() for n, c in counts.by_name().items()}
    bits_a.bitwise_not_()  # pretend every stored sign is the opposite
    weights["layer3"].data.neg_()
    signs.for_layout(b, b.gather(weights))
    counts.for_layout(b)
    by_name = signs.by_name()
    assert set(by_name) == {"layer0", "layer1", "layer2", "layer3"}
    for n in ("layer0", "layer1", "layer2"):  # kept from layout a (flipped)
        assert torch.equal(unpack_bits(by_name[n], weights[n].numel()), (weights[n] >= 0).reshape(-1))
    assert torch.equal(unpack_bits(by_name["layer3"], weights["layer3"].numel()), (weights["layer3"] < 0).reshape(-1))
    after = counts.by_name()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert torch.equal(after["layer3"], torch.zeros_like(after["layer3"]))


def _sign_case(n: int, seed: int, skip: bool | None, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(n, generator=g)
    weights[::7] = 0.0
    weights[3::11] = -0.0
    bits = pack_bits(torch.rand(n, generator=g) < 0.5)
    tracker = torch.where(torch.rand(n, generator=g) < 0.5, torch.zeros(n), torch.rand(n, generator=g) * 1e-3)
    grad = torch.randn(n, generator=g)
    counts = torch.randint(0, 5, (n,), generator=g, dtype=torch.int32)
    flag = None if skip is None else torch.tensor(skip)
    return [t.to(device) if t is not None else None for t in (weights, bits, flag, grad, tracker, counts)]


@pytest.mark.parametrize("n", [1, 8, 13, 1024, 2500])
@pytest.mark.parametrize("skip", [None, False, True])
@pytest.mark.parametrize("parts", ["sad+monitor", "sad", "monitor"])
def test_triton_sign_update_matches_torch(n, skip, parts):
    ref = _sign_case(n, n, skip)
    out = _sign_case(n, n, skip)
    sad, monitor = "sad" in parts, "monitor" in parts

    def args(t):
        return t[0], t[1], t[2], t[3] if sad else None, t[4] if sad else None, t[5] if monitor else None, 0.999, 1e-4, 9e-4

    silent_ref = torch_sign_update_(*args(ref))
    silent = triton_sign_update_(*args(out))
    assert torch.equal(out[1], ref[1]), "packed signs"
    assert torch.equal(out[5], ref[5]), "flip counts"
    torch.testing.assert_close(out[4], ref[4], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[3], ref[3], rtol=1e-6, atol=1e-12)
    assert (silent is None) == (silent_ref is None)
    if silent is not None:
        assert int(silent) == int(silent_ref)
    if skip:
        assert torch.equal(out[4], _sign_case(n, n, skip)[4]), "a skipped step leaves the tracker alone"


@pytest.mark.parametrize("seed", range(3))
def test_triton_ags_matches_torch(seed):
    shapes = SHAPES + [(4, 1500)] if seed == 0 else SHAPES[seed:]
    weights = random_weights(shapes, seed=seed)
    layout = FlatLayout(weights)
    w = layout.gather(dict(weights))
    g_ref = layout.gather({n: t.grad for n, t in weights})
    g = g_ref.clone()
    ratio_ref = torch_ags_scale_(layout, w, g_ref, 0.04)
    ratio = triton_ags_scale_(w, g, layout.row_starts, layout.row_lengths, max(k for *_, k in layout.groups), 0.04)
    torch.testing.assert_close(ratio, ratio_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-12)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU Trainer through Triton needs the interpreter; "
                    "tests/test_callbacks_cuda.py runs the kernels in a CUDA Trainer")
def test_trainer_on_triton_path_matches_plain_loop(monkeypatch):
    import lightning_ovsw.kernels.triton.ovsw_update as kernels
    from test_callbacks import DELTA, SIGMA, TAU, M, fit, make_data, make_model, reference_loop

    from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback

    calls = []
    for fn in ("triton_ags_scale_", "triton_sign_update_"):
        original = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _f=original, _n=fn: calls.append(_n) or _f(*a))
    monkeypatch.setenv("LIGHTNING_OVSW_FUSED", "1")
    monkeypatch.setattr("lightning_ovsw.kernels.train_ops.use_fused", lambda x, w: False)  # plain layers here
    steps, data = 12, make_data(8 * 12)
    ref, ref_tracker = reference_loop(make_model(), data, steps)
    callbacks = [AGSCallback(DELTA), SADCallback(SIGMA, M, TAU), FlipMonitor(histograms=False)]
    _, module = fit(make_model(), data, steps, callbacks)
    for (name, p), q in zip(module.model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for name, t in ref_tracker.items():
        torch.testing.assert_close(callbacks[1].trackers["model." + name], t, rtol=1e-5, atol=1e-7)
    assert calls.count("triton_ags_scale_") == calls.count("triton_sign_update_") == steps


@requires_cuda
@pytest.mark.parametrize("skip", [None, True])
def test_cuda_kernels_match_torch(skip):
    n = 3_000_001
    ref, out = _sign_case(n, 0, skip, "cuda"), _sign_case(n, 0, skip, "cuda")
    silent_ref = torch_sign_update_(*ref, 0.999, 1e-4, 9e-4)
    silent = triton_sign_update_(*out, 0.999, 1e-4, 9e-4)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[5], ref[5])
    torch.testing.assert_close(out[4], ref[4], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out[3], ref[3], rtol=1e-6, atol=1e-9)
    assert int(silent) == int(silent_ref)
    weights = random_weights(SHAPES + [(512, 512, 3, 3), (1000, 8192)], device="cuda")
    layout = FlatLayout(weights)
    w, g_ref = layout.gather(dict(weights)), layout.gather({n: t.grad for n, t in weights})
    g = g_ref.clone()
    ratio = triton_ags_scale_(w, g, layout.row_starts, layout.row_lengths, max(k for *_, k in layout.groups), 0.04)
    torch.testing.assert_close(ratio, torch_ags_scale_(layout, w, g_ref, 0.04), rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-12)
