"""Packed binary conv2d on one NVIDIA GPU vs cuDNN bf16 channels_last (issue 5 target: >= 1.5x on every
binary conv shape of ImageNet ResNet-18 at batch 64 and 256), measured in one run.

The packed conv takes NHWC sign words and weights ``[Cout, KH, KW, CW]`` and applies the per-channel
alpha with a bf16 output (what a packed layer runs); cuDNN runs ``F.conv2d`` on bf16 channels_last
tensors with ``cudnn.benchmark`` on. Each inner-product mode is timed on its own (autotuned within the
mode), the default (all modes compete) also with the input's sign-and-pack from bf16 NCHW-channels_last.

    python benchmarks/packed_conv_gpu.py [--batches 64 256] [--quick]

``--quick`` (or ``OVSW_QUICK=1``, the one-shot GPU session): batch 256 only, the default (autotuned)
path only, fewer repetitions. Every timed mode is first checked against ``kernels/reference.py``.

Times are ``triton.testing.do_bench`` medians. Prints a table and writes
``benchmarks/results/packed_conv_gpu_<date>.json`` (GPU, versions, date, command). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from packed_gemm_gpu import (  # noqa: E402
    MODE_NAMES,
    RESULTS,
    bench_us,
    environment,
    modes,
    quick,
    refuse_without_gpu,
)

# (H=W of the input, Cin, Cout, kernel, stride, padding) of every binary conv in torchvision's
# ResNet-18 at 224x224 (3x3 convs and the 1x1 stride-2 downsample convs; the 7x7 stem stays float).
RESNET18_CONVS = [
    (56, 64, 64, 3, 1, 1),
    (56, 64, 128, 3, 2, 1),
    (56, 64, 128, 1, 2, 0),
    (28, 128, 128, 3, 1, 1),
    (28, 128, 256, 3, 2, 1),
    (28, 128, 256, 1, 2, 0),
    (14, 256, 256, 3, 1, 1),
    (14, 256, 512, 3, 2, 1),
    (14, 256, 512, 1, 2, 0),
    (7, 512, 512, 3, 1, 1),
]


def bench_shape(ops, batch: int, hw: int, cin: int, cout: int, k: int, stride: int, padding: int) -> dict:
    cl = torch.channels_last
    x = torch.randn(batch, cin, hw, hw, device="cuda", dtype=torch.bfloat16).to(memory_format=cl)
    w = torch.randn(cout, cin, k, k, device="cuda", dtype=torch.bfloat16).to(memory_format=cl)
    scale = torch.rand(cout, device="cuda")
    ho = (hw + 2 * padding - k) // stride + 1
    ops_count = 2 * batch * ho * ho * cout * cin * k * k
    t_ref = bench_us(lambda: F.conv2d(x, w, None, stride, padding))
    x_bits = ops.triton_sign_pack_nchw(x)
    w_bits = ops.triton_sign_pack(w.permute(0, 2, 3, 1))
    args = (x_bits, w_bits, cin, stride, padding, 1, 0, scale, None, None, torch.bfloat16)
    row = {"batch": batch, "shape": f"{hw}x{hw} {cin}->{cout} k{k} s{stride}", "cudnn_us": t_ref,
           "cudnn_tflops": ops_count / t_ref / 1e6, "packed_us": {}}
    from lightning_ovsw.kernels import reference

    geometry = ((stride, stride), (padding, padding), (1, 1), 0)
    expect = reference.packed_conv2d(x_bits[:2], w_bits, cin, *geometry)
    for mode in modes(ops):
        if not torch.equal(ops.triton_packed_conv2d(*args[:7], mode=mode)[:2], expect):
            raise AssertionError(f"mode {MODE_NAMES[mode]} disagrees with the reference on {row['shape']}: "
                                 "kernel bug")
        t = bench_us(lambda mode=mode: ops.triton_packed_conv2d(*args, mode=mode))
        row["packed_us"][MODE_NAMES[mode]] = t
    row["packed_with_pack_us"] = bench_us(
        lambda: ops.triton_packed_conv2d(ops.triton_sign_pack_nchw(x), *args[1:]))
    best = min(row["packed_us"], key=row["packed_us"].get)
    row["best"], row["best_us"] = best, row["packed_us"][best]
    row["packed_tops"] = ops_count / row["best_us"] / 1e6
    row["speedup"] = t_ref / row["best_us"]
    row["speedup_with_pack"] = t_ref / row["packed_with_pack_us"]
    row["met"] = row["speedup"] >= 1.5
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="batch 256, default path, fewer repetitions")
    args = parser.parse_args()
    args.batches = args.batches or ([256] if quick() else [64, 256])
    refuse_without_gpu()
    from lightning_ovsw.kernels.triton import launch as ops

    torch.backends.cudnn.benchmark = True
    rows = [bench_shape(ops, batch, *shape) for batch in args.batches for shape in RESNET18_CONVS]
    print(f"{'batch':>5} {'shape':<26} {'cuDNN us':>9} {'TFLOP/s':>8} {'packed us':>9} {'TOP/s':>7} "
          f"{'best mode':<10} {'x cuDNN':>7} {'+pack':>6} target")
    for r in rows:
        print(f"{r['batch']:>5} {r['shape']:<26} {r['cudnn_us']:>9.1f} {r['cudnn_tflops']:>8.0f} "
              f"{r['best_us']:>9.1f} {r['packed_tops']:>7.0f} {r['best']:<10} {r['speedup']:>7.2f} "
              f"{r['speedup_with_pack']:>6.2f} {'MET' if r['met'] else 'NOT MET'}")
    print(f"target >= 1.5x cuDNN bf16 on every shape: {'MET' if all(r['met'] for r in rows) else 'NOT MET'}")
    env = environment()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"packed_conv_gpu_{env['date'][:10]}.json"
    report = {**env, "quick": quick(), "rows": rows, "all_met": all(r["met"] for r in rows)}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
