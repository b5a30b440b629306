"""End-to-end packed ResNet-18 on one NVIDIA GPU vs its bf16 float twin (issue 5), measured in one run.

The paper's ImageNet ResNet-18 (``lightning_ovsw.models.resnet18_1w1a``, 224x224) packed with ``pack_model``
(16 binary convs as Triton packed convs with folded BatchNorm, fused residual and hardtanh; stem, 1x1
shortcut convs and classifier in bf16) against the ``binary=False`` twin (every conv a float conv) in
bf16, channels_last, cuDNN with ``cudnn.benchmark``. Both run eagerly and replayed from a CUDA graph
(the packed model after ``lightning_ovsw.packed_layers.warmup``), at batch 256 and 1. Reports img/s, latency,
the speed ratio (target >= 1.3x at batch 256, CUDA graphs) and the weight memory (packed bytes vs the
twin's bf16 bytes; target >= 16x smaller).

Before timing, the packed model (float32) must equal the float binarized model's eval output on the GPU
up to the epilogue rounding (TF32 off for that check), or the script stops.

    python benchmarks/packed_resnet_gpu.py [--batches 256 1] [--quick]

``--quick`` (or ``OVSW_QUICK=1``) times fewer iterations (the one-shot GPU session). Prints a table and
writes ``benchmarks/results/packed_resnet_gpu_<date>.json`` (GPU, versions, date, command). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from packed_gemm_gpu import RESULTS, environment, refuse_without_gpu  # noqa: E402

FLOAT_LAYERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def calibrate(model: nn.Module, size: int = 64) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (the zoo starts BN weights at 1e-8)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size, device="cuda"))
    return model.eval()


def float_layers_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The full-precision layers (stem, shortcut convs, BatchNorms, classifier) in ``dtype``; the packed
    layers keep their bits and float32 per-channel constants."""
    for m in model.modules():
        if isinstance(m, FLOAT_LAYERS):
            m.to(dtype)
    return model


def verify(binary: nn.Module, packed: nn.Module, size: int) -> dict:
    """Packed (float32) vs the float binarized model in eval mode on the GPU, TF32 off: the integer
    accumulations are exact, so the logits may differ only by the epilogue rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        x = torch.randn(8, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
        want, got = binary(x).float(), packed(x).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    scale = want.abs().max().item()
    check = {
        "max_abs_diff": (got - want).abs().max().item(),
        "max_abs_logit": scale,
        "same_argmax": bool(torch.equal(got.argmax(1), want.argmax(1))),
    }
    check["ok"] = check["max_abs_diff"] <= 1e-3 * scale and check["same_argmax"]
    return check


def time_ms(fn: Callable[[], object], iters: int, chunks: int) -> float:
    """Median over ``chunks`` of the mean time of ``iters`` back-to-back calls (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(chunks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def graphed(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """``model(x)`` captured in a CUDA graph after warm-up runs on a side stream (which also tune the packed
    kernels for this shape, see ``lightning_ovsw.packed_layers.warmup``); returns the replay."""
    from lightning_ovsw.packed_layers import warmup

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            warmup(model, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def bench_batch(models: dict[str, nn.Module], batch: int, size: int, quick: bool) -> list[dict]:
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    iters = (5 if batch > 1 else 20) if quick else (20 if batch > 1 else 100)
    chunks = 3 if quick else 7
    rows = []
    for name, model in models.items():
        eager = time_ms(lambda model=model: model(x), iters, chunks)
        graph = time_ms(graphed(model, x), iters, chunks)
        rows.append({"model": name, "batch": batch, "eager_ms": eager, "graph_ms": graph,
                     "img_per_s": batch / graph * 1e3})
    return rows


def weight_bytes(packed: nn.Module, twin: nn.Module) -> dict:
    from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear, packed_nbytes

    binary = [m for m in packed.modules() if isinstance(m, (PackedConv2d, PackedLinear))]
    bits = sum(m.weight_bits.numel() * 4 for m in binary)
    out = {
        "packed_model_bytes": packed_nbytes(packed),
        "twin_bf16_bytes": packed_nbytes(twin),
        "twin_fp32_bytes": sum(t.numel() * 4 for t in list(twin.parameters()) + list(twin.buffers())
                               if t.is_floating_point()),
        "packed_binary_weight_bytes": bits,
        "packed_binary_constants_bytes": sum(m.scale.numel() * 4 + m.bias.numel() * 4 for m in binary),
    }
    out["smaller_than_bf16_twin"] = out["twin_bf16_bytes"] / out["packed_model_bytes"]
    out["smaller_than_fp32_twin"] = out["twin_fp32_bytes"] / out["packed_model_bytes"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("OVSW_QUICK") == "1",
                        help="fewer timing iterations (also OVSW_QUICK=1)")
    args = parser.parse_args()
    refuse_without_gpu()
    from lightning_ovsw.models import resnet18_1w1a
    from lightning_ovsw.packing import pack_model

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    torch.backends.cudnn.benchmark = True
    cl = torch.channels_last
    binary = calibrate(resnet18_1w1a().cuda()).to(memory_format=cl)
    packed = pack_model(binary).to(memory_format=cl)
    check = verify(binary, packed, args.size)
    print(f"packed (fp32) vs float binarized model on the GPU: max |diff| {check['max_abs_diff']:.2e} "
          f"(max |logit| {check['max_abs_logit']:.2f}), same argmax: {check['same_argmax']}")
    if not check["ok"]:
        sys.exit("the packed model does not match the float binarized model: not timing a wrong model")
    packed = float_layers_to(packed, torch.bfloat16)
    twin = calibrate(resnet18_1w1a(binary=False).cuda()).to(torch.bfloat16).to(memory_format=cl)
    models = {"bf16 twin (cuDNN)": twin, "packed (Triton)": packed}

    rows = []
    for batch in args.batches:
        rows += bench_batch(models, batch, args.size, args.quick)
    print(f"{'batch':>5} {'model':<20} {'eager ms':>9} {'graph ms':>9} {'img/s':>9} {'x twin':>7}")
    ratios = {}
    for batch in args.batches:
        base = next(r for r in rows if r["batch"] == batch and "twin" in r["model"])
        for r in rows:
            if r["batch"] == batch:
                r["speedup_graph"] = base["graph_ms"] / r["graph_ms"]
                r["speedup_eager"] = base["eager_ms"] / r["eager_ms"]
                print(f"{batch:>5} {r['model']:<20} {r['eager_ms']:>9.3f} {r['graph_ms']:>9.3f} "
                      f"{r['img_per_s']:>9.0f} {r['speedup_graph']:>7.2f}")
        ratios[batch] = next(r["speedup_graph"] for r in rows if r["batch"] == batch and "packed" in r["model"])
    memory = weight_bytes(packed, twin)
    print("weight memory (bytes): " + json.dumps(memory))
    targets = {"speedup_at_256": {"target": 1.3, "value": ratios.get(256)},
               "memory_vs_bf16_twin": {"target": 16.0, "value": memory["smaller_than_bf16_twin"]}}
    for name, t in targets.items():
        t["met"] = t["value"] is not None and t["value"] >= t["target"]
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"target {name}: >= {t['target']}x -> {value} {'MET' if t['met'] else 'NOT MET'}")
    env = environment()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"packed_resnet_gpu_{env['date'][:10]}.json"
    report = {**env, "model": "lightning_ovsw.models.resnet18_1w1a", "input": [args.size, args.size],
              "quick": args.quick, "verification": check, "rows": rows, "memory": memory, "targets": targets}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
