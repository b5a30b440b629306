"""The README's first command (``lightning-ovsw-demo``) trains, learns and writes the flip dashboards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ovsw import demo


def test_demo_learns_and_logs_flips(tmp_path):
    acc = demo.run(["--epochs", "1", "--log-dir", str(tmp_path)])
    assert acc > 0.2  # chance: 0.1
    events = EventAccumulator(str(next(tmp_path.glob("demo/version_*"))))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"flips/silent_epoch/all", "ags/scaled_fraction", "sad/penalized_fraction"} <= set(scalars)


def test_console_script_exit_codes(tmp_path):
    """The installed script exits 0 after a (short) run and 2 with a clear message on a bad argument."""
    script = Path(sys.executable).with_name("lightning-ovsw-demo")
    ok = subprocess.run([str(script), "--epochs", "1", "--num-train", "256", "--log-dir", str(tmp_path)],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Validation top-1 accuracy" in ok.stdout
    bad = subprocess.run([str(script), "--epochs", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--epochs: must be >= 1" in bad.stderr
