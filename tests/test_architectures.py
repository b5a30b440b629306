"""binarize_model + pack_model on the models users bring: torchvision classifiers and transformers.

For each: the binarized network's eval logits depend on its input, its first backward is finite, and the
packed model computes what the eval model computes. Packing is compared with ``fold_batchnorm=False``:
folding a BatchNorm into the per-channel constants rounds differently in the last bit, and a binary layer
downstream turns a value that moves across zero into a different sign, so only the unfolded packing is
exact (``tests/test_pack.py`` covers folding).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from lightning_ovsw import binarize_model
from lightning_ovsw.layers import CENTER_MOMENTUM
from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear
from lightning_ovsw.packing import pack_model
from lightning_ovsw.registry import binary_layers

# (name, input size, slow): the smallest input each architecture takes (inception_v3: 75x75)
ARCHITECTURES = [
    ("resnet18", 32, False),
    ("squeezenet1_0", 64, True),  # at 32x32 the float classifier's final ReLU is often all zero
    ("shufflenet_v2_x1_0", 32, True),
    ("mobilenet_v2", 32, True),
    ("mobilenet_v3_small", 32, False),
    ("resnet50", 32, True),
    ("vgg11_bn", 32, True),
    ("densenet121", 32, True),
    ("regnet_y_400mf", 32, True),
    ("googlenet", 32, True),
    ("inception_v3", 75, True),
    ("efficientnet_b0", 32, True),
    ("convnext_tiny", 32, True),
]


def build(name: str) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


def check_binarized(model: nn.Module, x: torch.Tensor) -> None:
    """Logits depend on the input (eval), the first backward is finite, packing equals the eval model."""
    assert binary_layers(model)
    for norm in model.modules():  # one step gives the BatchNorms exact running statistics (cumulative average)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.momentum = None
    model.train()
    model(x).square().mean().backward()
    with torch.no_grad():  # the same for the centered layers' running input mean: one step from 0 gave 0.1 m
        for _, layer in binary_layers(model):
            if layer.input_mean is not None:
                layer.input_mean /= CENTER_MOMENTUM
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    model.eval()
    with torch.no_grad():
        half = x.shape[0] // 2
        a, b = model(x[:half]), model(x[half:])
        assert not torch.equal(a, b), "the eval logits do not depend on the input"
        assert (a - b).abs().max() > 1e-3 * a.abs().max()
        want = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # models that do not trace are packed without fusions
            packed = pack_model(model, fold_batchnorm=False)
        assert not binary_layers(packed)
        assert sum(isinstance(m, (PackedConv2d, PackedLinear)) for m in packed.modules()) == len(binary_layers(model))
        got = packed(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def _params(name_size_slow):
    name, size, slow = name_size_slow
    return pytest.param(name, size, id=name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("name", "size"), [_params(a) for a in ARCHITECTURES])
def test_torchvision_classifier(name, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grouped convs kept float
        model = binarize_model(build(name))
    check_binarized(model, torch.randn(4, 3, size, size))


@pytest.mark.slow
def test_squeezenet_learns_with_added_norms():
    """squeezenet1_0 has no normalization layer: ``unnormalized="batchnorm"`` gives every binary conv a norm
    and a real-valued shortcut (the only option under which it learns, ``benchmarks/architectures_train.py``)."""
    model = binarize_model(build("squeezenet1_0"), unnormalized="batchnorm")
    report = model.binarization_report
    assert len(report.binarized) == 24 and set(report.added_norms) == set(report.binarized) == set(report.real_shortcuts)
    assert not report.rescaled and len(report.centered) == 3
    check_binarized(model, torch.randn(4, 3, 64, 64))


def test_resnet18_replaces_every_relu_that_feeds_a_binary_conv():
    model = binarize_model(build("resnet18"))
    report = model.binarization_report
    assert len(report.binarized) == 16 and len(report.non_negative_inputs) == 16 and not report.unresolved
    # the stem's relu and each block's shared relu (called twice in a BasicBlock)
    assert set(report.replaced_activations) == {"relu"} | {f"layer{i}.{j}.relu" for i in range(1, 5) for j in (0, 1)}
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def small_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises it: constant logits
    return model


class Encoder(nn.Module):
    def __init__(self, activation: str = "relu", dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, activation=activation, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_vision_transformer():
    with pytest.warns(UserWarning, match="out_proj"):
        model = binarize_model(small_vit())
    report = model.binarization_report
    assert all("MultiheadAttention" in report.kept_float[f"encoder.layers.encoder_layer_{i}.self_attention.out_proj"]
               for i in range(2))
    assert len(report.binarized) == 4  # the MLP linears
    check_binarized(model, torch.randn(4, 3, 32, 32))


@pytest.mark.slow
def test_vit_b_16():
    model = torchvision.models.vit_b_16(num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    with pytest.warns(UserWarning, match="out_proj"):
        model = binarize_model(model)
    check_binarized(model, torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_same_with_and_without_grad(activation):
    with pytest.warns(UserWarning, match="out_proj"):
        model = binarize_model(Encoder(activation))
    report = model.binarization_report
    assert report.fast_path_disabled == ["encoder.layers.0", "encoder.layers.1"]
    if activation == "relu":  # linear2 reads relu(linear1(x)): replaced
        assert set(report.replaced_activations) == {"encoder.layers.0.activation", "encoder.layers.1.activation"}
    x = torch.randn(4, 5, 8)
    check_binarized(model, x)
    model.eval()
    with torch.no_grad():
        fast = model(x)  # torch's fast path would run linear1/linear2 in float here
    slow = model(x)
    assert (fast - slow).abs().max() <= 1e-5 * slow.abs().max()
