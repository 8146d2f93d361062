"""Image classification datasets.

* ``digits``: scikit-learn's 1,797 handwritten digits (8 x 8, grey levels 0-16), shipped
  inside scikit-learn, so it works offline and on Binder. The default everywhere.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: torchvision datasets, downloaded
  into ``root`` when possible; otherwise a :class:`DatasetUnavailableError` names the
  dataset, the folder and the offline alternative. Several processes started together
  (``torchrun``, ``accelerate launch``) download one at a time, not all into the same folder.
* ``imagefolder``: any ImageNet-style tree ``root/{train,val}/<class>/<image>``; unreadable
  image files and empty class folders are reported when the dataset is built, not when
  training first reads them.

Splits are deterministic: the validation split is a seeded, stratified hold-out of the
training data; the test split is the dataset's own test set (digits: a seeded, stratified
hold-out, since scikit-learn ships a single set).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
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


def _stratified_split(labels: np.ndarray, fraction: float, seed: int, class_names=None,
                      what: str = "val_fraction", shown: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): a seeded hold-out of ``fraction`` with every class in the same proportion.

    Raises a ValueError, naming the argument ``what`` (given as ``shown``, default ``fraction``) and the
    classes by ``class_names``, where the data cannot be split so: a class with a single example, fewer
    held-out or kept examples than classes, or a class whose examples would all be held out.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    shown = fraction if shown is None else shown
    classes, counts = np.unique(labels, return_counts=True)

    def named(which) -> str:
        return ", ".join(repr(str(class_names[c]) if class_names is not None else str(c)) for c in which)

    single = classes[counts < 2]
    if len(single):
        raise ValueError(
            f"{what}={shown} asks for a stratified hold-out, which needs at least 2 examples of every class, but "
            f"class(es) {named(single)} have only 1 example: add examples of them, or pass {what}=0 (no hold-out)"
        )
    n_held = math.ceil(fraction * len(labels))  # as scikit-learn rounds it
    n_keep = len(labels) - n_held
    if min(n_held, n_keep) < len(classes):
        raise ValueError(
            f"{what}={shown} holds out {n_held} and keeps {n_keep} of {len(labels)} examples, but a stratified "
            f"hold-out needs at least one example of each of the {len(classes)} classes on both sides: choose a "
            f"{what} that holds out and keeps at least {len(classes)} examples each"
        )
    keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    left_out = np.setdiff1d(classes, labels[keep])
    if len(left_out):  # possible for a small class beside large ones when the fraction is large
        raise ValueError(
            f"{what}={shown} leaves class(es) {named(left_out)} with no training example (all of theirs are held "
            f"out): choose a smaller {what}, or add examples of them"
        )
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
    if not val_fraction + test_fraction < 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (the rest is the training split), got "
                         f"{val_fraction} + {test_fraction}")
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    rest, test = _stratified_split(bunch.target, test_fraction, seed, what="test_fraction")
    tr, va = _stratified_split(bunch.target[rest], val_fraction / (1 - test_fraction), seed, shown=val_fraction)
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


@contextmanager
def _one_download_at_a_time(root: Path, name: str, download: bool):
    """Lets one process at a time download dataset ``name`` into ``root`` (nothing to do without a download).

    Under ``torchrun`` or ``accelerate launch`` every process calls the loader at once. Where Accelerate is
    already set up (an ``Accelerator`` or ``PartialState`` exists), ``PartialState().main_process_first()``
    lets the main process download first; the others then find the files and download nothing. Otherwise a
    lock file in ``root`` takes the processes (or separate jobs sharing the folder) one at a time; where no
    lock file can be made (a read-only folder, the data already in it), nothing could be downloaded there
    anyway and every process goes ahead. The loader must not set Accelerate up itself: its first
    ``PartialState()`` fixes the device and backend for the whole program, so a later ``Accelerator(cpu=True)``
    would keep a GPU, and processes started by torchrun on CPUs would each train alone.
    """
    if not download:
        yield
        return
    from accelerate import PartialState

    if PartialState._shared_state:  # set up already (how Accelerate itself checks; PartialState() would set it up)
        with PartialState().main_process_first():
            yield
        return
    from filelock import FileLock  # a dependency of torch

    lock = FileLock(str(root / f".{name}.download.lock"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError:  # cannot write into root: the loader then fails, or reads files that are there
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def load_torchvision(name: str, root: str | Path = "data", download: bool = True, val_fraction: float = 0.1,
                     seed: int = 0) -> DatasetSplits:
    """MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 from torchvision, as tensors in [0, 1].

    With ``download=True``, processes that load the same dataset at once (``torchrun``, ``accelerate
    launch``, jobs sharing ``root``) download one at a time: the main process first where Accelerate is
    already set up, otherwise whoever holds the lock file ``root/.<name>.download.lock``; the files are
    downloaded once, the other processes find them.
    """
    import torchvision
    from torchvision import transforms

    if name not in _TORCHVISION:
        raise ValueError(f"unknown torchvision dataset {name!r}; expected one of {sorted(_TORCHVISION)}")
    _check_fraction("val_fraction", val_fraction)
    cls_name, in_shape, num_classes = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(root)
    tf = transforms.ToTensor()
    failure = None
    with _one_download_at_a_time(root, name, download):
        try:
            full = cls(str(root), train=True, download=download, transform=tf)
            test = cls(str(root), train=False, download=download, transform=tf)
        except (RuntimeError, OSError, ValueError) as err:  # URLError is an OSError
            failure = err  # raised below, once this process has ended its turn: the others may wait on it
    if failure is not None:
        how = "download failed" if download else "not found and download=False"
        raise DatasetUnavailableError(
            f"dataset {name!r} is not available in folder '{root}' ({how}: {failure}). "
            f"Offline? Use dataset='digits' (scikit-learn's digits, bundled, no download), or put the "
            f"{cls_name} files into '{root}' on a machine with internet access first."
        ) from failure
    names = list(getattr(full, "classes", [str(i) for i in range(num_classes)]))
    keep, held = _stratified_split(_targets(full), val_fraction, seed, names)
    return DatasetSplits(Subset(full, keep.tolist()), Subset(full, held.tolist()), test, num_classes, in_shape,
                         names, name)


def _layout(root: Path) -> str:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return (f"expected '{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' (the ImageNet layout), "
            f"images ending in {', '.join(IMG_EXTENSIONS)}")


def _class_folders(path: Path, transform, root: Path):
    """torchvision's ImageFolder of ``path``; a DatasetUnavailableError naming empty class folders."""
    from torchvision import datasets
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        empty = [path / c for c in classes
                 if not any(has_file_allowed_extension(f, IMG_EXTENSIONS)
                            for _, _, files in os.walk(path / c, followlinks=True) for f in files)]
        if not classes:
            problem = f"'{path}' has no class folders"
        elif empty:
            problem = f"class folder(s) without images: {', '.join(repr(str(e)) for e in empty)}"
        else:
            problem = f"'{path}' cannot be read as class folders ({err})"
        raise DatasetUnavailableError(
            f"{problem}; {_layout(root)}. Put images into every class folder, or remove a class from both "
            f"train/ and val/."
        ) from err


