"""Binary linear layers on CPU: ``PackedLinear`` against bnn-lab's ``PackedBinaryXNORLinear`` (issue 13).

bnn-lab 1.0 is the other pip-installable x86 binary linear layer. Install it beside this project with
``pip install --no-deps bnn-lab==1.0.0`` (its metadata pins torch<2.13 and numpy<2, but its XNOR-popcount
kernel is a plain C library it loads with ctypes, so it runs beside our torch; without it the benchmark
times ours alone and says so). Both modules take float input and return float output: the input's signs
packed, the XNOR-popcount GEMM against the signs of the same weight (w >= 0 is +1 in both), times the same
per-output scale, plus the same bias. The outputs are checked equal first; then each size is timed at 1 and
2 threads (``torch.set_num_threads`` and bnn-lab's ``set_num_threads``), both modules interleaved in
shuffled order, median and minimum.

    python benchmarks/bnn_lab_linear.py [--repeats 300] [--sizes 1x4096x4096,16x4096x4096,1x512x1000]

Prints a table and writes ``benchmarks/results/bnn_lab_linear_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import cpu_name, cpu_times, steal_share
from cpu_inference import latencies_ms
from lightning_ovsw.kernels import cpu
from torch import nn

import lightning_ovsw
from lightning_ovsw.layers import BinaryLinear
from lightning_ovsw.packed_layers import PackedLinear

RESULTS = Path(__file__).parent / "results"
INSTALL = "pip install --no-deps bnn-lab==1.0.0"

try:
    from bnn.kernels import packed as bnn_kernels
    from bnn.wrap.packed_linear import PackedBinaryXNORLinear
except ImportError:  # not installed: ours alone
    bnn_kernels = PackedBinaryXNORLinear = None


def parse_size(text: str) -> tuple[int, int, int]:
    """``"BxKxN"`` -> (batch, in_features, out_features)."""
    try:
        batch, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is BATCHxIN_FEATURESxOUT_FEATURES, got {text!r}") from None
    if min(batch, k, n) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return batch, k, n


def layers(k: int, n: int, seed: int = 0) -> dict[str, nn.Module]:
    """Our packed layer of a random ``BinaryLinear(k, n)`` (its scale and bias), and bnn-lab's layer of the
    same weight with that scale as its ``alpha`` and the same bias (when bnn-lab is installed)."""
    torch.manual_seed(seed)
    binary = BinaryLinear(k, n).eval()
    with torch.no_grad():
        binary.bias.normal_()
    ours = PackedLinear.from_binary(binary)
    found = {"ovsw_packed_linear": ours}
    if PackedBinaryXNORLinear is not None:
        alpha = ours.scale if ours.scale is not None else torch.ones(n)
        found["bnn_lab"] = PackedBinaryXNORLinear(binary.weight.detach(), ours.bias, alpha=alpha)
    return found


def check_equal(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    """Largest |difference| between each layer's output and ours, relative to our largest |output|; raises
    when it is not at float32 rounding (the layers would not compute the same thing)."""
    with torch.inference_mode():
        ours = fns["ovsw_packed_linear"](x)
        worst = 0.0
        for name, fn in fns.items():
            diff = (fn(x) - ours).abs().max().item() / max(ours.abs().max().item(), 1e-30)
            if not diff <= 1e-5:
                raise RuntimeError(f"{name}'s output differs from packed_linear's by {diff:.3g} (relative)")
            worst = max(worst, diff)
    return worst


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if bnn_kernels is not None:
        bnn_kernels.set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--sizes", type=lambda s: [parse_size(v) for v in s.split(",")],
                        default=[(1, 4096, 4096), (16, 4096, 4096), (1, 512, 1000)])
    parser.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if cpu.load_extension() is None:
        sys.exit(f"the C++ CPU kernels did not build: {cpu.build_error()}")
    if PackedBinaryXNORLinear is None:
        print(f"bnn-lab is not installed ({INSTALL}): timing packed_linear alone")
    load_start, times_start = os.getloadavg()[0], cpu_times()
    rows = []
    for batch, k, n in args.sizes:
        fns = layers(k, n)
        x = torch.randn(batch, k)
        diff = check_equal(fns, x)
        for threads in args.threads:
            set_threads(threads)
            lat = latencies_ms(fns, x, args.repeats, warmup=20)
            ratio = ({stat: lat["bnn_lab"][stat] / lat["ovsw_packed_linear"][stat] for stat in ("median", "min")}
                     if "bnn_lab" in lat else None)
            rows.append({"batch": batch, "in_features": k, "out_features": n, "threads": threads,
                         "latency_us": {name: {s: v * 1e3 for s, v in t.items()} for name, t in lat.items()},
                         "ours_faster_by": ratio, "max_rel_diff_vs_ours": diff})
    steal = steal_share(times_start, cpu_times())

    print(f"{'batch x in -> out':<22}{'threads':>8}{'ours median (min) us':>24}{'bnn-lab median (min) us':>27}"
          f"{'ours faster by':>22}")
    for r in rows:
        ours, theirs = r["latency_us"]["ovsw_packed_linear"], r["latency_us"].get("bnn_lab")
        cells = [f"{ours['median']:>14.1f} ({ours['min']:6.1f})"]
        if theirs:
            cells += [f"{theirs['median']:>17.1f} ({theirs['min']:6.1f})",
                      f"{r['ours_faster_by']['median']:>12.2f}x ({r['ours_faster_by']['min']:.2f}x)"]
        print(f"{r['batch']:>5} x {r['in_features']:>5} -> {r['out_features']:<5}{r['threads']:>8}" + "".join(cells))
    print(f"1-min load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}"
          + (f"; CPU time stolen by other guests: {steal:.1%}" if steal is not None else ""))

    date = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "bnn_lab_linear",
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv})",
        "device": {"cpu": cpu_name(), "machine": platform.machine(), "logical_cpus": os.cpu_count(),
                   "isa": cpu.get_isa()},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "cpu_steal_share": steal,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning_ovsw": lightning_ovsw.__version__,
                     "bnn_lab": _bnn_lab_version()},
        "note": "float input -> float output for both layers (sign-and-pack, XNOR-popcount GEMM, scale, bias); "
                "ours_faster_by = bnn-lab time / ours (median, min), both interleaved in one run",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bnn_lab_linear_{date:%Y%m%d_%H%M}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return report


def _bnn_lab_version() -> str | None:
    if PackedBinaryXNORLinear is None:
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bnn-lab")
    except PackageNotFoundError:  # importable from a path, not installed
        return "unknown (not installed as a distribution)"


if __name__ == "__main__":
    main()
