"""Memory the forward keeps for the backward: float twin vs binary (plain PyTorch path) vs binary (fused ops).

Counts the bytes of the distinct storages autograd saves (``saved_tensors_hooks``) during one forward under
autocast, at two batch sizes, and splits them into a per-image part (activations) and a fixed part
(weights); the per-image part is what dominates peak training memory at batch 256 (issue 4 target: <= 1.2x
the float twin's peak memory). It measures what the code saves, not allocator peaks, so it runs on CPU too
(the fused Triton kernels then run in the interpreter).

    python benchmarks/saved_activations.py [--models resnet18_cifar_1w1a resnet20_1w1a]

Prints a table and writes ``benchmarks/results/saved_activations_<device>_<date>.json``.
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

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused kernels on CPU

RESULTS = Path(__file__).parent / "results"


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``model`` under autocast."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, dtype=dtype):
        model(x)
    return sum(storages.values())


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar_1w1a", "resnet20_1w1a"])
    parser.add_argument("--batch", type=int, default=256, help="batch size the totals are extrapolated to")
    args = parser.parse_args()
    from lightning_ovsw.kernels import train_ops

    from lightning_ovsw.models import MODELS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    rows = []
    for name in args.models:
        base = None
        for path in ("float", "plain", "fused"):
            train_ops.FUSED = path == "fused"
            torch.manual_seed(0)
            model = MODELS[name](binary=path != "float").to(device)
            small, large = (saved_bytes(model, torch.randn(n, 3, 32, 32, device=device), dtype) for n in (2, 4))
            per_image = (large - small) / 2
            fixed = small - 2 * per_image
            total = args.batch * per_image + fixed
            base = base or total
            rows.append({"model": name, "path": path, "per_image_MiB": per_image / 2**20, "fixed_MiB": fixed / 2**20,
                         f"batch{args.batch}_MiB": total / 2**20, "vs_float": total / base})
    print(f"{'model':<22} {'path':<6} {'MiB/image':>10} {'fixed MiB':>10} {f'batch {args.batch} MiB':>14} {'x float':>8}")
    for r in rows:
        print(f"{r['model']:<22} {r['path']:<6} {r['per_image_MiB']:>10.3f} {r['fixed_MiB']:>10.1f} "
              f"{r[f'batch{args.batch}_MiB']:>14.0f} {r['vs_float']:>8.2f}")
    import triton

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
           "autocast": str(dtype), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([sys.executable, *sys.argv])}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"saved_activations_{device}_{env['date'][:10]}.json"
    out.write_text(json.dumps({**env, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
