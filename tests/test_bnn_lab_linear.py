"""benchmarks/bnn_lab_linear.py: both layers compute the same thing before they are timed (bnn-lab optional)."""

import argparse
import json

import pytest
import torch
from _benchmarks import load_benchmark

bench = load_benchmark("bnn_lab_linear")


def test_the_benchmark_runs_and_records_what_it_compared(tmp_path):
    report = bench.main(["--repeats", "3", "--sizes", "2x70x33", "--threads", "1", "--out", str(tmp_path)])
    (row,) = report["rows"]
    assert (row["batch"], row["in_features"], row["out_features"], row["threads"]) == (2, 70, 33, 1)
    assert set(row["latency_us"]["ovsw_packed_linear"]) == {"median", "min"}
    installed = bench.PackedBinaryXNORLinear is not None
    assert ("bnn_lab" in row["latency_us"]) == installed == (report["versions"]["bnn_lab"] is not None)
    assert (row["ours_faster_by"] is not None) == installed
    assert json.loads(next(tmp_path.glob("bnn_lab_linear_*.json")).read_text())["rows"] == report["rows"]


def test_bnn_lab_layer_equals_ours():
    if bench.PackedBinaryXNORLinear is None:
        pytest.skip(f"bnn-lab is not installed ({bench.INSTALL})")
    fns = bench.layers(300, 50)
    x = torch.randn(3, 300)
    assert bench.check_equal(fns, x) <= 1e-6
    with torch.inference_mode():  # and both depend on the input
        assert not torch.equal(fns["bnn_lab"](x), fns["bnn_lab"](-x))


def test_a_layer_computing_something_else_is_refused():
    ours = bench.layers(70, 33)["ovsw_packed_linear"]
    with pytest.raises(RuntimeError, match="differs from packed_linear"):
        bench.check_equal({"ovsw_packed_linear": ours, "other": lambda x: -ours(x)}, torch.randn(2, 70))


@pytest.mark.parametrize("text", ["1x4096", "0x5x5", "axbxc"])
def test_bad_sizes_are_explained(text):
    with pytest.raises(argparse.ArgumentTypeError, match="BATCHxIN_FEATURESxOUT_FEATURES|positive"):
        bench.parse_size(text)
