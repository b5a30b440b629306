"""The README's first command: train a small binarized CNN with AGS + SAD + FlipMonitor, offline on CPU.

The data is SYNTHETIC (``SyntheticDataModule``: generated class patterns + noise), so no download is
needed; it shows the whole workflow, not CIFAR accuracy (see ``configs/`` for the paper's recipes).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_ovsw import AGSCallback, FlipMonitor, SADCallback, binarization_summary, binarize_model
from lightning_ovsw.data import SyntheticDataModule
from lightning_ovsw.module import ClassificationModule


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A float CNN (first conv and classifier stay full precision after binarization)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.Hardtanh()]

    return nn.Sequential(
        *block(3, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64), nn.MaxPool2d(2), *block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(128), nn.Linear(128, num_classes),
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run(argv: list[str] | None = None) -> float:
    """Train the demo and print what it did; returns the validation top-1 accuracy in [0, 1]."""
    parser = argparse.ArgumentParser(prog="lightning-ovsw-demo", description=__doc__)
    parser.add_argument("--epochs", type=positive_int, default=4)
    parser.add_argument("--num-train", type=positive_int, default=5000, help="synthetic training images")
    parser.add_argument("--log-dir", default="ovsw_logs")
    parser.add_argument("--noise", type=float, default=7.0, help="noise of the synthetic images (higher is harder)")
    args = parser.parse_args(argv)
    pl.seed_everything(0, workers=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = binarize_model(small_cnn())
    module = ClassificationModule(model, lr=0.05, weight_decay=5e-4, warmup_epochs=0.5)
    data = SyntheticDataModule(num_train=args.num_train, num_val=1000, batch_size=128, noise=args.noise)
    logger = TensorBoardLogger(args.log_dir, name="demo", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=logger, log_every_n_steps=10,
        callbacks=[AGSCallback(delta=0.04), SADCallback(penalty=9e-4), FlipMonitor()],
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    acc = trainer.validate(module, datamodule=data, verbose=False)[0]["val/acc1"]
    print("\nData: SYNTHETIC (generated offline by lightning_ovsw.data.SyntheticDataModule), 10 classes.")
    print(f"Validation top-1 accuracy: {100 * acc:.1f}% (chance: 10%)\n")
    print(binarization_summary(model, (1, 3, 32, 32)))
    print(f"\nTensorBoard logs (flip dashboards under CUSTOM SCALARS): tensorboard --logdir {logger.log_dir}")
    return acc


def main(argv: list[str] | None = None) -> None:
    """Console script ``lightning-ovsw-demo``: exit status 0 on success (``run`` returns the accuracy)."""
    run(argv)


if __name__ == "__main__":
    main()
