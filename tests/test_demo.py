"""The README's first command (``lightning-ovsw-demo``) trains, learns and writes the flip dashboards."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ovsw import demo


def test_demo_learns_and_logs_flips(tmp_path):
    acc = demo.main(["--epochs", "1", "--log-dir", str(tmp_path)])
    assert acc > 0.2  # chance: 0.1
    events = EventAccumulator(str(next(tmp_path.glob("demo/version_*"))))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"flips/silent_epoch/all", "ags/scaled_fraction", "sad/penalized_fraction"} <= set(scalars)
