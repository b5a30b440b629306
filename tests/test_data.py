"""DataModules: on-device augmentation, seeded loaders, synthetic task, CIFAR-10 from folders/archives."""


import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import decode_image, encode_jpeg, write_png

from lightning_ovsw.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    TensorImageDataset,
    random_crop_flip,
)

REAL_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
CLASSES = [f"class{i}" for i in range(10)]
# the tests write and read images with torchvision.io, deprecated (not removed) in torchvision 0.29
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io")


def test_random_crop_flip_matches_per_sample_reference():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # same draws, in the documented order: oy, ox, flip
    oy = torch.randint(0, 9, (16, 1), generator=g)
    ox = torch.randint(0, 9, (16, 1), generator=g)
    flip = torch.rand(16, 1, generator=g) < 0.5
    for i in range(16):
        padded = F.pad(images[i], (4, 4, 4, 4))
        crop = padded[:, oy[i, 0] : oy[i, 0] + 8, ox[i, 0] : ox[i, 0] + 8]
        expected = crop.flip(-1) if flip[i, 0] else crop
        assert torch.equal(out[i], expected)
    assert out.dtype == torch.uint8 and len({int(v) for v in oy}) > 3 and 0 < int(flip.sum()) < 16


def test_normalize_and_no_augmentation_outside_training():
    dm = SyntheticDataModule(num_train=4, num_val=4)
    dm.mean, dm.std = CIFAR10_MEAN, CIFAR10_STD
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    labels = torch.arange(4)
    x, y = dm.on_after_batch_transfer((images, labels), 0)  # no trainer: evaluation path
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert x.dtype == torch.float32 and torch.equal(y, labels)


def test_tensor_dataset_batches_and_seeded_shuffling():
    ds = TensorImageDataset(torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2), torch.arange(10))
    x, y = ds.__getitems__([3, 1])
    assert torch.equal(x, torch.stack([ds[3][0], ds[1][0]])) and y.tolist() == [3, 1]
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2))

    def order(seed):
        dm = SyntheticDataModule(num_train=50, num_val=10, batch_size=16, seed=seed)
        dm.setup()
        batches = list(dm.train_dataloader())
        assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
        return torch.cat([b[0].flatten(1) for b in batches]), dm.train_set.images.flatten(1)

    a, images = order(0)
    b, _ = order(0)
    assert torch.equal(a, b)
    # every sample exactly once per epoch
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, images.tolist()))


def test_synthetic_is_seeded_and_learnable():
    def make(seed):
        dm = SyntheticDataModule(num_train=2000, num_val=500, seed=seed)
        dm.setup()
        return dm

    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert torch.equal(a.val_set.labels, b.val_set.labels)
    assert not torch.equal(a.train_set.images, c.train_set.images)
    assert a.train_set.images.shape == (2000, 3, 32, 32) and a.train_set.images.dtype == torch.uint8
    assert torch.bincount(a.train_set.labels, minlength=10).min() > 120
    # an independent nearest-class-mean classifier is far above chance (10 %)
    x = a.normalize(a.train_set.images).flatten(1).double()
    means = torch.stack([x[a.train_set.labels == k].mean(0) for k in range(10)])
    xv = a.normalize(a.val_set.images).flatten(1).double()
    acc = (torch.cdist(xv, means).argmin(1) == a.val_set.labels).double().mean()
    assert acc > 0.5, acc


def _image(seed: int, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)


def make_folder(root: Path, per_class: dict[str, int], size: int = 32, classes=CLASSES) -> dict:
    """PNG ImageFolder tree; returns {(split, class, index): image} for exact comparison."""
    written = {}
    for split, n in per_class.items():
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = _image(1000 * k + 10 * i + len(split), size)
                write_png(img, str(root / split / cls / f"{i:04d}.png"))
                written[(split, cls, i)] = img
    return written


