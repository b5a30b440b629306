"""benchmarks/openvino_baseline.py: OpenVINO's translation of a binarized model equals our packed model."""

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from lightning_ovsw.convert import binarize_model
from lightning_ovsw.layers import BinaryConv2d
from lightning_ovsw.models._common import LayerFactory
from lightning_ovsw.models.resnet_imagenet import ImageNetBlock

pytest.importorskip("openvino")

from _benchmarks import load_benchmark  # noqa: E402

ob = load_benchmark("openvino_baseline")
cpu_inference = load_benchmark("cpu_inference")  # its calibrate and float_twin, the benchmark's own


class TinyNet(nn.Module):
    """The ImageNet ResNet's structure in small: float stem conv + BN + hardtanh + max-pool, a block with
    an identity shortcut, a stride-2 block (binary 3x3 convs, padding 1, average-pool + float 1x1 conv
    shortcut), global pool, BN1d, float fc."""

    def __init__(self, pad_value: int = 0) -> None:
        super().__init__()
        factory = LayerFactory(True, {"pad_value": pad_value})
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.hardtanh = nn.Hardtanh()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = ImageNetBlock(factory, 32, 32, 1)
        self.layer2 = ImageNetBlock(factory, 32, 64, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.hardtanh(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(self.bn2(self.avgpool(x).flatten(1)))


def torchvision_style() -> nn.Module:
    """``binarize_model`` of torchvision BasicBlocks in small: the first block's output feeds only binary
    convs (the next block's conv1 and its 1x1 stride-2 downsample), the pattern OpenVINO's CPU plugin
    miscomputes unless its FakeQuantize stays unfused (see openvino_baseline's docstring). Without the
    real-valued shortcuts, which ``to_openvino`` does not translate."""
    down = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), BasicBlock(32, 32),
        BasicBlock(32, 64, 2, down), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    return binarize_model(net, layer_shortcuts=False)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad_value", [0, 1])
def test_binary_conv_equals_layer_also_at_zero(stride, pad_value):
    """One BinaryConv2d (padding 1) on an input with exact 0 and -0.0 (sign +1 in ours): FakeQuantize's
    threshold, BinaryConvolution's pad_value and the u1 bit order; the other bit order must not match."""
    layer = BinaryConv2d(64, 40, 3, stride, 1, bias=True, pad_value=pad_value).eval()
    nn.init.uniform_(layer.bias, -1, 1)
    x = torch.randn(2, 64, 9, 9)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::7] = -0.0
    with torch.no_grad():
        ours = layer(x)
    for bitorder, equal in (("little", True), ("big", False)):
        model = ob.to_openvino(nn.Sequential(layer), x.shape, bitorder=bitorder)
        out = torch.from_numpy(ob.runner(ob.compile_cpu(model, 1))(x))
        assert torch.allclose(out, ours, rtol=1e-6, atol=1e-6) is equal, bitorder


@pytest.mark.parametrize("net", [TinyNet, lambda: TinyNet(pad_value=1), torchvision_style],
                         ids=["imagenet_block", "imagenet_block_pad1", "torchvision_block"])
def test_tiny_network_equals_packed_model(net):
    model = cpu_inference.calibrate(net())
    inputs = [torch.randn(1, 3, 32, 32) for _ in range(3)]
    result = ob.compare(model, inputs)
    assert result["fraction_logits_agree_1e-3"] == 1.0, result
    assert result["max_abs_diff_rel"] < 1e-5, result
    run = ob.runner(ob.compile_cpu(ob.to_openvino(model, inputs[0].shape), 1))
    assert not torch.allclose(torch.from_numpy(run(inputs[0])), torch.from_numpy(run(inputs[1])), rtol=1e-2)


def test_float_network_equals_torch():
    """Without binary layers the translation is the plain fp32 twin (the benchmark's 'OpenVINO fp32' row)."""
    model = cpu_inference.float_twin(cpu_inference.calibrate(TinyNet()))
    assert not any(isinstance(m, BinaryConv2d) for m in model.modules())
    x = torch.randn(1, 3, 32, 32)
    out = ob.runner(ob.compile_cpu(ob.to_openvino(model, x.shape), 1))(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def test_per_conv_times_pair_openvino_with_ours_in_call_order():
    """The benchmark's per-layer table: one OpenVINO BinaryConvolution (+ its input FakeQuantize) time per
    packed conv, in the same order, and the at-peak bound moves exactly by the conv time it replaces."""
    from lightning_ovsw.packing import pack_model

    model = cpu_inference.calibrate(TinyNet())
    packed = pack_model(model)
    x = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    compiled = ob.compile_cpu(ob.to_openvino(model, x.shape), 1, profiling=True)
    theirs = ob.binary_conv_times(compiled, x, 3)
    ours = cpu_inference.packed_conv_times(packed, x, 3)
    layers = cpu_inference.layer_profile(packed, x, 3)
    convs = [r["layer"] for r in layers if "shape" in r]
    assert convs == [n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]
    assert len(theirs) == len(ours) == len(convs) == 4
    assert all(t["min"] > 0 and t["median"] >= t["min"] for t in theirs + ours)
    rows = cpu_inference.conv_comparison(layers, ours, theirs, {"binary_gops": 1000.0})
    assert [r["layer"] for r in rows] == convs
    bound = cpu_inference.peak_bound_ms({"median": 10.0, "min": 9.0}, rows, {"binary_gops": 1000.0})
    at_peak = sum(r["binary_ops"] for r in rows) / 1e9
    assert bound["min"] == pytest.approx(9.0 - sum(r["ours_ms"]["min"] for r in rows) + at_peak)
