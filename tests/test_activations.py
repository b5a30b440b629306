"""binarize_model's analysis of never-negative inputs on hand-built graphs: which activations it replaces."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_ovsw import binarization_summary, binarize_model
from lightning_ovsw.registry import binary_layers


def replaced(model: nn.Module) -> set[str]:
    return set(model.binarization_report.replaced_activations)


def binary_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input every binary layer sees on ``x`` (eval mode)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
             for n, m in binary_layers(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def test_relu_pool_flatten_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.1), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), nn.Linear(8, 2))
    out = binarize_model(model)
    assert replaced(out) == {"1"} and type(out[1]) is nn.Hardtanh
    assert out.binarization_report.non_negative_inputs == {"5": ["1"]}
    assert type(model[1]) is nn.ReLU  # inplace=False leaves the original alone
    assert (binary_inputs(out, torch.randn(2, 3, 8, 8))["5"] < 0).any()


class SharedReLU(nn.Module):
    """One ``self.relu`` called three times (as torchvision's BasicBlock calls it twice); the last use feeds
    only the float classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.other = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(self.conv(x))
        return self.fc(torch.flatten(self.pool(self.other(x)), 1))


def test_shared_module_is_replaced_as_a_whole():
    out = binarize_model(SharedReLU())
    assert replaced(out) == {"relu"}  # "other" feeds only the float classifier
    assert type(out.relu) is nn.Hardtanh and out.relu.inplace and type(out.other) is nn.ReLU


class Residual(nn.Module):
    def __init__(self, negative_branch: bool) -> None:
        super().__init__()
        self.negative_branch = negative_branch
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        shortcut = self.bn(self.a(x)) if self.negative_branch else self.relu2(self.a(x))
        return self.head(self.conv(self.relu1(self.stem(x)) + shortcut))


def test_residual_add():
    # relu(.) + relu(.) is never negative: both sources go
    both = binarize_model(Residual(negative_branch=False), filter_fn=lambda m, n: n == "conv")
    assert replaced(both) == {"relu1", "relu2"}
    # relu(.) + bn(.) can be negative: nothing to do
    mixed = binarize_model(Residual(negative_branch=True), filter_fn=lambda m, n: n == "conv")
    assert replaced(mixed) == set() and mixed.binarization_report.non_negative_inputs == {}


class Concat(nn.Module):
    def __init__(self, negative_part: bool) -> None:
        super().__init__()
        self.negative_part = negative_part
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.relu_a, self.relu_b = nn.ReLU6(), nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        b = self.b(x) if self.negative_part else self.relu_b(self.b(x))
        y = self.conv(F.max_pool2d(torch.cat([self.relu_a(self.a(x)), b], dim=1), 2))
        return self.head(y.mean((2, 3)))


def test_concatenation():
    both = binarize_model(Concat(negative_part=False), filter_fn=lambda m, n: n == "conv")
    assert replaced(both) == {"relu_a", "relu_b"} and type(both.relu_a) is nn.Hardtanh
    assert (binary_inputs(both, torch.randn(2, 3, 8, 8))["conv"] < 0).any()
    mixed = binarize_model(Concat(negative_part=True), filter_fn=lambda m, n: n == "conv")
    assert replaced(mixed) == set()


class Block(nn.Module):
    """torchvision's Inception ``BasicConv2d``: a functional ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = Block(3, 8), Block(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).mean((2, 3)).relu())


def test_functional_relu_in_a_submodule_and_in_the_root():
    out = binarize_model(Functional(), skip_first=False, layer_shortcuts=False)  # b2.conv reads b1's relu
    assert type(out) is Functional and replaced(out) == {"relu() in b1"}
    assert isinstance(out.b1, fx.GraphModule) and type(out.b1).__name__ == "Block" and type(out.b2) is Block
    assert list(out.state_dict()) == list(Functional().state_dict())
    assert (binary_inputs(out, torch.randn(2, 3, 6, 6))["b2.conv"] < 0).any()
    # a root-level x.relu() feeding a binary layer: the returned model is a GraphModule
    root = binarize_model(Functional(), skip_last=False, filter_fn=lambda m, n: n == "fc")
    # through mean(): b2's relu as well (Hardtanh keeps the sign of what it reads)
    assert isinstance(root, fx.GraphModule) and replaced(root) == {"relu() in the model forward", "relu() in b2"}
    assert root.code.count("functional.relu(") == 1  # b1's feeds the float b2.conv only: kept
    assert (binary_inputs(root, torch.randn(2, 3, 6, 6))["fc"] < 0).any()


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.relu, self.unused_relu = nn.ReLU(), nn.ReLU6()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = self.conv(x)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_every_relu_module():
    with pytest.warns(UserWarning, match="does not trace"):
        out = binarize_model(Untraceable())
    assert replaced(out) == {"relu", "unused_relu"} and not out.binarization_report.traced
    assert type(out.relu) is nn.Hardtanh and type(out.unused_relu) is nn.Hardtanh
    with pytest.raises(ValueError, match="does not trace"):
        binarize_model(Untraceable(), activation="error")
    with pytest.warns(UserWarning, match="does not trace"):
        kept = binarize_model(Untraceable(), activation="keep")
    assert type(kept.relu) is nn.ReLU


def test_keep_warns_once_and_error_raises_naming_every_layer():
    model = SharedReLU()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = binarize_model(model, activation="keep", skip_first=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "conv <- relu" in messages[0] and "stem" not in messages[0]
    assert type(out.relu) is nn.ReLU and out.binarization_report.unresolved == ["conv"]
    assert "never-negative" in "\n".join(binarization_summary(out).notes)
    with pytest.raises(ValueError, match="conv <- relu"):
        binarize_model(model, activation="error")
    with pytest.raises(ValueError, match="activation"):
        binarize_model(model, activation="relu")


def test_sigmoid_gate_is_reported_not_replaced():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))  # initialise the lazy classifier
    with pytest.warns(UserWarning, match="sigmoid-like"):
        out = binarize_model(model)
    assert replaced(out) == set() and out.binarization_report.unresolved == ["2"]


def test_summary_lists_replacements():
    out = binarize_model(SharedReLU())
    notes = "\n".join(binarization_summary(out, (1, 3, 4, 4)).notes)
    assert "relu -> Hardtanh" in notes and "relu -> Hardtanh" in str(binarization_summary(out))