def expected_tensors(written: dict, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = sorted((c, i) for (s, c, i) in written if s == split and i < n)
    labels = torch.tensor([CLASSES.index(c) for c, _ in keys])
    return torch.stack([written[(split, c, i)] for c, i in keys]), labels


def test_cifar_module_on_folder_and_archive_gives_exact_pixels(tmp_path, monkeypatch):
    written = make_folder(tmp_path / "tree", {"train": 3, "test": 2})
    dm = CIFAR10DataModule(str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"), batch_size=8)
    assert dm.resolved_source() == "imagefolder"
    dm.prepare_data()
    dm.setup()
    images, labels = expected_tensors(written, "train", 3)
    assert torch.equal(dm.train_set.images, images) and torch.equal(dm.train_set.labels, labels)
    images, labels = expected_tensors(written, "test", 2)  # validation: the same pairs, in a shuffled order

    def pairs(xs, ys):
        return sorted((int(y), tuple(x.flatten().tolist())) for x, y in zip(xs, ys, strict=True))

    assert pairs(dm.val_set.images, dm.val_set.labels) == pairs(images, labels)
    assert not torch.equal(dm.val_set.labels, labels)
    assert dm.cache_path().exists()

    # a second module reads the cache (no decoding), loaded with weights_only=True
    monkeypatch.setattr("lightning_ovsw.data._decode_all", lambda *a: pytest.fail("decoded again"))
    again = CIFAR10DataModule(str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"))
    again.setup()
    assert torch.equal(again.train_set.images, dm.train_set.images)
    monkeypatch.undo()

    archive = tmp_path / "cifar.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "tree", arcname="cifar10")
    from_tar = CIFAR10DataModule(str(archive), cache_dir=str(tmp_path / "cache"), limit=10)
    from_tar.setup()
    images, labels = expected_tensors(written, "train", 1)  # limit 10 over 10 classes: first of each
    assert torch.equal(from_tar.train_set.images, images) and torch.equal(from_tar.train_set.labels, labels)
    assert len(from_tar.val_set) == 10


def test_cifar_module_rejects_bad_inputs_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        CIFAR10DataModule(str(tmp_path / "nothing")).resolved_source()
    make_folder(tmp_path / "tree", {"train": 1, "test": 1})
    bad = tmp_path / "tree" / "train" / "class3" / "0000.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match="0000.png"):
        CIFAR10DataModule(str(tmp_path / "tree"), cache_dir=str(tmp_path / "c")).setup()
    truncated = tmp_path / "t.tar.xz"
    with tarfile.open(truncated, "w:xz") as tar:
        tar.add(tmp_path / "tree", arcname="x")
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CIFAR10DataModule(str(truncated), cache_dir=str(tmp_path / "c")).setup()
    make_folder(tmp_path / "five", {"train": 1, "test": 1}, classes=CLASSES[:5])
    with pytest.raises(ValueError, match="expected 10 class folders"):
        CIFAR10DataModule(str(tmp_path / "five"), cache_dir=str(tmp_path / "c")).setup()
    good = CIFAR10DataModule(str(tmp_path / "five"), cache_dir=str(tmp_path / "c"))
    good.cache_path().parent.mkdir(parents=True, exist_ok=True)
    good.cache_path().write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="delete it to rebuild"):
        good.setup()
    with pytest.raises(ValueError, match="source"):
        CIFAR10DataModule(str(tmp_path), source="lmdb")


@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason=f"real CIFAR-10 archive not found at {REAL_ARCHIVE}")
def test_cifar_module_on_the_real_archive(tmp_path):
    dm = CIFAR10DataModule(str(REAL_ARCHIVE), cache_dir=str(tmp_path), limit=1000)
    dm.setup()
    assert dm.train_set.images.shape == (1000, 3, 32, 32) and dm.val_set.images.shape == (1000, 3, 32, 32)
    assert torch.bincount(dm.train_set.labels).tolist() == [100] * 10
    # independent decode of the first airplane training image straight from the archive
    with tarfile.open(REAL_ARCHIVE) as tar:
        names = sorted(m.name for m in tar if "/train/airplane/" in f"/{m.name}" and m.isfile())
    with tarfile.open(REAL_ARCHIVE) as tar:
        blob = tar.extractfile(names[0]).read()
    reference = decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    assert torch.equal(dm.train_set.images[0], reference)
    mean = dm.train_set.images.double().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor(CIFAR10_MEAN, dtype=torch.float64), atol=0.03, rtol=0)


def test_imagefolder_module_transforms(tmp_path):
    from PIL import Image

    root = tmp_path / "imnet"
    for split in ("train", "val"):
        for k in range(3):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(2):
                buf = encode_jpeg(_image(10 * k + i, 40))
                (root / split / f"c{k}" / f"{i}.jpg").write_bytes(bytes(buf.numpy()))
    dm = ImageFolderDataModule(str(root), batch_size=4, num_workers=0, crop_size=24, resize_size=28)
    dm.setup()
    assert dm.num_classes == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.max() < 3
    xv, yv = next(iter(dm.val_dataloader()))
    # reference: PIL resize (shorter side 28, bilinear) + center crop 24 + normalise
    pil = Image.open(root / "val" / "c0" / "0.jpg").convert("RGB").resize((28, 28), Image.BILINEAR)
    ref = torch.from_numpy(np.array(pil)).double().permute(2, 0, 1)[:, 2:26, 2:26]
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(xv[0].double(), (ref / 255 - mean) / std, atol=0.05, rtol=0)
    assert yv[0] == 0
    (tmp_path / "only_train" / "train" / "c0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val' is missing"):
        ImageFolderDataModule(str(tmp_path / "only_train")).setup()




@pytest.mark.parametrize("name, download", [("cifar10-jpg.tar.xz", True), ("cifar10-jpg.tar.xz", False),
                                            ("no_such_dir", False)])
def test_missing_data_dir_is_a_clear_error_and_creates_nothing(tmp_path, monkeypatch, name, download):
    """A typo in the path never becomes a download attempt nor leaves a directory behind."""
    monkeypatch.chdir(tmp_path)
    data = CIFAR10DataModule(name, download=download, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        data.prepare_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_validation_order_mixes_classes(tmp_path):
    """Class-sorted data (as ImageFolder gives it) is served in a fixed shuffled order: a partial evaluation
    (``limit_val_batches``) sees every class within its first 10 % of batches, the same order every run."""
    make_folder(tmp_path / "data", {"train": 1, "test": 50})
    orders = []
    for seed in (0, 1):
        data = CIFAR10DataModule(str(tmp_path / "data"), batch_size=10, eval_batch_size=10, seed=seed,
                                 cache_dir=str(tmp_path / "cache"))
        data.setup("fit")
        batches = list(data.val_dataloader())
        first = torch.cat([y for _, y in batches[: max(1, len(batches) // 10)]])
        assert set(first.tolist()) == set(range(len(CLASSES)))
        orders.append(torch.cat([y for _, y in batches]))
    assert torch.equal(orders[0], orders[1])
    assert sorted(orders[0].tolist()) == sorted(sum(([i] * 50 for i in range(len(CLASSES))), []))
