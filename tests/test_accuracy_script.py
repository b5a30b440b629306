"""benchmarks/accuracy.py end to end on a tiny ImageFolder: two variants run in parallel, table and flips."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import load_benchmark
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

    accuracy = load_benchmark("accuracy")  # which runs a later invocation would start
    args = argparse.Namespace(model="resnet20", runs=tmp_path / "runs", variants=["vanilla", "AGS+SAD", "SAD"],
                              seeds=[0, 1], later_seeds_variants=["vanilla"], epochs=2, resume=True)
    assert accuracy.pending_jobs(args) == [("SAD", 0), ("vanilla", 1)]  # the finished runs are not started again
    assert len(accuracy.pending_jobs(argparse.Namespace(**vars(args) | {"epochs": 3}))) == 4
    assert len(accuracy.pending_jobs(argparse.Namespace(**vars(args) | {"resume": False}))) == 4


def _earlier_record(**overrides) -> dict:
    run = {"final": 50.0, "best": 51.0, "per_epoch": [40.0, 50.0], "epochs": 2, "wall_s": 60.0, "invocations": 1}
    return {"benchmark": "accuracy", "model": "resnet20", "schedule_epochs": 10, "date": "2026-12-01T10:00:00",
            "command": "python benchmarks/accuracy.py --variants SAD", "flip_analysis": {"from": "earlier"},
            "results": {v: {"per_seed": {"0": run}, "mean": 50.0, "std": None, "epochs": 2} for v in ("vanilla", "SAD")}
            } | overrides


def test_carry_takes_only_variants_without_a_run_here_and_keeps_their_origin():
    accuracy = load_benchmark("accuracy")
    here = {"vanilla": {"per_seed": {0: {"final": 60.0}}}}
    earlier = _earlier_record()
    merged = accuracy.carry_rows(here, earlier, ["vanilla", "AGS+SAD", "SAD"])
    assert list(merged) == ["vanilla", "SAD"]  # AGS+SAD: in neither; order of --variants
    assert merged["vanilla"] is here["vanilla"]  # a run here wins over the earlier record
    assert merged["SAD"]["carried_from"] == {"date": earlier["date"], "command": earlier["command"]}
    # carried twice: the row still names the invocation that trained it
    again = accuracy.carry_rows({}, _earlier_record(date="2026-12-05", command="report", results=merged), ["SAD"])
    assert again["SAD"]["carried_from"]["command"] == earlier["command"]


def test_carry_refuses_another_experiment_and_missing_files(tmp_path, capsys, monkeypatch):
    accuracy = load_benchmark("accuracy")
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps(_earlier_record(schedule_epochs=600)))
    argv = ["accuracy.py", "--data", "x", "--epochs", "10", "--schedule-epochs", "10", "--report-only", "--carry"]
    for carry, message in ((path, "is another experiment: schedule_epochs=600"), (tmp_path / "no.json", "no such file")):
        with pytest.raises(SystemExit):
            monkeypatch.setattr(sys, "argv", [*argv, str(carry)])
            accuracy.main()
        assert message in capsys.readouterr().err
