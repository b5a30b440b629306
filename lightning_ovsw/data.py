"""DataModules: CIFAR-10 (torchvision or an ImageFolder tree / archive), ImageNet-style folders, synthetic.

The small-image modules keep the whole split in memory as uint8 tensors ``(N, 3, H, W)`` and hand out
whole batches by one gather (no per-sample Python work), so ``num_workers=0`` is the right default even
on 2 cores. Augmentation (random crop with zero padding, horizontal flip) and normalisation run as
batched tensor ops in ``on_after_batch_transfer``, i.e. on the GPU when training there, so the loader is
never the bottleneck.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

CIFAR10_MEAN = (0.491, 0.482, 0.447)
CIFAR10_STD = (0.247, 0.243, 0.262)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ARCHIVE_SUFFIXES = (".tar", ".tar.xz", ".txz", ".tar.gz", ".tgz")
_CACHE_VERSION = 1
VAL_ORDER_SEED = 0


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


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike ``hash`` of strings)."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v) + 0x9E3779B9) % (1 << 63)
    return out


class EpochShuffleSampler(Sampler[int]):
    """A shuffled order of ``range(n)`` that depends on ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` at every epoch start, so epoch ``e`` of a resumed run sees the same order
    as epoch ``e`` of an uninterrupted one (a ``DataLoader(shuffle=True, generator=...)`` replays epoch 0's
    order after every restart). ``resume(epoch, skip)`` leaves out the first ``skip`` indices once, when
    that epoch is iterated: the part a mid-epoch checkpoint had already trained on.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        self._skip = (epoch, skip)

    def order(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:  # a generator: the epoch is read at the first ``next``
        skip = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                skip = self._skip[1]
            self._skip = None
        yield from self.order(self.epoch)[skip:].tolist()


class InMemoryImageDataModule(LightningDataModule):
    """Base for uint8-in-memory datasets: batched gathers, seeded shuffling, on-device augmentation.

    Subclasses implement ``_load(stage)`` returning ``(train_images, train_labels, val_images,
    val_labels)``; the validation split doubles as the test split (CIFAR-10 has no other).

    Resume is exact: the training order is a function of ``(seed, epoch)`` (``EpochShuffleSampler``), each
    batch's crops and flips of ``(seed, rank, epoch, batch index)``, and the position inside the epoch is
    checkpointed (``state_dict``), so a run resumed from an end-of-epoch or a mid-epoch checkpoint trains on
    exactly the batches an uninterrupted run would. The validation split is served in one fixed shuffled
    order (seed ``VAL_ORDER_SEED``, the same for every run) so that ``limit_val_batches`` sees every class.
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
        self._position: tuple[int, int] = (0, 0)  # (epoch, training batches transformed in it)
        self._resume: tuple[int, int] | None = None
        self._stats: dict[str, tuple[Tensor, Tensor]] = {}

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            xtr, ytr, xva, yva = self._load()
            self.train_set = TensorImageDataset(xtr, ytr)
            order = torch.randperm(len(yva), generator=torch.Generator().manual_seed(VAL_ORDER_SEED))
            self.val_set = TensorImageDataset(xva[order], yva[order])  # classes mixed: partial evals are fair

    def _loader(self, dataset: TensorImageDataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader.")
        sampler = None
        if shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.seed)
            if self._resume is not None:  # a mid-epoch checkpoint: skip what that epoch already trained on
                epoch, batches = self._resume
                sampler.resume(epoch, batches * batch_size)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=_keep_batch,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _next_train_batch(self) -> tuple[int, int]:
        """``(epoch, index of this batch in the epoch)`` of the training batch being transformed."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        seen_epoch, seen = self._position
        index = seen if epoch == seen_epoch else 0
        self._position = (epoch, index + 1)
        return epoch, index

    def _augment_generator(self, device: torch.device, epoch: int, index: int) -> torch.Generator:
        """The augmentation stream of one batch, a function of (seed, rank, epoch, batch index) alone, so a
        resumed run draws the same crops and flips as an uninterrupted one."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return torch.Generator(device=device).manual_seed(_mix(self.seed, 7919 * (rank + 1), epoch, index))

    def state_dict(self) -> dict[str, int]:
        """Checkpointed position in the training stream: the epoch and how many of its batches were used."""
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._position = (int(state_dict["epoch"]), int(state_dict["batches"]))
        self._resume = self._position

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``."""
        key = str(images.device)
        if key not in self._stats:  # built once per device: no host-to-device copy per batch
            mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
            self._stats[key] = (mean, std)
        mean, std = self._stats[key]
        return (images.float().div_(255.0) - mean) / std

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            epoch, index = self._next_train_batch()
            if self.augment:
                generator = self._augment_generator(images.device, epoch, index)
                images = random_crop_flip(images, self.crop_padding, generator)
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


def _split_of(parts: Sequence[str], splits: dict[str, str]) -> tuple[str, str] | None:
    """``(split, class)`` for a path ``.../<split>/<class>/<file>`` with a known image suffix."""
    if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_SUFFIXES) or parts[-3] not in splits:
        return None
    return splits[parts[-3]], parts[-2]


def _decode_all(blobs: list[Tensor], names: list[str], threads: int) -> Tensor:
    """Decode encoded images into one uint8 ``(N, 3, H, W)`` tensor, in ``threads`` parallel chunks."""
    from torchvision.io import ImageReadMode, decode_image

    def decode_chunk(start: int) -> list[Tensor]:
        out = []
        for i in range(start, min(start + 1024, len(blobs))):
            try:
                out.append(decode_image(blobs[i], mode=ImageReadMode.RGB))
            except RuntimeError as err:
                raise ValueError(f"cannot decode {names[i]!r} (corrupt or truncated image?): {err}") from err
        return out

    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool:
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; they stay until 0.30 (pinned)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
        images = [img for chunk in pool.map(decode_chunk, range(0, len(blobs), 1024)) for img in chunk]
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) != 1:
        raise ValueError(
            f"images have different sizes {sorted(sizes)[:4]}; CIFAR10DataModule needs one size "
            "(use ImageFolderDataModule, which resizes, for mixed-size data)."
        )
    return torch.stack(images)


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10 from torchvision's download or from an ``ImageFolder`` tree, decoded once and cached.

    ``data_dir`` is one of: a torchvision CIFAR-10 root (``cifar-10-batches-py`` inside, or
    ``download=True``); an ImageFolder root with ``train/<class>/*`` and ``test/<class>/*`` (or
    ``val/``); or a ``.tar``/``.tar.xz`` archive of such a tree, read directly without extracting.
    ImageFolder data is decoded in parallel threads once and cached as plain uint8 tensors in
    ``cache_dir`` (``torch.save``; loaded with ``weights_only=True``). ``limit`` keeps at most that many
    images per split, balanced over classes (for quick tests). The test split serves as validation,
    as in the paper. Augmentation: random crop with padding 4 and horizontal flip (paper), on device.
    """

    def __init__(
        self,
        data_dir: str = "data",
        source: Literal["auto", "torchvision", "imagefolder"] = "auto",
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = False,
        cache_dir: str | None = None,
        limit: int | None = None,
        augment: bool = True,
        decode_threads: int | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, seed, augment, 4, CIFAR10_MEAN, CIFAR10_STD, eval_batch_size
        )
        if source not in ("auto", "torchvision", "imagefolder"):
            raise ValueError(f"source={source!r}; choose 'auto', 'torchvision' or 'imagefolder'.")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be None or >= 1, got {limit}.")
        self.data_dir = Path(data_dir).expanduser()
        self.source = source
        self.download = download
        default_cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lightning_ovsw"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache
        self.limit = limit
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        self.num_classes = 10

    def resolved_source(self) -> str:
        """``"torchvision"`` or ``"imagefolder"``, with a clear error when ``data_dir`` holds neither."""
        if self.source != "auto":
            return self.source
        d = self.data_dir
        if not d.exists():
            if self.download and not d.name.endswith(_ARCHIVE_SUFFIXES):
                return "torchvision"  # the user asked for torchvision's download into this directory
            raise FileNotFoundError(
                f"data_dir {str(d)!r} does not exist: give an existing ImageFolder root (train/, test/), a "
                ".tar(.xz) of one, or a torchvision CIFAR-10 root; or download=True with a directory to "
                "download CIFAR-10 into."
            )
        if d.is_file() and d.name.endswith(_ARCHIVE_SUFFIXES):
            return "imagefolder"
        if (d / "train").is_dir():
            return "imagefolder"
        if (d / "cifar-10-batches-py").is_dir() or self.download:
            return "torchvision"
        raise FileNotFoundError(
            f"no CIFAR-10 found at {str(d)!r}: expected an ImageFolder root (train/, test/), a .tar(.xz) "
            "of one, or a torchvision root (cifar-10-batches-py/); pass download=True to fetch it."
        )

    def cache_path(self) -> Path:
        """Where the decoded tensors of this ImageFolder source (and ``limit``) are cached."""
        src = self.data_dir.resolve()
        st = src.stat()
        key = f"{_CACHE_VERSION}|{src}|{st.st_size}|{st.st_mtime_ns}|{self.limit}"
        return self.cache_dir / f"cifar10-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"

    def prepare_data(self) -> None:
        if self.resolved_source() == "torchvision":
            from torchvision.datasets import CIFAR10

            CIFAR10(str(self.data_dir), train=True, download=self.download)
            CIFAR10(str(self.data_dir), train=False, download=self.download)
        elif not self.cache_path().exists():
            self._build_cache()

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.resolved_source() == "torchvision":
            return self._load_torchvision()
        path = self.cache_path()
        data = self._read_cache(path) if path.exists() else self._build_cache()
        return data["train_images"], data["train_labels"], data["test_images"], data["test_labels"]

    def _load_torchvision(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from torchvision.datasets import CIFAR10  # verifies the files' md5 before reading them

        out: list[Tensor] = []
        for train in (True, False):
            ds = CIFAR10(str(self.data_dir), train=train, download=self.download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor(ds.targets, dtype=torch.long)
            if self.limit is not None:
                images, labels = images[: self.limit], labels[: self.limit]
            out += [images, labels]
        return out[0], out[1], out[2], out[3]

    def _read_cache(self, path: Path) -> dict[str, Tensor]:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            for split in ("train", "test"):
                images, labels = data[f"{split}_images"], data[f"{split}_labels"]
                if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
                    raise ValueError(f"bad {split} tensors")
        except Exception as err:
            msg = f"cache file {str(path)!r} is corrupt ({err}); delete it to rebuild it."
            raise ValueError(msg) from err
        return data

    def _collect(self) -> dict[str, list[tuple[str, str, Tensor]]]:
        """``split -> [(class, name, encoded bytes)]`` from the directory or archive, ``limit`` applied."""
        splits = {"train": "train", "test": "test", "val": "test"}
        found: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
        if self.data_dir.is_file():
            try:
                with tarfile.open(self.data_dir) as archive:  # read members as bytes, never extract
                    for member in archive:
                        where = _split_of(member.name.split("/"), splits) if member.isfile() else None
                        if where is not None:
                            blob = archive.extractfile(member).read()
                            found[where[0]].append((where[1], member.name, blob))
            except (tarfile.TarError, EOFError, OSError) as err:
                msg = f"cannot read archive {str(self.data_dir)!r} (corrupt or truncated?): {err}"
                raise ValueError(msg) from err
        else:
            for path in sorted(self.data_dir.glob("*/*/*")):
                where = _split_of(path.relative_to(self.data_dir).parts, splits)
                if where is not None and path.is_file():
                    found[where[0]].append((where[1], str(path), path.read_bytes()))
        result: dict[str, list[tuple[str, str, Tensor]]] = {}
        for split, items in found.items():
            if not items:
                msg = f"no {split} images under {str(self.data_dir)!r} (<split>/<class>/<file>)."
                raise FileNotFoundError(msg)
            items.sort(key=lambda t: (t[0], t[1]))
            if self.limit is not None:
                classes = sorted({c for c, _, _ in items})
                per_class = -(-self.limit // len(classes))
                counts: dict[str, int] = {}
                kept = []
                for item in items:
                    counts[item[0]] = counts.get(item[0], 0) + 1
                    if counts[item[0]] <= per_class:
                        kept.append(item)
                items = kept[: self.limit]
            result[split] = [(c, n, torch.frombuffer(bytearray(b), dtype=torch.uint8)) for c, n, b in items]
        return result

    def _build_cache(self) -> dict[str, Tensor]:
        rank_zero_info(
            f"Decoding the CIFAR-10 images of {str(self.data_dir)!r} once (about 25 s for the full set on 2 "
            f"cores); the result is cached in {str(self.cache_path())!r} for every later run."
        )
        found = self._collect()
        classes = sorted({c for c, _, _ in found["train"]})
        if len(classes) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class folders, found {len(classes)}: {classes}")
        index = {c: i for i, c in enumerate(classes)}
        data: dict[str, Tensor] = {}
        for split, items in found.items():
            unknown = {c for c, _, _ in items} - set(index)
            if unknown:
                raise ValueError(f"{split} has classes missing from train: {sorted(unknown)}")
            data[f"{split}_images"] = _decode_all([b for _, _, b in items], [n for _, n, _ in items],
                                                  self.decode_threads)
            data[f"{split}_labels"] = torch.tensor([index[c] for c, _, _ in items], dtype=torch.long)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_path()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        tmp.replace(path)
        return data


class ImageFolderDataModule(LightningDataModule):
    """ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` with torchvision transforms v2.

    Train: ``RandomResizedCrop(crop_size)`` + horizontal flip; val/test: resize to ``resize_size`` and
    center-crop ``crop_size``; both normalised with the ImageNet mean and std.
    """

    def __init__(
        self,
        data_dir: str,
        train_dir: str = "train",
        val_dir: str = "val",
        batch_size: int = 512,
        num_workers: int | None = None,
        crop_size: int = 224,
        resize_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if crop_size < 1 or resize_size < crop_size:
            raise ValueError(f"need 1 <= crop_size <= resize_size, got {crop_size}, {resize_size}.")
        self.root = Path(data_dir).expanduser()
        self.train_dir, self.val_dir = train_dir, val_dir
        self.batch_size = batch_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.crop_size, self.resize_size = crop_size, resize_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def transforms(self, train: bool):
        """The torchvision transforms v2 pipeline for the train or the evaluation split."""
        from torchvision.transforms import v2

        if train:
            geometry = [v2.RandomResizedCrop(self.crop_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.crop_size)]
        to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return v2.Compose([v2.ToImage(), *geometry, *to_float])

    def setup(self, stage: str | None = None) -> None:
        from torchvision.datasets import ImageFolder

        for sub in (self.train_dir, self.val_dir):
            if not (self.root / sub).is_dir():
                msg = f"{str(self.root / sub)!r} is missing; expected <root>/{sub}/<class>/<image>."
                raise FileNotFoundError(msg)
        if self.train_set is None:
            self.train_set = ImageFolder(str(self.root / self.train_dir), transform=self.transforms(True))
            self.val_set = ImageFolder(str(self.root / self.val_dir), transform=self.transforms(False))
            self.num_classes = len(self.train_set.classes)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader.")
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
