"""Resume with the project's own data modules (shuffle and augmentation on) equals an uninterrupted run.

Every tensor of the final checkpoint (weights, BN statistics, optimizer momenta, the LR schedule, every
callback state: SAD trackers, previous signs, flip counts, the epoch-start counts) is compared bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback
from lightning_ovsw.data import CIFAR10DataModule, SyntheticDataModule
from lightning_ovsw.layers import BinaryConv2d
from lightning_ovsw.module import ClassificationModule

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def tiny_bnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
        BinaryConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(), nn.MaxPool2d(2),
        BinaryConv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def synthetic() -> SyntheticDataModule:
    return SyntheticDataModule(num_train=160, num_val=32, image_size=16, batch_size=32, augment=True, seed=5)


def cifar(tmp: Path):
    return lambda: CIFAR10DataModule(str(ARCHIVE), batch_size=32, limit=160, cache_dir=str(tmp / "cache"), seed=5)


SILENT_EPOCH: dict[str, dict[int, float]] = {}


class SilentEpochProbe(pl.Callback):
    """Keeps ``flips/silent_epoch/all`` of every epoch end, as a user's ModelCheckpoint would see it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_epoch_end(self, trainer, pl_module):
        SILENT_EPOCH.setdefault(self.name, {})[trainer.current_epoch] = float(
            trainer.callback_metrics["flips/silent_epoch/all"])


def run(tmp_path: Path, name: str, data, ckpt: Path | None = None) -> dict:
    """Fit 3 epochs of 5 steps (or continue from ``ckpt``) and return the final checkpoint, read back from disk.

    The uninterrupted run also leaves the checkpoints a user would resume from: one at the end of epoch 0
    (``epoch0.ckpt``) and one in the middle of epoch 1, after its second step (``step7.ckpt``).
    """
    module = ClassificationModule(tiny_bnn(), lr=0.05, warmup_epochs=0.5, schedule_epochs=3)
    saves = [
        ModelCheckpoint(tmp_path, "epoch{epoch}", save_top_k=-1, save_on_train_epoch_end=True, auto_insert_metric_name=False),
        ModelCheckpoint(tmp_path, "step{step}", save_top_k=-1, every_n_train_steps=7, auto_insert_metric_name=False),
    ]
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=True, callbacks=[
            AGSCallback(0.04), SADCallback(9e-4), FlipMonitor(histograms=False), SilentEpochProbe(name),
            *(saves if ckpt is None else []),
        ],
    )
    trainer.fit(module, datamodule=data(), ckpt_path=ckpt)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)


def tensors(obj, prefix=""):
    """Every tensor and number in a nested checkpoint dict, by dotted path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}.{i}")
    elif isinstance(obj, (torch.Tensor, int, float)):
        yield prefix, obj


def assert_same_run(a: dict, b: dict) -> None:
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "callbacks"):
        ours = {k: v for k, v in a[key].items() if not str(k).startswith("ModelCheckpoint")} if key == "callbacks" else a[key]
        theirs = {k: v for k, v in b[key].items() if not str(k).startswith("ModelCheckpoint")} if key == "callbacks" else b[key]
        left, right = dict(tensors(ours)), dict(tensors(theirs))
        assert left.keys() == right.keys(), key
        for path, value in left.items():
            other = right[path]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"{key}{path} differs"
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("start", ["epoch0", "step7"], ids=["end_of_epoch", "mid_epoch"])
def test_resume_with_synthetic_data_is_exact(tmp_path, start):
    full = run(tmp_path, "full", synthetic)
    resumed = run(tmp_path, "resumed", synthetic, ckpt=tmp_path / f"{start}.ckpt")
    assert full["global_step"] == 15
    assert_same_run(resumed, full)
    # the epoch the run resumed in reports the same silent share (its epoch-start counts were checkpointed)
    assert SILENT_EPOCH["resumed"] == {e: v for e, v in SILENT_EPOCH["full"].items() if e >= 1}  # epochs 1, 2


@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"real CIFAR-10 archive not at {ARCHIVE}")
def test_resume_with_real_cifar10_is_exact(tmp_path):
    data = cifar(tmp_path)
    full = run(tmp_path, "full", data)
    for start in ("epoch0", "step7"):
        assert_same_run(run(tmp_path, f"resumed_{start}", data, ckpt=tmp_path / f"{start}.ckpt"), full)


def test_epochs_see_different_orders_and_crops():
    """The exactness above is not the trivial kind: each epoch has its own order and augmentation."""
    data, again = synthetic(), synthetic()
    data.setup("fit")
    again.setup("fit")
    sampler, same = data.train_dataloader().sampler, again.train_dataloader().sampler
    assert not torch.equal(sampler.order(0), sampler.order(1))
    assert torch.equal(sampler.order(1), same.order(1))
    g0 = data._augment_generator(torch.device("cpu"), 0, 0)
    g1 = data._augment_generator(torch.device("cpu"), 1, 0)
    assert not torch.equal(torch.rand(8, generator=g0), torch.rand(8, generator=g1))
