"""``ClassificationModule``: the paper's training recipe as a LightningModule.

SGD (momentum 0.9, optional Nesterov), cosine learning rate with linear warm-up measured in epochs and
stepped every optimizer step, weight decay with an option to exempt BatchNorm and bias parameters,
label smoothing, torchmetrics top-1/top-5 accuracy. The OvSW parts (AGS, SAD, FlipMonitor) are
callbacks and are configured next to it, not in it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ovsw.models import create_model


def infer_num_classes(model: nn.Module) -> int:
    """Output width of the last ``nn.Linear`` / ``nn.Conv2d`` in ``model`` (its classifier)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError("cannot infer num_classes: the model has no Linear/Conv2d layer; pass num_classes.")
    last = layers[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def warmup_cosine(step: int, warmup_steps: float, total_steps: int) -> float:
    """LR factor: linear warm-up ``(step + 1) / warmup_steps``, then half a cosine from 1 down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ClassificationModule(LightningModule):
    """Image classification with cross-entropy for any ``nn.Module`` or a zoo model name.

    Args:
        model: a zoo name (resnet20_1w1a, resnet18_cifar_1w1a, vgg_small_1w1a, resnet18_1w1a,
            resnet34_1w1a) or any ``nn.Module`` (in YAML: ``class_path`` + ``init_args``).
        model_kwargs: arguments for the zoo constructor when ``model`` is a name
            (``num_classes``, ``binary``, binary layer options).
        num_classes: for the accuracy metrics; inferred from the model's last layer when ``None``.
        lr: SGD peak learning rate (paper: 0.1 at batch 256; use a warm-up with it).
        momentum: SGD momentum (paper: 0.9).
        nesterov: Nesterov momentum (paper: off).
        weight_decay: L2 weight decay (paper: 5e-4 CIFAR-10, 1e-4 ImageNet).
        no_decay_bn_bias: no weight decay on parameters with fewer than 2 dims (BatchNorm, biases,
            PReLU slopes, learnable scales); the paper's ImageNet recipe.
        warmup_epochs: linear warm-up length in epochs (may be fractional); 0 disables it.
        label_smoothing: passed to the cross-entropy loss.
        schedule_epochs: length of the warm-up + cosine schedule in epochs; ``None`` = the Trainer's
            run length. Set it to the full recipe (e.g. 600) to stop a run early with
            ``--trainer.max_epochs`` and continue it later from ``last.ckpt`` on the same schedule.
    """

    def __init__(
        self,
        model: nn.Module | str = "resnet20_1w1a",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        no_decay_bn_bias: bool = False,
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        schedule_epochs: float | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or warmup_epochs < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0 and warmup_epochs >= 0.")
        if schedule_epochs is not None and schedule_epochs <= warmup_epochs:
            raise ValueError(f"schedule_epochs={schedule_epochs} must exceed warmup_epochs={warmup_epochs} (or be None).")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0.")
        if isinstance(model, str):
            self.save_hyperparameters()  # the zoo name is enough to rebuild it from a checkpoint
            model = create_model(model, **(model_kwargs or {}))
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a zoo name, got {type(model).__name__}.")
        elif model_kwargs:
            raise ValueError("model_kwargs apply only when model is a zoo name.")
        else:
            self.save_hyperparameters(ignore=["model"])  # module weights are in the state dict
        self.model = model
        self.num_classes = num_classes or infer_num_classes(model)
        top5 = min(5, self.num_classes)
        for split in ("val", "test"):
            setattr(self, f"{split}_acc1", MulticlassAccuracy(self.num_classes, top_k=1, average="micro"))
            setattr(self, f"{split}_acc5", MulticlassAccuracy(self.num_classes, top_k=top5, average="micro"))
        self.train_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_acc1(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        logits = self(x)
        acc1, acc5 = getattr(self, f"{split}_acc1"), getattr(self, f"{split}_acc5")
        acc1(logits, y)
        acc5(logits, y)
        self.log(f"{split}/loss", self._loss(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{split}/acc1", acc1, prog_bar=True)
        self.log(f"{split}/acc5", acc5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group, or two when ``no_decay_bn_bias`` (parameters with < 2 dims get no weight decay)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        wd = self.hparams.weight_decay
        if not self.hparams.no_decay_bn_bias:
            return [{"params": params, "weight_decay": wd}]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameter_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov
        )
        if hp.schedule_epochs is not None:
            total = math.ceil(hp.schedule_epochs * self._steps_per_epoch())
        else:
            total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a finite run: set trainer max_epochs or max_steps.")
        warmup = hp.warmup_epochs * self._steps_per_epoch() if hp.warmup_epochs else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, int(total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the data is set up here when only ``max_steps`` was given)."""
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("warmup_epochs needs a training dataloader with a length; give warm-up-free runs or a sized loader.")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