_VERIFY_CHUNK = 256  # files per task of the thread pool
_VERIFY_BAR_FROM = 10_000  # show a progress bar from this many files on


def _unreadable_images(paths: list[str], root: Path) -> list[tuple[str, str]]:
    """(path, reason) for each file PIL cannot open, reading headers only, in a pool of threads."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm.auto import tqdm

    def check(chunk: list[str]) -> list[tuple[str, str]]:
        bad = []
        for path in chunk:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...)
                bad.append((path, type(err).__name__))
        return bad

    chunks = [paths[i:i + _VERIFY_CHUNK] for i in range(0, len(paths), _VERIFY_CHUNK)]
    bad = []
    with ThreadPoolExecutor() as pool, tqdm(total=len(paths), desc=f"checking images in {root}", unit="file",
                                            disable=len(paths) < _VERIFY_BAR_FROM, leave=False) as bar:
        for chunk, found in zip(chunks, pool.map(check, chunks)):
            bad.extend(found)
            bar.update(len(chunk))
    return bad


def image_folder(root: str | Path, image_size: int = 224, val_fraction: float = 0.0, seed: int = 0,
                 verify: bool = True) -> DatasetSplits:
    """An ImageNet-style tree: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Images are resized (shorter side), centre-cropped to ``image_size`` and scaled to [0, 1].
    ``val`` serves as the test split (as is usual for ImageNet); a seeded hold-out of
    ``train`` of size ``val_fraction`` is the validation split (empty when 0); it is stratified,
    so every class needs at least 2 training images when ``val_fraction > 0``.

    Only files with an image extension (``.jpg``, ``.jpeg``, ``.png``, ``.ppm``, ``.bmp``, ``.pgm``,
    ``.tif``, ``.tiff``, ``.webp``) are images; other files are skipped, as torchvision's
    ``ImageFolder`` does. With ``verify=True`` (default) every image file is opened with PIL and its
    header checked when the dataset is built (a thread pool; a progress bar from 10,000 files on), so
    a broken file fails here rather than in the middle of training; a file cut short after a valid
    header can still pass. ``verify=False`` skips the check, for a very large folder you trust.
    A class folder without images raises a :class:`DatasetUnavailableError`.
    """
    from torchvision import transforms

    _check_fraction("val_fraction", val_fraction)
    if not image_size >= 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    root = Path(root)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DatasetUnavailableError(
            f"image folder '{root}' lacks {', '.join(s + '/' for s in missing)}: expected "
            f"'{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' (the ImageNet layout)"
        )
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])
    train = _class_folders(root / "train", tf, root)
    test = _class_folders(root / "val", tf, root)
    if train.classes != test.classes:
        raise DatasetUnavailableError(
            f"train/ and val/ in '{root}' have different class folders: {train.classes} vs {test.classes}"
        )
    keep, held = _stratified_split(np.asarray(train.targets), val_fraction, seed, train.classes)
    if verify:
        paths = [path for path, _ in train.samples + test.samples]
        bad = _unreadable_images(paths, root)
        if bad:
            shown = ", ".join(f"'{path}' ({why})" for path, why in bad[:5])
            raise DatasetUnavailableError(
                f"{len(bad)} of {len(paths)} image files in '{root}' are not readable images (first "
                f"{min(len(bad), 5)}: {shown}). Remove or replace them (re-copy or re-extract the data); "
                f"pass verify=False to skip this check for a large folder you trust."
            )
    return DatasetSplits(Subset(train, keep.tolist()), Subset(train, held.tolist()), test, len(train.classes),
                         (3, image_size, image_size), list(train.classes), "imagefolder")


def load_image_dataset(name: str, root: str | Path = "data", download: bool = True, seed: int = 0,
                       image_size: int = 224, verify: bool = True) -> DatasetSplits:
    """Any course image dataset by name: one of ``IMAGE_DATASETS``.

    ``verify`` applies to ``imagefolder`` only (see :func:`image_folder`); ``download`` to the torchvision ones.
    """
    if name == "digits":
        return load_digits_splits(seed=seed)
    if name in _TORCHVISION:
        return load_torchvision(name, root, download=download, seed=seed)
    if name == "imagefolder":
        return image_folder(root, image_size=image_size, seed=seed, verify=verify)
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(IMAGE_DATASETS)}")
