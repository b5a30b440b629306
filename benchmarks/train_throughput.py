"""Training throughput and peak memory: float twin vs BNN vs BNN + each OvSW callback, one Trainer run each.

    python benchmarks/train_throughput.py                                   # GPU: ResNet-18/20, batch 256, 16/bf16-mixed
    python benchmarks/train_throughput.py --models resnet20_1w1a --batch 64 --precisions 32-true   # CPU

The batch stays on the device (one synthetic batch, reused) so the loader never limits; each run is
warmed up, then the median step time gives img/s. ``--unfused`` adds the same BNN runs with
``LIGHTNING_OVSW_FUSED=0`` (the PyTorch paths, the baseline of the fused kernels); ``--compile`` wraps
the network in ``torch.compile``. On CPU only the ratios count. Targets (issue 4, H100): BNN + all three
callbacks >= 0.8x the float twin's img/s, callbacks <= 3% of step time, peak memory <= 1.2x the twin's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback
from lightning_ovsw.models import create_model
from lightning_ovsw.module import ClassificationModule

CONFIGS = {
    "float twin": (False, []),
    "BNN": (True, []),
    "BNN + AGS": (True, [AGSCallback]),
    "BNN + SAD": (True, [SADCallback]),
    "BNN + FlipMonitor": (True, [lambda: FlipMonitor(histograms=False)]),
    "BNN + all three": (True, [AGSCallback, SADCallback, lambda: FlipMonitor(histograms=False)]),
}


class RepeatedBatch(torch.utils.data.Dataset):
    """The same device-resident batch ``n`` times (use with ``batch_size=None``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class StepTimer(pl.Callback):
    """Wall time of every training step after ``warmup`` steps (device synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def run(model: str, binary: bool, callbacks: list, batch: int, steps: int, warmup: int, precision: str,
        compile_model: bool) -> dict[str, float | None]:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = 224 if model in ("resnet18_1w1a", "resnet34_1w1a") else 32
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    module = ClassificationModule(create_model(model, num_classes=10, binary=binary))
    if compile_model:
        module.model = torch.compile(module.model)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        max_steps=steps + warmup + 1, accelerator="auto", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*(make() for make in callbacks), timer],
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, torch.utils.data.DataLoader(RepeatedBatch(x, y, steps + warmup + 1), batch_size=None))
    times = sorted(timer.times)
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"median_step_s": median, "img_per_s": batch / median, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar_1w1a", "resnet20_1w1a"])
    parser.add_argument("--precisions", nargs="+", default=None, help="default: 16-mixed bf16-mixed (GPU), 32-true (CPU)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--unfused", action="store_true", help="also run the BNN configurations with LIGHTNING_OVSW_FUSED=0")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = parser.parse_args()
    precisions = args.precisions or (["16-mixed", "bf16-mixed"] if torch.cuda.is_available() else ["32-true"])
    variants = {"": None} | ({" (unfused)": "0"} if args.unfused else {})
    results: dict[str, dict] = {}
    for model in args.models:
        for precision in precisions:
            for suffix, fused in variants.items():
                for name, (binary, callbacks) in CONFIGS.items():
                    if suffix and not binary:
                        continue
                    os.environ.pop("LIGHTNING_OVSW_FUSED", None)
                    if fused is not None:
                        os.environ["LIGHTNING_OVSW_FUSED"] = fused
                    key = f"{model} | {precision} | {name}{suffix}"
                    results[key] = run(model, binary, callbacks, args.batch, args.steps, args.warmup, precision, args.compile)
                    base = results[f"{model} | {precision} | float twin"]
                    results[key]["vs_float_twin"] = results[key]["img_per_s"] / base["img_per_s"]
                    bnn = results.get(f"{model} | {precision} | BNN{suffix}")
                    results[key]["step_time_vs_bnn"] = results[key]["median_step_s"] / bnn["median_step_s"] if bnn else None
                    if base["peak_mib"]:
                        results[key]["memory_vs_float_twin"] = results[key]["peak_mib"] / base["peak_mib"]
                    r = results[key]
                    print(f"{key:<62} {r['img_per_s']:>9.0f} img/s  {r['vs_float_twin']:>5.2f}x twin  "
                          f"step {r['step_time_vs_bnn'] or float('nan'):>5.3f}x BNN  "
                          + (f"{r['peak_mib']:>7.0f} MiB" if r["peak_mib"] else ""), flush=True)
    os.environ.pop("LIGHTNING_OVSW_FUSED", None)
    cuda = torch.cuda.is_available()
    record = {
        "benchmark": "train_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "lightning": lightning.__version__,
        "triton": _triton_version(), "args": vars(args), "results": results,
        "note": "absolute img/s count only on a GPU; on CPU compare ratios within this file",
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M")
    out = Path(__file__).parent / "results" / f"train_throughput_{'cuda' if cuda else 'cpu'}_{stamp}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
