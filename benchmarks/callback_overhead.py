"""Step-time overhead of AGS, SAD and FlipMonitor: one Trainer run per configuration, same machine.

Usage: python benchmarks/callback_overhead.py [--model resnet20_1w1a] [--batch 64] [--steps 30]
On CPU only the ratios count; on a GPU the absolute step times too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback
from lightning_ovsw.module import ClassificationModule


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def run(model_name: str, callbacks: list, batch: int, steps: int, precision: str) -> float:
    torch.manual_seed(0)
    size = 224 if "cifar" not in model_name and model_name.startswith("resnet") and "20" not in model_name else 32
    data = TensorDataset(torch.randn(batch * steps, 3, size, size), torch.randint(0, 10, (batch * steps,)))
    timer = StepTimer(warmup=5)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="auto", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(ClassificationModule(model_name, model_kwargs={"num_classes": 10}), DataLoader(data, batch_size=batch))
    times = sorted(timer.times)
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet20_1w1a")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    configs = {
        "BNN": [],
        "BNN + AGS": [AGSCallback()],
        "BNN + SAD": [SADCallback()],
        "BNN + FlipMonitor": [FlipMonitor(histograms=False)],
        "BNN + all three": [AGSCallback(), SADCallback(), FlipMonitor(histograms=False)],
    }
    results = {name: run(args.model, cbs, args.batch, args.steps, args.precision) for name, cbs in configs.items()}
    base = results["BNN"]
    print(f"{'configuration':<22} {'median step (ms)':>17} {'vs BNN':>8}")
    for name, t in results.items():
        print(f"{name:<22} {1e3 * t:>17.1f} {t / base:>8.3f}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    record = {
        "benchmark": "callback_overhead", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(sys.argv), "device": device, "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "lightning": lightning.__version__, "args": vars(args),
        "median_step_s": results, "ratio_vs_bnn": {k: v / base for k, v in results.items()},
    }
    out = Path(__file__).parent / "results" / f"callback_overhead_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
