"""Run by tests/test_ddp.py: the callbacks under DDP (2 CPU processes, gloo) or on one process."""

import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_callbacks import DELTA, SIGMA, TAU, M, Module, make_data, make_model  # noqa: E402

from lightning_ovsw import AGSCallback, SADCallback  # noqa: E402


class ShardedModule(Module):
    """Rank r trains on samples r, r + n, ...: its 16 / n per step are its share of the global batch of 16."""

    def __init__(self, model, devices):
        super().__init__(model)
        self.devices = devices

    def train_dataloader(self):
        data = make_data(96)
        shard = torch.utils.data.Subset(data, range(self.global_rank, len(data), self.devices))
        return DataLoader(shard, batch_size=16 // self.devices)


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    sad = SADCallback(SIGMA, M, TAU)
    module = ShardedModule(make_model(), devices)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AGSCallback(DELTA), sad], use_distributed_sampler=False,
    )
    trainer.fit(module)
    if trainer.global_rank == 0:
        torch.save({"weights": module.model.state_dict(), "trackers": sad.trackers}, out)
