"""The README's Usage example trains: its loss falls over a short run.

``USAGE`` is the README's code block, verbatim; the test swaps only the data (``SyntheticDataModule``
always, a balanced CIFAR-10 subset when ``../shared/data`` has it) and the run length.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_ovsw import CIFAR10DataModule, SyntheticDataModule

USAGE = """
import lightning.pytorch as pl, torchvision
from lightning_ovsw import (AGSCallback, SADCallback, FlipMonitor, CIFAR10DataModule, ClassificationModule,
                            binarize_model, binarization_summary)

datamodule = CIFAR10DataModule(data_dir="path/to/cifar10", download=True)   # or an ImageFolder tree / .tar.xz
model = binarize_model(torchvision.models.resnet18(num_classes=10))   # first conv and fc stay float
print(binarization_summary(model, (1, 3, 32, 32)))   # also lists the ReLUs replaced by Hardtanh
trainer = pl.Trainer(max_epochs=200, callbacks=[AGSCallback(delta=0.04), SADCallback(penalty=9e-4), FlipMonitor()])
trainer.fit(ClassificationModule(model, lr=0.1, warmup_epochs=5), datamodule=datamodule)   # the paper's recipe
"""

CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.xz"


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def run_usage(datamodule: pl.LightningDataModule, steps: int, tmp_path: Path) -> list[float]:
    """Run ``USAGE`` with ``datamodule`` and a ``steps``-step Trainer (CPU, no checkpoints); the losses."""
    recorder = LossRecorder()
    code = USAGE.replace('datamodule = CIFAR10DataModule(data_dir="path/to/cifar10", download=True)', "")
    code = code.replace("pl.Trainer(max_epochs=200, callbacks=[", "pl.Trainer(**trainer_kwargs, callbacks=[recorder, ")
    assert code != USAGE and "trainer_kwargs" in code and "datamodule = " not in code
    trainer_kwargs = dict(max_steps=steps, accelerator="cpu", default_root_dir=str(tmp_path), enable_checkpointing=False,
                          enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0)
    exec(code, {"datamodule": datamodule, "recorder": recorder, "trainer_kwargs": trainer_kwargs})
    assert len(recorder.losses) == steps
    return recorder.losses


def assert_falls(losses: list[float], factor: float) -> None:
    """The mean loss of the last third of the steps is below ``factor`` times that of the first third (the
    run is still in the recipe's warm-up: the learning rate is a few percent of its peak)."""
    assert all(torch.isfinite(torch.tensor(losses))), losses
    third = len(losses) // 3
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    assert last < factor * first, losses


@pytest.mark.slow
def test_usage_trains_on_synthetic_data(tmp_path):
    # one epoch longer than the run (FlipMonitor's epoch-end images are not part of the question)
    data = SyntheticDataModule(num_train=32 * 21, num_val=32, image_size=32, noise=0.5, batch_size=32)
    assert_falls(run_usage(data, 20, tmp_path), 0.9)  # measured: 0.87


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.exists(), reason=f"CIFAR-10 not found at {CIFAR10}")
def test_usage_trains_on_a_cifar10_subset(tmp_path):
    data = CIFAR10DataModule(data_dir=str(CIFAR10), limit=64 * 31, batch_size=64, cache_dir=str(tmp_path / "cache"))
    assert_falls(run_usage(data, 30, tmp_path), 0.99)  # measured: 0.984; more steps would say more
