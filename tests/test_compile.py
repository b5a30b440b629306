"""``torch.compile`` on models with binary layers: no graph break, compiled == eager (CPU).

Both paths: the plain PyTorch one (autograd.Functions, traced by dynamo) and the fused custom ops
(fake kernels + registered autograd; their Triton kernels run in the interpreter here).
``fullgraph=True`` makes any graph break an error; the backward then runs the AOTAutograd graph. ResNet-20's
forward is checked with ``explain``; forward + backward through compiled graphs on a small model (a
ResNet-20 backward compile costs ~20 s per path, over this file's budget).
"""

from __future__ import annotations

import pytest
import torch
from lightning_ovsw.kernels import train_ops
from torch import nn

from lightning_ovsw import BinaryConv2d, BinaryLinear
from lightning_ovsw.models import resnet20_1w1a


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model() -> nn.Sequential:
    return nn.Sequential(
        BinaryConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
        BinaryConv2d(8, 8, 3, stride=2, padding=1, pad_value=1), nn.BatchNorm2d(8), nn.Flatten(),
        BinaryLinear(8 * 4 * 4, 10),
    )


def fwd_bwd(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out, [p.grad.clone() for p in model.parameters()]



@pytest.mark.parametrize("fused", [False, True])
def test_resnet20_has_no_graph_break(fused, monkeypatch):
    monkeypatch.setattr(train_ops, "FUSED", fused)
    model = resnet20_1w1a()
    x = torch.randn(2, 3, 16, 16)
    for mode in (True, False) if not fused else (True,):
        explanation = torch._dynamo.explain(model.train(mode))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("fused,backend", [(False, "inductor"), (True, "aot_eager")])
def test_compiled_equals_eager(fused, backend, monkeypatch):
    monkeypatch.setattr(train_ops, "FUSED", fused)
    model = tiny_model()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])
    for mode in (True, False):
        model.train(mode)
        out_c, grads_c = fwd_bwd(compiled, x)
        out_e, grads_e = fwd_bwd(model, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5 * out_e.abs().max().item())
        for gc, ge in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5 * ge.abs().max().item())
    # the first layer's input signs, compiled, bit for bit (0.0 and -0.0 give +1)
    layer = model[0].train()
    if fused:
        signs = torch.compile(lambda t: train_ops.binarize_act(t, True, 0, t.dtype)[0],
                              backend=backend, fullgraph=True)(x)
    else:
        signs = torch.compile(layer.binary_input, backend=backend, fullgraph=True)(x)
    assert torch.equal(signs, torch.where(x < 0, -1.0, 1.0))
