"""Packed binary GEMM on one NVIDIA GPU vs cuBLAS bf16 (issue 5 targets), measured in one run.

1. ``8192 x 8192 x 8192``: packed GEMM (both operands packed, int32 out) vs bf16 ``torch.matmul``;
   target >= 1.5x. Each inner-product mode is timed on its own (autotuned within the mode) and as the
   default (all modes compete).
2. Batch 1 and 16 through an ``8192 x 8192`` binary linear layer (alpha scale, bf16 out) vs bf16
   ``F.linear``; target >= 8x. Also timed with the input's sign-and-pack included.

    python benchmarks/packed_gemm_gpu.py [--size 8192] [--batches 1 16] [--quick]

Times are ``triton.testing.do_bench`` medians (L2 flushed between repetitions). ``--quick`` (or
``OVSW_QUICK=1``, the one-shot GPU session) times only the default (autotuned) path, with fewer
repetitions. Every timed result is first checked against ``kernels/reference.py`` on a slice of rows. Prints a table and
writes ``benchmarks/results/packed_gemm_gpu_<date>.json`` (GPU, versions, date, command). Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
MODE_NAMES = {None: "auto", 0: "popcount", 1: "int8 dot", 2: "fp8 dot", 3: "2-pass int8", 4: "2-pass fp8"}


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(f"{Path(sys.argv[0]).name} needs a CUDA GPU with compiled Triton kernels "
                 "(TRITON_INTERPRET unset); nothing was measured.")


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
    }


def quick() -> bool:
    """Fewer modes and repetitions: ``--quick`` on the command line or ``OVSW_QUICK=1``."""
    return "--quick" in sys.argv or os.environ.get("OVSW_QUICK") == "1"


def bench_us(fn) -> float:
    """Median GPU time of ``fn`` in microseconds (``fn`` is run once first: compilation, autotuning)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    warmup, rep = (10, 60) if quick() else (50, 300)
    return 1e3 * do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def modes(ops) -> list:
    """Inner-product modes to time one by one (``None``: the default, all modes competing)."""
    if quick():
        return [None]
    found = [None, ops.POPC, ops.DOT_I8, ops.DENSE_I8]
    if torch.cuda.get_device_capability() >= (8, 9):
        found += [ops.DOT_F8, ops.DENSE_F8]
    return found


def check_rows(got: torch.Tensor, a_bits: torch.Tensor, b_bits: torch.Tensor, k: int, what: str) -> None:
    """The first 64 rows of a packed GEMM against the reference (exact integers)."""
    from lightning_ovsw.kernels import reference

    if not torch.equal(got[:64], reference.packed_gemm(a_bits[:64], b_bits, k)):
        raise AssertionError(f"{what} disagrees with kernels/reference.py: kernel bug")


def square_gemm(ops, size: int) -> list[dict]:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ops_count = 2 * size**3
    t_ref = bench_us(lambda: torch.matmul(a, b.T))
    a_bits, b_bits = ops.triton_sign_pack(a), ops.triton_sign_pack(b)
    case = f"gemm {size}^3"
    rows = [{"case": case, "impl": "cuBLAS bf16 matmul", "us": t_ref, "tops": ops_count / t_ref / 1e6}]
    for mode in modes(ops):
        def run(mode=mode):
            return ops.triton_packed_linear(a_bits, b_bits, size, mode=mode)

        check_rows(run(), a_bits, b_bits, size, f"mode {MODE_NAMES[mode]}")
        t = bench_us(run)
        rows.append({"case": case, "impl": f"packed {MODE_NAMES[mode]}", "us": t,
                     "tops": ops_count / t / 1e6, "speedup": t_ref / t})
    t = bench_us(lambda: ops.triton_packed_linear(ops.triton_sign_pack(a), b_bits, size))
    rows.append({"case": case, "impl": "packed auto + sign_pack(a)", "us": t,
                 "tops": ops_count / t / 1e6, "speedup": t_ref / t})
    return rows


def small_batch(ops, batch: int, size: int) -> list[dict]:
    x = torch.randn(batch, size, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    scale = torch.rand(size, device="cuda")
    w_bits, x_bits = ops.triton_sign_pack(w), ops.triton_sign_pack(x)
    case = f"linear {size}x{size}, batch {batch}"
    t_ref = bench_us(lambda: F.linear(x, w))
    rows = [{"case": case, "impl": "bf16 F.linear", "us": t_ref}]
    for mode in modes(ops):
        t = bench_us(lambda mode=mode: ops.triton_packed_linear(x_bits, w_bits, size, scale,
                                                                out_dtype=torch.bfloat16, mode=mode))
        rows.append({"case": case, "impl": f"packed {MODE_NAMES[mode]}", "us": t, "speedup": t_ref / t})
    t = bench_us(lambda: ops.triton_packed_linear(ops.triton_sign_pack(x), w_bits, size, scale,
                                                  out_dtype=torch.bfloat16))
    rows.append({"case": case, "impl": "packed auto + sign_pack(x)", "us": t, "speedup": t_ref / t})
    return rows


def verdicts(rows: list[dict], size: int, batches: list[int]) -> list[dict]:
    """Best packed speedup per case against its target."""
    out = []
    targets = [(f"gemm {size}^3", 1.5)] + [(f"linear {size}x{size}, batch {b}", 8.0) for b in batches]
    for case, target in targets:
        best = max((r for r in rows if r["case"] == case and "speedup" in r and "sign_pack" not in r["impl"]),
                   key=lambda r: r["speedup"])
        out.append({"case": case, "target": target, "best": best["impl"], "speedup": best["speedup"],
                    "met": best["speedup"] >= target})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--quick", action="store_true", help="default path only, fewer repetitions")
    args = parser.parse_args()
    refuse_without_gpu()
    from lightning_ovsw.kernels.triton import launch as ops

    rows = square_gemm(ops, args.size)
    for batch in args.batches:
        rows += small_batch(ops, batch, args.size)
    print(f"{'case':<28} {'implementation':<30} {'time us':>10} {'TOP/s':>8} {'x base':>7}")
    for r in rows:
        tops = f"{r['tops']:.0f}" if "tops" in r else ""
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else "1"
        print(f"{r['case']:<28} {r['impl']:<30} {r['us']:>10.1f} {tops:>8} {speedup:>7}")
    checks = verdicts(rows, args.size, args.batches)
    for c in checks:
        print(f"target {c['case']}: >= {c['target']}x -> {c['speedup']:.2f}x ({c['best']}) "
              f"{'MET' if c['met'] else 'NOT MET'}")
    env = environment()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"packed_gemm_gpu_{env['date'][:10]}.json"
    path.write_text(json.dumps({**env, "quick": quick(), "rows": rows, "targets": checks}, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
