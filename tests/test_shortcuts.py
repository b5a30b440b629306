"""Real-valued shortcuts around binary convs (``binarize_model(layer_shortcuts=True)``).

References: a float64 loop over pooling windows and channels for ``RealShortcut``; the block's output
recomputed by hand from its own submodules (``hardtanh(bn(conv(x)) + shortcut(x))``); the expected sets of
rewritten convs on hand-built graphs; the packed, reloaded and exported model against the eval model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_ovsw import binarize_model, load_packed, save_packed
from lightning_ovsw.convert import ADDED_NORM_WEIGHT
from lightning_ovsw.export import export_packed, load_exported
from lightning_ovsw.packing import pack_model
from lightning_ovsw.shortcuts import RealShortcut, shortcut_fits


def reference_shortcut(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Float64 loops: the mean of each ``stride x stride`` window (clipped at the border), then output channel
    ``j`` = mean of input channels ``j, j + C_out, ...`` (C_in a multiple of C_out), else channel
    ``j % C_in`` (more outputs) or ``j * C_in // C_out`` (fewer)."""
    x = x.double()
    n, c, h, w = x.shape
    oh, ow = math.ceil(h / stride), math.ceil(w / stride)
    pooled = torch.zeros(n, c, oh, ow, dtype=torch.float64)
    for i in range(oh):
        for j in range(ow):
            pooled[:, :, i, j] = x[:, :, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].mean((2, 3))
    out = torch.zeros(n, out_channels, oh, ow, dtype=torch.float64)
    for j in range(out_channels):
        if c % out_channels == 0:
            out[:, j] = pooled[:, j::out_channels].mean(1)
        else:
            out[:, j] = pooled[:, j % c] if out_channels > c else pooled[:, j * c // out_channels]
    return out


@pytest.mark.parametrize(("cin", "cout", "stride", "size"), [
    (8, 8, 1, 5), (4, 12, 1, 4), (4, 10, 2, 7), (12, 4, 2, 6), (12, 5, 3, 7), (6, 4, 1, 3),
])
def test_real_shortcut_matches_the_loop(cin, cout, stride, size):
    x = torch.randn(2, cin, size, size)
    got = RealShortcut(cin, cout, stride)(x)
    want = reference_shortcut(x, cout, stride)
    assert got.shape == want.shape and torch.allclose(got.double(), want, atol=1e-6)
    assert torch.allclose(RealShortcut(cin, cout, stride)(x[0]).double(), want[0], atol=1e-6)  # unbatched
    assert RealShortcut(cin, cout, stride).state_dict() == {}


def test_real_shortcut_follows_the_conv_geometry():
    for conv in (nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(4, 8, 3, 2, 1),
                 nn.Conv2d(4, 8, (1, 7), padding=(0, 3)), nn.Conv2d(4, 8, 5, 3, 2)):
        assert shortcut_fits(conv), conv
        for size in (7, 8, 9):
            x = torch.randn(1, 4, size, size)
            assert RealShortcut.for_conv(conv)(x).shape == conv(x).shape
    for conv in (nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.Conv2d(4, 8, 2, padding=1),
                 nn.Conv2d(4, 8, 3, stride=(2, 1), padding=1), nn.Conv2d(4, 8, 3, padding="same")):
        assert not shortcut_fits(conv), conv
    with pytest.raises(ValueError, match="positive"):
        RealShortcut(4, 0, 1)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.hardtanh(self.bn(self.conv(x)))


class Net(nn.Module):
    """stem; a: expand 8 -> 16 with stride 2; b: 16 -> 16; shared: one conv called twice (no shortcut);
    nonorm: no norm after it; split: its norm is owned by the parent (no shortcut); valid: 3x3 without
    padding (no shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = Block(8, 16, 2), Block(16, 16)
        self.shared, self.shared_bn1, self.shared_bn2 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        self.nonorm = nn.Conv2d(16, 16, 1)
        self.split = Block(16, 16)
        self.split_bn = nn.BatchNorm2d(16)
        self.valid, self.valid_bn = nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.b(self.a(F.hardtanh(self.stem(x))))
        x = F.hardtanh(self.shared_bn1(self.shared(x)) + self.shared_bn2(self.shared(x)))
        x = F.hardtanh(self.split_bn(self.split.conv(x + self.nonorm(x))))
        x = F.hardtanh(self.valid_bn(self.valid(x)))
        return self.fc(x.mean((2, 3)))


def test_binarize_model_adds_shortcuts_where_they_fit():
    model = binarize_model(Net())
    report = model.binarization_report
    assert report.real_shortcuts == ["a.conv", "b.conv"]
    assert {"a.bn", "b.bn"} <= set(report.zero_initialized) and not model.a.bn.weight.detach().any()
    assert isinstance(model.a, fx.GraphModule) and type(model.a).__name__ == "Block"
    assert isinstance(model.a.conv_shortcut, RealShortcut) and not isinstance(model, fx.GraphModule)
    assert list(model.state_dict()) == list(Net().state_dict())  # same keys: float checkpoints load
    assert "real-valued shortcuts" in " ".join(report.notes())
    plain = binarize_model(Net(), layer_shortcuts=False)
    assert not plain.binarization_report.real_shortcuts and type(plain.a) is Block


def test_rewritten_block_computes_the_bi_real_formula():
    torch.manual_seed(0)
    model = binarize_model(Net())
    with torch.no_grad():
        for bn in (model.a.bn, model.b.bn):  # as after some training: the binary branch matters
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(4, 8, 9, 9)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        block = model.a
        with torch.no_grad():
            stats = block.bn.running_mean.clone(), block.bn.running_var.clone()
            got = block(x)
            block.bn.running_mean.copy_(stats[0])
            block.bn.running_var.copy_(stats[1])
            branch = block.bn(block.conv(x))
            want = F.hardtanh(branch.double() + reference_shortcut(x, 16, 2))
        assert torch.allclose(got.double(), want, atol=1e-5), mode
        assert not torch.allclose(got, F.hardtanh(branch), atol=1e-2)  # the shortcut is really there


def test_root_owner_becomes_a_graph_module():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
                nn.BatchNorm2d(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(F.hardtanh(self.bn(self.conv(F.hardtanh(self.stem(x))))).mean((2, 3)))

    model = binarize_model(Flat())
    assert isinstance(model, fx.GraphModule) and model.binarization_report.real_shortcuts == ["conv"]
    assert isinstance(model.conv_shortcut, RealShortcut)


class ReluBlock(Block):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ReluOwner(nn.Module):
    """``b``'s forward ends in a functional ReLU that feeds ``c``: binarizing ``c`` later retraces ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b, self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), ReluBlock(8, 8), nn.Conv2d(8, 8, 1), \
            nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.c(self.b(F.hardtanh(self.stem(x)))).mean((2, 3)))


def test_a_second_binarization_keeps_the_shortcuts():
    once = binarize_model(ReluOwner(), filter_fn=lambda m, name: name == "b.conv")
    assert once.binarization_report.real_shortcuts == ["b.conv"]
    twice = binarize_model(once, filter_fn=lambda m, name: name == "c")
    assert twice.binarization_report.traced  # the binary layers of the first pass are leaves of the trace
    assert twice.binarization_report.replaced_activations == {"relu() in b": "F.hardtanh"}
    assert isinstance(twice.b.conv_shortcut, RealShortcut)  # not traced through into a bare nn.Module


def trained_net() -> nn.Module:
    torch.manual_seed(1)
    model = binarize_model(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(4):  # moves the zero-initialised norms and the running statistics
        x = torch.randn(8, 3, 12, 12)
        F.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_packed_model_with_shortcuts_matches_in_files_and_exports(tmp_path):
    model = trained_net()
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(model(torch.randn(5, 3, 12, 12)), expected)  # depends on the input
        packed = pack_model(model)
        assert torch.allclose(packed(x), expected, atol=1e-4)
    assert isinstance(packed.a.conv_shortcut, RealShortcut)  # kept whole by the fusions' retrace
    save_packed(packed, tmp_path / "m.ovsw")
    loaded = load_packed(tmp_path / "m.ovsw", binarize_model(Net()))
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-4)
    export_packed(packed, x, tmp_path / "m.pt2")
    assert torch.allclose(load_exported(tmp_path / "m.pt2")(x), expected, atol=1e-4)
    # the shortcuts have no tensors: only the file's module table tells the two architectures apart
    with pytest.raises(ValueError, match="layer 'a.conv_shortcut' is .*'RealShortcut'.* in the file, absent"):
        load_packed(tmp_path / "m.ovsw", binarize_model(Net(), layer_shortcuts=False))
    plain = pack_model(binarize_model(Net(), layer_shortcuts=False))
    save_packed(plain, tmp_path / "plain.ovsw")
    with pytest.raises(ValueError, match="layer 'a.conv_shortcut' is absent in the file, .*'RealShortcut'"):
        load_packed(tmp_path / "plain.ovsw", binarize_model(Net()))


def test_centered_shortcut_subtracts_the_convs_threshold():
    x = torch.rand(3, 4, 6, 6) + 0.5  # a max-pool output: mostly positive
    mean = torch.rand(4)
    shortcut = RealShortcut(4, 8, 2, centered=True)
    shortcut.train()  # the batch's channel mean, as the conv thresholds in training
    want = reference_shortcut(x - x.mean((0, 2, 3), keepdim=True), 8, 2)
    assert torch.allclose(shortcut(x, mean).double(), want, atol=1e-6)
    shortcut.eval()  # the running mean it is given
    want = reference_shortcut(x - mean.view(1, -1, 1, 1), 8, 2)
    assert torch.allclose(shortcut(x, mean).double(), want, atol=1e-6)
    assert torch.allclose(shortcut(x[0], mean).double(), want[0], atol=1e-6)  # unbatched
    with pytest.raises(ValueError, match="needs the conv's running input mean"):
        shortcut(x)
    with pytest.raises(ValueError, match="uncentered one takes none"):
        RealShortcut(4, 8, 2)(x, mean)
    assert "centered" in repr(shortcut) and shortcut.state_dict() == {}


class NoNorm(nn.Module):
    """No normalization anywhere (squeezenet's pattern): stem, ReLU, max-pool, then ``a`` (centered), ``b``,
    and ``twice``, one conv called twice (it gets no norm: a shared norm would mix the calls' statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2)
        self.a, self.b, self.twice = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(self.pool(F.relu(self.stem(x)))))))
        x = F.relu(self.twice(F.relu(self.twice(x))))
        return self.fc(x.mean((2, 3)))


def test_batchnorm_policy_adds_a_norm_and_a_centered_shortcut():
    model = binarize_model(NoNorm(), unnormalized="batchnorm")
    report = model.binarization_report
    assert report.added_norms == ["a", "b"] and report.real_shortcuts == ["a", "b"] and report.centered == ["a"]
    assert report.rescaled == {"twice": "mean"} and not report.zero_initialized
    assert isinstance(model.a_norm, nn.BatchNorm2d) and torch.all(model.a_norm.weight == ADDED_NORM_WEIGHT)
    assert model.a_shortcut.centered and not model.b_shortcut.centered
    assert set(model.state_dict()) - set(NoNorm().state_dict()) == {
        f"{n}_norm.{k}" for n in "ab" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    } | {"a.input_mean"}
    assert "BatchNorm2d added after" in " ".join(report.notes())
    with pytest.warns(UserWarning, match="no binary conv of NoNorm has a normalization.*unnormalized='batchnorm'"):
        default = binarize_model(NoNorm()).binarization_report
    assert not default.added_norms and not default.real_shortcuts and set(default.rescaled) == {"a", "b", "twice"}

    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    model.train()
    model(x)  # running statistics
    model.eval()
    with torch.no_grad():  # the forward recomputed from the submodules, in float64 for the shortcuts
        h = model.pool(F.hardtanh(model.stem(x)))
        h = F.hardtanh(model.a_norm(model.a(h)).double() + reference_shortcut(h - model.a.input_mean.view(1, -1, 1, 1), 16, 1))
        h = F.hardtanh(model.b_norm(model.b(h.float())).double() + reference_shortcut(h, 16, 1)).float()
        h = F.hardtanh(model.twice(F.hardtanh(model.twice(h))))  # every F.relu of the forward was replaced
        want = model.fc(h.mean((2, 3)))
        got = model(x)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, model(torch.randn(6, 3, 8, 8)), atol=1e-3)  # depends on the input
        packed = pack_model(model)
        assert torch.allclose(packed(x), got, atol=1e-4)


def test_centered_shortcuts_are_in_the_file_table(tmp_path):
    model = binarize_model(NoNorm(), unnormalized="batchnorm")
    model.train()
    model(torch.randn(4, 3, 8, 8))
    packed = pack_model(model)
    save_packed(packed, tmp_path / "m.ovsw")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load_packed(tmp_path / "m.ovsw", binarize_model(NoNorm(), unnormalized="batchnorm"))(x),
                              packed(x), atol=1e-5)
    target = binarize_model(NoNorm(), unnormalized="batchnorm")
    target.a_shortcut.centered = False  # the same tensors, another function
    with pytest.raises(ValueError, match="layer 'a_shortcut' is .*'centered': True.* in the file"):
        load_packed(tmp_path / "m.ovsw", target)
    with pytest.warns(UserWarning, match="unnormalized='batchnorm'"):
        plain = binarize_model(NoNorm())
    with pytest.raises(ValueError, match="layer 'a_shortcut' is .* in the file, absent from the model.*unnormalized"):
        load_packed(tmp_path / "m.ovsw", plain)
