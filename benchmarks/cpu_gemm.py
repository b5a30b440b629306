"""CPU packed conv / linear kernels vs the float32 PyTorch a user would otherwise run (issue 6).

Every binary conv shape of ImageNet ResNet-18 at batch 1 (224x224; with the 1x1 stride-2 downsample
convs), plus two binary linear layers, at 1 and 2 threads, for each microkernel family this CPU runs
(``avx512``, ``avx2``, ``portable``), all in one run on the same cores:

- ``conv``: ``ovsw.packed_conv2d`` on packed NHWC input with the fused epilogue (scale, bias, fp32 out),
  i.e. the XOR-popcount GEMM rate;
- ``layer``: the same plus the input's sign-and-pack (``ovsw.sign_pack_nchw`` of a channels_last tensor);
- baseline: ``F.conv2d`` fp32 channels_last with bias (``F.linear``, i.e. one ``addmm``, for linear layers).

Times are medians of repeats timed in alternating blocks; only ratios are reported (baseline time / ours),
per shape and for the whole stack (each shape weighted by how often ResNet-18 has it).

    python benchmarks/cpu_gemm.py [--repeats 30] [--isas avx512,avx2,portable]

Prints a table and writes ``benchmarks/results/cpu_gemm_<date>.json`` (CPU, ISA, versions, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_name
from lightning_ovsw.kernels import cpu, ops

RESULTS = Path(__file__).parent / "results"

# (in_channels, out_channels, input size, kernel, stride, count in ResNet-18)
CONV_SHAPES = [
    (64, 64, 56, 3, 1, 4),
    (64, 128, 56, 3, 2, 1),
    (128, 128, 28, 3, 1, 3),
    (64, 128, 56, 1, 2, 1),
    (128, 256, 28, 3, 2, 1),
    (256, 256, 14, 3, 1, 3),
    (128, 256, 28, 1, 2, 1),
    (256, 512, 14, 3, 2, 1),
    (512, 512, 7, 3, 1, 3),
    (256, 512, 14, 1, 2, 1),
]
# (batch, in_features, out_features)
LINEAR_SHAPES = [(1, 512, 1000), (16, 4096, 4096)]


def medians(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of each function (and the minimum, as ``<name>@min``: on shared cores the
    less disturbed estimate). Timed in blocks of consecutive calls, the blocks alternating over a few rounds,
    each after two warm-up calls: alternating single calls of oneDNN's conv with any other OpenMP-parallel op
    stalls for milliseconds at 2 threads on these VMs (pure PyTorch does it too), which no user loop sees."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            fn()
            for _ in range(max(1, repeats // rounds)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}@min": min(t) for name, t in times.items()}


def conv_case(cin: int, cout: int, size: int, k: int, stride: int, isas: list[str], repeats: int) -> dict:
    x = torch.randn(1, cin, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    w_bits = ops.sign_pack(w.permute(0, 2, 3, 1).contiguous())
    x_bits = ops.sign_pack_nchw(x)
    pad = k // 2
    geometry = ([stride, stride], [pad, pad], [1, 1], 0)

    def conv():
        return torch.ops.ovsw.packed_conv2d(x_bits, w_bits, cin, *geometry, scale, bias, None, torch.float32)

    def layer():
        bits = torch.ops.ovsw.sign_pack_nchw(x)
        return torch.ops.ovsw.packed_conv2d(bits, w_bits, cin, *geometry, scale, bias, None, torch.float32)

    fns: dict[str, Callable[[], object]] = {"fp32": lambda: F.conv2d(x, w_cl, bias, stride, pad)}
    for isa in isas:
        fns[f"{isa}/conv"] = _with_isa(isa, conv)
        fns[f"{isa}/layer"] = _with_isa(isa, layer)
    return medians(fns, repeats)


def linear_case(batch: int, k: int, n: int, isas: list[str], repeats: int) -> dict:
    x, w = torch.randn(batch, k), torch.randn(n, k)
    bias, scale = torch.randn(n), torch.rand(n) + 0.5
    w_bits, x_bits = ops.sign_pack(w), ops.sign_pack(x)

    def conv():
        return torch.ops.ovsw.packed_linear(x_bits, w_bits, k, scale, bias, None, torch.float32)

    def layer():
        return torch.ops.ovsw.packed_linear(torch.ops.ovsw.sign_pack(x), w_bits, k, scale, bias, None,
                                            torch.float32)

    fns: dict[str, Callable[[], object]] = {"fp32": lambda: F.linear(x, w, bias)}
    for isa in isas:
        fns[f"{isa}/conv"] = _with_isa(isa, conv)
        fns[f"{isa}/layer"] = _with_isa(isa, layer)
    return medians(fns, repeats)


def _with_isa(isa: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        cpu.set_isa(isa)
        return fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--isas", default=None, help="comma-separated subset of avx512,avx2,portable")
    args = parser.parse_args()
    if cpu.load_extension() is None:
        sys.exit(f"the C++ CPU kernels did not build: {cpu.build_error()}")
    available = [i for i in cpu.available_isas() if i != "neon" or platform.machine() == "aarch64"]
    isas = [i for i in (args.isas.split(",") if args.isas else available) if i in available]
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for cin, cout, size, k, stride, count in CONV_SHAPES:
            t = conv_case(cin, cout, size, k, stride, isas, args.repeats)
            shape = f"{cin}->{cout} {k}x{k}/{stride} @{size}"
            rows.append({"kind": "conv", "threads": threads, "shape": shape, "count": count, "times": t,
                         "binary_macs": cout * cin * k * k * ((size + 2 * (k // 2) - k) // stride + 1) ** 2})
        for batch, k, n in LINEAR_SHAPES:
            t = linear_case(batch, k, n, isas, args.repeats)
            rows.append({"kind": "linear", "threads": threads, "shape": f"{k}->{n} batch {batch}", "count": 0,
                         "times": t, "binary_macs": batch * k * n})
    cpu.set_isa(None)

    results = []
    print(f"{'threads':>7} {'shape':<28}" + "".join(f"{i + ' conv':>14}{i + ' +pack':>14}" for i in isas))
    for r in rows:
        ratios = {name: r["times"]["fp32"] / t for name, t in r["times"].items()
                  if "@" not in name and name != "fp32"}
        ratios |= {name: r["times"]["fp32@min"] / t for name, t in r["times"].items()
                   if "@" in name and name != "fp32@min"}
        results.append({k: r[k] for k in ("kind", "threads", "shape", "count", "binary_macs")}
                       | {"speedup_vs_fp32": ratios})
        print(f"{r['threads']:>7} {r['shape']:<28}" + "".join(
            f"{ratios[i + '/conv']:>13.2f}x{ratios[i + '/layer']:>13.2f}x" for i in isas))
    totals = {}
    for threads in (1, 2):
        conv_rows = [r for r in rows if r["kind"] == "conv" and r["threads"] == threads]
        base = sum(r["times"]["fp32"] * r["count"] for r in conv_rows)
        base_min = sum(r["times"]["fp32@min"] * r["count"] for r in conv_rows)
        totals[str(threads)] = {
            name: (base_min if "@" in name else base) / sum(r["times"][name] * r["count"] for r in conv_rows)
            for name in conv_rows[0]["times"] if name not in ("fp32", "fp32@min")}
        print(f"{threads:>7} {'all binary convs (weighted)':<28}" + "".join(
            f"{totals[str(threads)][i + '/conv']:>13.2f}x{totals[str(threads)][i + '/layer']:>13.2f}x"
            for i in isas))

    env = {
        "cpu": cpu_name(), "machine": platform.machine(), "isas": isas, "default_isa": cpu.get_isa(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report = {
        "benchmark": "cpu_gemm", "env": env,
        "note": "speedup_vs_fp32 = median fp32 time / median ovsw time (keys with @min: ratio of the "
                "minima), measured in alternating blocks in one run; "
                "'conv' = packed_conv2d/packed_linear with fused epilogue on packed input, 'layer' = plus "
                "the input's sign-and-pack; totals weight each ResNet-18 conv shape by its count.",
        "rows": results, "total_binary_convs_speedup_vs_fp32": totals,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cpu_gemm_{env['date'][:10]}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
