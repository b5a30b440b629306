"""Make ``docs/dashboard.png``: what FlipMonitor's TensorBoard dashboard shows, from a tiny CPU run.

Trains the zoo's ``resnet20_1w1a`` for a few epochs on ``SyntheticDataModule`` with AGS, SAD and
FlipMonitor, logs ``lightning_ovsw.callbacks.dashboard``'s layout, figure and Tab. 1(a) text, serves the
log dir with TensorBoard on 127.0.0.1 only, screenshots the Custom Scalars and Images tabs with headless
Chromium (Debian: ``apt-get install chromium``) and puts the two side by side. Kills what it starts.

    python docs/make_dashboard_screenshot.py [--epochs 6] [--work-dir /tmp/ovsw_dash]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback
from lightning_ovsw.callbacks.dashboard import (
    custom_scalars_layout,
    flip_count_figure,
    format_table,
    never_flipped_by_magnitude,
)
from lightning_ovsw.data import SyntheticDataModule
from lightning_ovsw.models import resnet20_1w1a
from lightning_ovsw.module import ClassificationModule
from lightning_ovsw.registry import binary_weights

HERE = Path(__file__).resolve().parent


class PreviewFlipMonitor(FlipMonitor):
    """FlipMonitor writing the regex layout instead of today's per-tag one (the two would merge)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(custom_scalars_layout())


class DashboardPreview(pl.Callback):
    """At each epoch end: the flip-count-vs-|W| figure and the Tab. 1(a) table, over all binary layers
    and for the first ``layers`` layers."""

    def __init__(self, monitor: FlipMonitor, layers: int = 3) -> None:
        self.monitor, self.layers = monitor, layers

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(binary_weights(pl_module))
        counts = self.monitor.flip_counts
        per_layer = {name: (params[name].detach().abs().flatten(), c.flatten().float()) for name, c in counts.items()}
        everything = tuple(torch.cat(parts) for parts in zip(*per_layer.values(), strict=True))
        views = {"all": everything, **dict(list(per_layer.items())[: self.layers])}
        writer, step = trainer.logger.experiment, trainer.global_step
        for name, (magnitude, flips) in views.items():
            title = f"{name}, epoch {trainer.current_epoch + 1}"
            writer.add_figure(f"flips/count_vs_abs_weight/{name}", flip_count_figure(magnitude, flips, 48, title), step)
        writer.add_text("flips/never_flipped_by_abs_weight/all", format_table(never_flipped_by_magnitude(*everything)), step)


def train(log_dir: Path, epochs: int) -> None:
    pl.seed_everything(0, workers=True)
    torch.set_num_threads(1)  # the demo is tiny; more threads only spin on a busy machine
    module = ClassificationModule(resnet20_1w1a(), lr=0.1, weight_decay=5e-4)
    data = SyntheticDataModule(num_train=768, num_val=128, image_size=8, batch_size=64)
    monitor = PreviewFlipMonitor(histograms=False)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", log_every_n_steps=2, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
        logger=TensorBoardLogger(log_dir, name="resnet20_1w1a", default_hp_metric=False),
        callbacks=[AGSCallback(delta=0.04), SADCallback(penalty=9e-4), monitor, DashboardPreview(monitor)],
    )
    trainer.fit(module, datamodule=data)


def run_group(cmd: list[str], timeout: float) -> None:
    """Run ``cmd`` in its own process group and kill the whole group if it outlives ``timeout``."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def screenshot(url: str, out: Path, size: tuple[int, int], profile: Path) -> Image.Image:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install -y chromium")
    run_group([
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=20000", f"--screenshot={out}", url,
    ], timeout=120)
    return Image.open(out).convert("RGB")


def serve_and_capture(log_dir: Path, work: Path, port: int) -> list[Image.Image]:
    base = f"http://127.0.0.1:{port}"
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "0"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"TensorBoard did not answer on {base}")
        return [
            screenshot(f"{base}/#custom_scalars", work / "custom_scalars.png", (1100, 1780), work / "chromium"),
            # the Images tab's column of figures only: its header and sidebar repeat the first shot's
            screenshot(f"{base}/#images", work / "images.png", (700, 1780), work / "chromium").crop((281, 64, 700, 1780)),
        ]
    finally:
        os.killpg(board.pid, signal.SIGTERM)
        board.wait(timeout=30)


def side_by_side(images: list[Image.Image], width: int) -> Image.Image:
    """The screenshots next to each other, top-aligned, scaled down to at most ``width`` pixels in all, in
    256 colours (a small PNG)."""
    height = max(im.height for im in images)
    canvas = Image.new("RGB", (sum(im.width for im in images), height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    if canvas.width > width:
        canvas = canvas.resize((width, round(height * width / canvas.width)), Image.LANCZOS)
    return canvas.quantize(256, method=Image.Quantize.MEDIANCUT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ovsw_dashboard"))
    parser.add_argument("--port", type=int, default=6123)
    parser.add_argument("--width", type=int, default=1600, help="width of the combined PNG")
    parser.add_argument("--out", type=Path, default=HERE / "dashboard.png")
    parser.add_argument("--reuse-logs", action="store_true", help="skip training, screenshot the existing logs")
    args = parser.parse_args(argv)
    log_dir = args.work_dir / "logs"
    if not args.reuse_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
        train(log_dir, args.epochs)
    shots = serve_and_capture(log_dir, args.work_dir, args.port)
    side_by_side(shots, args.width).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB); screenshots in {args.work_dir}")


if __name__ == "__main__":
    main()
