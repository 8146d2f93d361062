"""Image classification datasets.

* ``digits``: scikit-learn's 1,797 handwritten digits (8 x 8, grey levels 0-16), shipped
  inside scikit-learn, so it works offline and on Binder. The default everywhere.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: torchvision datasets, downloaded
  into ``root`` when possible; otherwise a :class:`DatasetUnavailableError` names the
  dataset, the folder and the offline alternative.
* ``imagefolder``: any ImageNet-style tree ``root/{train,val}/<class>/<image>``.

Splits are deterministic: the validation split is a seeded, stratified hold-out of the
training data; the test split is the dataset's own test set (digits: a seeded, stratified
hold-out, since scikit-learn ships a single set).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "DatasetSplits",
    "DatasetUnavailableError",
    "IMAGE_DATASETS",
    "load_digits_splits",
    "load_torchvision",
    "image_folder",
    "load_image_dataset",
]


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be found or downloaded; the message says where and what to do instead."""


@dataclass
class DatasetSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_shape: tuple[int, int, int]
    class_names: list[str]
    name: str

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(keep), np.sort(held)


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def load_digits_splits(val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """scikit-learn digits as float images in [0, 1], shape (1, 8, 8); seeded stratified splits."""
    from sklearn.datasets import load_digits

    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if not 0 < test_fraction:
        raise ValueError("digits has no separate test set: test_fraction must be > 0")
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    rest, test = _stratified_split(bunch.target, test_fraction, seed)
    tr, va = _stratified_split(bunch.target[rest], val_fraction / (1 - test_fraction), seed)
    train, val = rest[tr], rest[va]

    def part(idx):
        return TensorDataset(x[idx], y[idx])

    return DatasetSplits(part(train), part(val), part(test), 10, (1, 8, 8), [str(i) for i in range(10)], "digits")


# name -> (torchvision class name, in_shape, number of classes)
_TORCHVISION = {
    "mnist": ("MNIST", (1, 28, 28), 10),
    "fashion_mnist": ("FashionMNIST", (1, 28, 28), 10),
    "cifar10": ("CIFAR10", (3, 32, 32), 10),
    "cifar100": ("CIFAR100", (3, 32, 32), 100),
}
IMAGE_DATASETS = ("digits", *_TORCHVISION, "imagefolder")


def _targets(ds) -> np.ndarray:
    return np.asarray(ds.targets if not torch.is_tensor(ds.targets) else ds.targets.numpy())


def load_torchvision(name: str, root: str | Path = "data", download: bool = True, val_fraction: float = 0.1,
                     seed: int = 0) -> DatasetSplits:
    """MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 from torchvision, as tensors in [0, 1]."""
    import torchvision
    from torchvision import transforms

    if name not in _TORCHVISION:
        raise ValueError(f"unknown torchvision dataset {name!r}; expected one of {sorted(_TORCHVISION)}")
    _check_fraction("val_fraction", val_fraction)
    cls_name, in_shape, num_classes = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(root)
    tf = transforms.ToTensor()
    try:
        full = cls(str(root), train=True, download=download, transform=tf)
        test = cls(str(root), train=False, download=download, transform=tf)
    except (RuntimeError, OSError, ValueError) as err:  # URLError is an OSError
        how = "download failed" if download else "not found and download=False"
        raise DatasetUnavailableError(
            f"dataset {name!r} is not available in folder '{root}' ({how}: {err}). "
            f"Offline? Use dataset='digits' (scikit-learn's digits, bundled, no download), or put the "
            f"{cls_name} files into '{root}' on a machine with internet access first."
        ) from err
    keep, held = _stratified_split(_targets(full), val_fraction, seed)
    names = list(getattr(full, "classes", [str(i) for i in range(num_classes)]))
    return DatasetSplits(Subset(full, keep.tolist()), Subset(full, held.tolist()), test, num_classes, in_shape,
                         names, name)


def image_folder(root: str | Path, image_size: int = 224, val_fraction: float = 0.0, seed: int = 0) -> DatasetSplits:
    """An ImageNet-style tree: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Images are resized (shorter side), centre-cropped to ``image_size`` and scaled to [0, 1].
    ``val`` serves as the test split (as is usual for ImageNet); a seeded hold-out of
    ``train`` of size ``val_fraction`` is the validation split (empty when 0).
    """
    from torchvision import datasets, transforms

    _check_fraction("val_fraction", val_fraction)
    root = Path(root)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DatasetUnavailableError(
            f"image folder '{root}' lacks {', '.join(s + '/' for s in missing)}: expected "
            f"'{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' (the ImageNet layout)"
        )
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])
    train = datasets.ImageFolder(str(root / "train"), transform=tf)
    test = datasets.ImageFolder(str(root / "val"), transform=tf)
    if train.classes != test.classes:
        raise DatasetUnavailableError(
            f"train/ and val/ in '{root}' have different class folders: {train.classes} vs {test.classes}"
        )
    keep, held = _stratified_split(np.asarray(train.targets), val_fraction, seed)
    return DatasetSplits(Subset(train, keep.tolist()), Subset(train, held.tolist()), test, len(train.classes),
                         (3, image_size, image_size), list(train.classes), "imagefolder")


def load_image_dataset(name: str, root: str | Path = "data", download: bool = True, seed: int = 0,
                       image_size: int = 224) -> DatasetSplits:
    """Any course image dataset by name: one of ``IMAGE_DATASETS``."""
    if name == "digits":
        return load_digits_splits(seed=seed)
    if name in _TORCHVISION:
        return load_torchvision(name, root, download=download, seed=seed)
    if name == "imagefolder":
        return image_folder(root, image_size=image_size, seed=seed)
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(IMAGE_DATASETS)}")
