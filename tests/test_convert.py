"""binarize_model: exactly which modules change, skip rules, filter_fn, shared Parameters, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_ovsw import BinaryConv2d, BinaryLinear, binarization_summary, binarize_model
from lightning_ovsw.registry import binary_layers


def kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_torchvision_resnet18():
    float_model = torchvision.models.resnet18(num_classes=10)
    model = binarize_model(float_model)
    before, after = kinds(float_model), kinds(model)
    convs = [n for n, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert after[convs[0]] == "Conv2d" and after[convs[-1]] == "Linear"
    shortcuts = {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}  # residual shortcut projections stay float
    assert all(after[n] in ("BinaryConv2d", "BinaryLinear") for n in convs[1:-1] if n not in shortcuts)
    assert all(after[n] == "Conv2d" for n in shortcuts)
    assert set(before.values()) == {"Conv2d", "Linear"}  # inplace=False left the original alone
    # the float keys, plus the input threshold of the conv after the stem's max-pool
    assert [k for k in model.state_dict() if k != "layer1.0.conv1.input_mean"] == list(float_model.state_dict())
    assert model.binarization_report.centered == ["layer1.0.conv1"]
    model.load_state_dict(float_model.state_dict())  # float checkpoints warm-start
    x = torch.randn(4, 3, 32, 32)
    model.train()(x)  # running statistics
    with torch.no_grad():
        a, b = model.eval()(x[:2]), model(x[2:])
    assert a.shape == (2, 10)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()  # the logits depend on the input
    # every binary layer sees negative inputs: no ReLU is left in front of one
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(bool((args[0] < 0).any())))
             for _, m in binary_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 16 and all(seen)


def test_inplace_reuses_parameters_and_optimizer_references():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[1].weight
    out = binarize_model(model, inplace=True)
    assert out is model and isinstance(model[1], BinaryConv2d) and model[1].weight is weight
    assert any(p is weight for p in opt.param_groups[0]["params"])


def test_skip_rules_and_filter_fn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    all_binary = binarize_model(model, skip_first=False, skip_last=False)
    assert len(binary_layers(all_binary)) == 4
    assert isinstance(all_binary[4], BinaryLinear)
    chosen = binarize_model(model, filter_fn=lambda m, name: name == "2")
    assert [n for n, _ in binary_layers(chosen)] == ["2"]
    opts = binarize_model(model, pad_value=1, scale="none")
    assert opts[1].options.pad_value == 1 and opts[1].options.scale == "none"


def test_grouped_convs_kept_float_or_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="groups=4"):
        out = binarize_model(model)
    assert type(out[1]) is nn.Conv2d and isinstance(out[2], BinaryConv2d)
    with pytest.raises(ValueError, match="groups"):
        binarize_model(model, filter_fn=lambda m, n: True)


def test_errors():
    with pytest.raises(ValueError, match="nothing to binarize"):
        binarize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)))
    with pytest.raises(TypeError):
        binarize_model("resnet18")
    with pytest.raises(ValueError, match="scale"):
        binarize_model(torchvision.models.resnet18(), scale="per_tensor")


def test_summary_counts():
    model = binarize_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 40, 3, padding=1, bias=False),
                                         nn.Flatten(), nn.Linear(40 * 16, 2)))
    summary = binarization_summary(model, (1, 3, 4, 4))
    rows = {r.name: r for r in summary.rows}
    assert rows["1"].precision == "1-bit" and rows["0"].precision == "float32"
    assert rows["1"].packed_bytes == 40 * ((8 * 9 + 31) // 32) * 4 + 40 * 4  # bits + alpha
    assert rows["1"].macs == 16 * 40 * 72 and rows["0"].macs == 16 * 8 * 27
    assert summary.binary_macs == rows["1"].macs
    assert summary.latent_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert "compression" in str(summary)


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_layers_that_only_look_like_conv_or_linear_stay_float_with_a_reason():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1)),
        parametrizations.spectral_norm(nn.Conv2d(4, 4, 3, padding=1)),
        OwnForward(4, 4, 3, padding=1),
        nn.LazyConv2d(4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    with pytest.warns(UserWarning, match="full precision"):
        out = binarize_model(model)
    kept = out.binarization_report.kept_float
    assert set(kept) == {"1", "2", "3", "4"} and out.binarization_report.binarized == ["5"]
    assert "parametriz" in kept["1"] and "parametriz" in kept["2"]
    assert "overrides Conv2d.forward" in kept["3"] and "lazy" in kept["4"]
    assert type(out[3]) is OwnForward
    summary = binarization_summary(out)
    assert "lazy" in {r.name: r.note for r in summary.rows}["4"] and "parametriz" in str(summary)
    with pytest.raises(ValueError, match="parametriz"):
        binarize_model(model, filter_fn=lambda m, n: n == "1")


def test_multihead_attention_out_proj_stays_float():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.mid, self.out = nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 8), \
                nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.mid(self.attn(h, h, h)[0]))

    with pytest.warns(UserWarning, match="MultiheadAttention"):
        out = binarize_model(Attention())
    assert type(out.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert out.binarization_report.binarized == ["mid"]
    rows = {r.name: r for r in binarization_summary(out).rows}
    assert rows["attn.out_proj"].precision == "float32" and "MultiheadAttention" in rows["attn.out_proj"].note
