"""benchmarks/accuracy.py end to end on a tiny ImageFolder: two variants run in parallel, table and flips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from test_data import make_folder

ROOT = Path(__file__).resolve().parent.parent


def test_accuracy_driver_runs_variants_and_reports(tmp_path):
    make_folder(tmp_path / "data", {"train": 8, "test": 4})
    out = tmp_path / "acc"
    fast = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.init_args.batch_size=16",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--data", str(tmp_path / "data"), "--variants",
         "vanilla", "AGS+SAD", "--seeds", "0", "--epochs", "2", "--schedule-epochs", "3", "--warmup-epochs", "0",
         "--parallel", "2", "--runs", str(tmp_path / "runs"), "--out", str(out), "--", *fast],
        check=True, timeout=600,
    )
    record = json.loads(out.with_suffix(".json").read_text())
    for variant in ("vanilla", "AGS+SAD"):
        seed0 = record["results"][variant]["per_seed"]["0"]
        assert seed0["epochs"] == 2 and len(seed0["per_epoch"]) == 2 and seed0["per_epoch"][-1] == seed0["final"]
        ckpt = next((tmp_path / "runs").glob(f"resnet20_{variant.replace('+', '_')}_seed0/**/best-*.ckpt"))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        best = next(v["best_model_score"] for k, v in state["callbacks"].items() if "val/acc1" in k)
        assert abs(seed0["best"] - 100 * float(best)) < 1e-3
    assert record["flip_analysis"]["runs"]["vanilla"]["layer"] == "layer3.2.conv2"
    assert "| AGS+SAD | 2 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "acc_flips.png").exists() and (tmp_path / "acc_curves.png").exists()
    assert set(record["flip_analysis"]["all_layers"]) >= {"layer1.0.conv1", "layer3.2.conv2"}
