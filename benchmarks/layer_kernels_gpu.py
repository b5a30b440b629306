"""Fused vs plain binary-layer training path on one NVIDIA GPU (issue 4), measured in one run.

1. Per layer: forward + backward of every ``BinaryConv2d`` shape of the CIFAR ResNet-18 (batch 256) under
   autocast, fused Triton ops (``train_ops.FUSED = True``) vs the plain PyTorch path (``False``) vs a float
   ``nn.Conv2d`` of the same shape; time (``triton.testing.do_bench`` median) and the memory the forward
   newly allocates and keeps for the backward (the input itself, kept by every path, is not counted).
2. Whole training step (SGD momentum 0.9, ``GradScaler`` for float16) of ``resnet18_cifar_1w1a`` and
   ``resnet20_1w1a``: img/s and peak memory, fused vs plain vs the float twin (``binary=False``).
   Targets: fused img/s >= 0.8x the float twin's, peak memory <= 1.2x.

    python benchmarks/layer_kernels_gpu.py [--batch 256] [--dtypes float16 bfloat16] [--steps 30]

Prints tables and writes ``benchmarks/results/layer_kernels_gpu_<date>.json`` (GPU, versions, date, command).
Needs CUDA with compiled Triton kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from packed_gemm_gpu import RESULTS, environment, refuse_without_gpu  # noqa: E402

# (in, out, kernel, stride, input size) of the binary convs of the CIFAR ResNet-18 (design §2)
RESNET18_CONVS = [
    (64, 64, 3, 1, 32), (64, 128, 3, 2, 32), (128, 128, 3, 1, 16), (64, 128, 1, 2, 32),
    (128, 256, 3, 2, 16), (256, 256, 3, 1, 8), (128, 256, 1, 2, 16),
    (256, 512, 3, 2, 8), (512, 512, 3, 1, 4), (256, 512, 1, 2, 8),
]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def set_path(path: str) -> None:
    from lightning_ovsw.kernels import train_ops

    train_ops.FUSED = {"fused": True, "plain": False, "float": False}[path]


def layer_rows(batch: int, dtype: torch.dtype) -> list[dict]:
    from lightning_ovsw import BinaryConv2d

    rows = []
    for cin, cout, k, stride, hw in RESNET18_CONVS:
        x = torch.randn(batch, cin, hw, hw, device="cuda", dtype=dtype).requires_grad_(True)
        case = f"{cin}->{cout} {k}x{k}/{stride} @{hw}"
        base = None
        for path in ("float", "plain", "fused"):
            set_path(path)
            cls = nn.Conv2d if path == "float" else BinaryConv2d
            layer = cls(cin, cout, k, stride, k // 2, bias=False).cuda()
            with torch.autocast("cuda", dtype=dtype):
                grad = torch.randn_like(layer(x))

            def step(layer=layer, grad=grad, x=x):
                with torch.autocast("cuda", dtype=dtype):
                    out = layer(x)
                out.backward(grad)

            ms = bench_ms(step)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=dtype):
                out = layer(x)
            kept = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
            del out
            base = base or ms
            rows.append({"case": case, "dtype": str(dtype)[6:], "path": path, "ms": ms, "new_saved_MB": kept / 2**20,
                         "time_vs_float": ms / base})
    return rows


def train_rows(model_name: str, batch: int, dtype: torch.dtype, steps: int) -> list[dict]:
    from lightning_ovsw.models import MODELS

    rows = []
    base = None
    for path in ("float", "plain", "fused"):
        set_path(path)
        torch.manual_seed(0)
        model = MODELS[model_name](binary=path != "float").cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (batch,), device="cuda")

        def step(model=model, opt=opt, scaler=scaler, x=x, y=y):
            with torch.autocast("cuda", dtype=dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        img_s = batch * steps / (start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated()
        base = base or (img_s, peak)
        rows.append({"model": model_name, "dtype": str(dtype)[6:], "path": path, "img_s": img_s,
                     "peak_MB": peak / 2**20, "speed_vs_float": img_s / base[0], "memory_vs_float": peak / base[1]})
        del model, opt
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    refuse_without_gpu()
    torch.backends.cudnn.benchmark = True
    dtypes = [getattr(torch, d) for d in args.dtypes]

    layers = [r for d in dtypes for r in layer_rows(args.batch, d)]
    print(f"{f'layer (batch {args.batch})':<26} {'dtype':<9} {'path':<6} {'ms':>7} {'x float':>8} {'new saved MB':>13}")
    for r in layers:
        print(f"{r['case']:<26} {r['dtype']:<9} {r['path']:<6} {r['ms']:>7.3f} {r['time_vs_float']:>8.2f} "
              f"{r['new_saved_MB']:>13.1f}")

    training = [r for d in dtypes for m in ("resnet18_cifar_1w1a", "resnet20_1w1a")
                for r in train_rows(m, args.batch, d, args.steps)]
    print(f"\n{'training step':<22} {'dtype':<9} {'path':<6} {'img/s':>8} {'x float':>8} {'peak MB':>8} {'x float':>8}")
    for r in training:
        print(f"{r['model']:<22} {r['dtype']:<9} {r['path']:<6} {r['img_s']:>8.0f} {r['speed_vs_float']:>8.2f} "
              f"{r['peak_MB']:>8.0f} {r['memory_vs_float']:>8.2f}")
    targets = [{"model": r["model"], "dtype": r["dtype"], "speed_vs_float": r["speed_vs_float"],
                "memory_vs_float": r["memory_vs_float"],
                "met": r["speed_vs_float"] >= 0.8 and r["memory_vs_float"] <= 1.2}
               for r in training if r["path"] == "fused"]
    for t in targets:
        print(f"target {t['model']} {t['dtype']}: >= 0.8x float img/s and <= 1.2x memory -> "
              f"{t['speed_vs_float']:.2f}x, {t['memory_vs_float']:.2f}x {'MET' if t['met'] else 'NOT MET'}")
    env = environment()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"layer_kernels_gpu_{env['date'][:10]}.json"
    path.write_text(json.dumps({**env, "batch": args.batch, "layers": layers, "training": training,
                                "targets": targets}, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
