"""Shippable export: the exported packed model, loaded in a fresh process, equals the in-memory one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from lightning_ovsw.kernels.cpu import load_extension
from test_pack import SmallNet, with_bn_statistics

from lightning_ovsw.export import export_packed, load_exported
from lightning_ovsw.packing import pack_model

# A fresh interpreter that may import torch and the ops, but not Lightning nor the test's model class.
RUNNER = textwrap.dedent(
    """
    import sys
    sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # importing them would now fail
    import torch
    import lightning_ovsw.kernels.ops
    from torch.profiler import profile
    program = torch.export.load(sys.argv[1]).module()
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad(), profile() as prof:
        outputs = [program(x) for x in inputs]
    torch.save(outputs, sys.argv[3])
    ran = {e.key for e in prof.key_averages()}
    print("ok", "test_pack" in sys.modules, "SmallNet" in dir(), "ovsw_cpu::packed_conv2d" in ran)
    """
)


@pytest.fixture(scope="module")
def packed():
    x = torch.randn(4, 3, 12, 12)
    return pack_model(with_bn_statistics(SmallNet(pad_value=1, stride=2, dilation=1, conv_bias=True), x))


def test_exported_program_runs_in_a_fresh_process(tmp_path, packed):
    path = tmp_path / "small.pt2"
    size = export_packed(packed, torch.randn(1, 3, 12, 12), path)
    assert size == path.stat().st_size > 0
    inputs = [torch.randn(1, 3, 12, 12), torch.randn(5, 3, 12, 12)]  # the batch dimension is dynamic
    torch.save(inputs, tmp_path / "in.pt")
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # no test code in there; the program ran the C++ kernels wherever this machine can build them
    assert done.stdout.split() == ["ok", "False", "False", str(load_extension() is not None)]
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        for x, got in zip(inputs, outputs, strict=True):
            assert torch.equal(got, packed(x))


def test_exported_graph_calls_the_packed_ops(tmp_path, packed):
    path = tmp_path / "small.pt2"
    export_packed(packed, torch.randn(1, 3, 12, 12), path, dynamic_batch=False)
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"ovsw.sign_pack.default", "ovsw.packed_conv2d.default", "ovsw.packed_linear.default"} <= targets
    calls = [n for n in program.graph.nodes if str(n.target) == "ovsw.packed_conv2d.default"]
    assert len(calls) == 3  # conv1..conv3: every binary conv runs on packed bits
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(load_exported(path)(x), packed(x))


def test_export_rejects_unpacked_models(tmp_path):
    with pytest.raises(ValueError, match="pack_model"):
        export_packed(SmallNet(0, 1, 1, False), torch.randn(1, 3, 8, 8), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="Tensor"):
        export_packed(pack_model(SmallNet(0, 1, 1, False)), [1, 2], tmp_path / "m.pt2")
