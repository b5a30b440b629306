"""DataModules: CIFAR-10 (torchvision or an ImageFolder tree / archive), ImageNet-style folders, synthetic.

The small-image modules keep the whole split in memory as uint8 tensors ``(N, 3, H, W)`` and hand out
whole batches by one gather (no per-sample Python work), so ``num_workers=0`` is the right default even
on 2 cores. Augmentation (random crop with zero padding, horizontal flip) and normalisation run as
batched tensor ops in ``on_after_batch_transfer``, i.e. on the GPU when training there, so the loader is
never the bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

CIFAR10_MEAN = (0.491, 0.482, 0.447)
CIFAR10_STD = (0.247, 0.243, 0.262)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ARCHIVE_SUFFIXES = (".tar", ".tar.xz", ".txz", ".tar.gz", ".tgz")
_CACHE_VERSION = 1


class TensorImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` with int64 labels; ``__getitems__`` gathers a whole batch at once."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def _keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate for ``TensorImageDataset``: ``__getitems__`` already returns the stacked batch."""
    return batch


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop of the zero-padded batch (same size as the input) and horizontal flip.

    The batched equivalent of torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``.
    """
    n, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    flip = torch.rand(n, 1, device=dev, generator=generator) < 0.5
    rows = oy + torch.arange(h, device=dev)
    cols_fwd = torch.arange(w, device=dev)
    cols = ox + torch.where(flip, cols_fwd.flip(0), cols_fwd)
    batch_idx = torch.arange(n, device=dev)[:, None, None, None]
    chan_idx = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class InMemoryImageDataModule(LightningDataModule):
    """Base for uint8-in-memory datasets: batched gathers, seeded shuffling, on-device augmentation.

    Subclasses implement ``_load(stage)`` returning ``(train_images, train_labels, val_images,
    val_labels)``; the validation split doubles as the test split (CIFAR-10 has no other).
    """

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or crop_padding < 0:
            raise ValueError("batch_size must be >= 1, num_workers >= 0 and crop_padding >= 0.")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0 (got {mean}, {std}).")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train_set: TensorImageDataset | None = None
        self.val_set: TensorImageDataset | None = None
        self._aug_generator: torch.Generator | None = None

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            xtr, ytr, xva, yva = self._load()
            self.train_set = TensorImageDataset(xtr, ytr)
            self.val_set = TensorImageDataset(xva, yva)

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader.")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=_keep_batch,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._aug_generator is None or self._aug_generator.device != device:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._aug_generator = torch.Generator(device=device).manual_seed(self.seed + 7919 * (rank + 1))
        return self._aug_generator

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        images, labels = batch
        training = self._trainer is not None and self.trainer.training
        if training and self.augment and self.crop_padding >= 0:
            images = random_crop_flip(images, self.crop_padding, self._generator(images.device))
        return self.normalize(images), labels


class SyntheticDataModule(InMemoryImageDataModule):
    """A generated, seeded, learnable image classification task (offline; for demos and tests).

    Each class ``c`` has a fixed smooth template ``T_c`` (a random ``3 x 4 x 4`` pattern, bilinearly
    upsampled). A sample is ``0.5 + 0.18 * (a * shift(T_c) + noise * N(0, 1))`` clipped to [0, 1] and
    stored as uint8, with a random gain ``a`` in [0.7, 1.3] and a random circular shift of up to
    ``max_shift`` pixels, so a small CNN must learn translation-tolerant spatial features.
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_val: int = 1000,
        num_classes: int = 10,
        image_size: int = 32,
        noise: float = 2.0,
        max_shift: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
        crop_padding: int = 4,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, seed, augment, crop_padding, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
            eval_batch_size,
        )
        if num_train < 1 or num_val < 1 or num_classes < 2 or image_size < 4 or noise < 0 or max_shift < 0:
            raise ValueError(
                "need num_train >= 1, num_val >= 1, num_classes >= 2, image_size >= 4, noise >= 0 and "
                "max_shift >= 0."
            )
        self.num_train, self.num_val = num_train, num_val
        self.num_classes, self.image_size = num_classes, image_size
        self.noise, self.max_shift = noise, max_shift

    def generate(self, n: int, generator: torch.Generator, templates: Tensor) -> tuple[Tensor, Tensor]:
        """``n`` samples (uint8 images, labels) drawn with ``generator`` from the class ``templates``."""
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        x = templates[labels]
        gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), generator=generator)
        pairs = zip(x, shifts.tolist(), strict=True)
        x = torch.stack([torch.roll(img, (dy, dx), (1, 2)) for img, (dy, dx) in pairs])
        x = gain * x + self.noise * torch.randn(x.shape, generator=generator)
        images = (0.5 + 0.18 * x).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return images, labels

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self.num_classes, 3, 4, 4, generator=gen)
        templates = F.interpolate(coarse, size=self.image_size, mode="bilinear", align_corners=False)
        templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        xtr, ytr = self.generate(self.num_train, gen, templates)
        xva, yva = self.generate(self.num_val, gen, templates)
        return xtr, ytr, xva, yva
