"""Image classification datasets.

* ``digits``: scikit-learn's 1,797 handwritten digits (8 x 8, grey levels 0-16), shipped
  inside scikit-learn, so it works offline and on Binder. The default everywhere.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: torchvision datasets, downloaded
  into ``root`` when possible; otherwise a :class:`DatasetUnavailableError` names the
  dataset, the folder and the offline alternative. Several processes started together
  (``torchrun``, ``accelerate launch``) download one at a time, not all into the same folder.
* ``imagefolder``: any ImageNet-style tree ``root/{train,val}/<class>/<image>`` (ImageNet-1k,
  ImageNet-100, CIFAR-100 or any data set saved as class folders), or TinyImageNet as
  downloaded (``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt``); unreadable image files and empty class folders are reported
  when the dataset is built, not when training first reads them.

Images are float tensors in [0, 1] (no mean/std normalisation) everywhere, with or without
training augmentation (``augment="timm"``: timm's DeiT recipe on the training split only),
unless ``normalize`` is given: ``(mean, std)``, or the name of a timm model whose pretrained
weights are to be fine-tuned (:func:`timm_normalization` reads their mean and std from timm's
pretrained config), and then every split is normalised with it (``DatasetSplits.normalization``
records it, so that a teacher reading [0, 1] images can undo it).
:class:`MixupCollate` adds timm's Mixup/CutMix as a ``collate_fn`` (soft labels ``(B, C)``,
which :func:`mux.losses.classification_loss` scores with a soft-target cross-entropy).

Splits are deterministic: the validation split is a seeded, stratified hold-out of the
training data; the test split is the dataset's own test set (digits: a seeded, stratified
hold-out, since scikit-learn ships a single set).
"""
from __future__ import annotations

import math
import os
import random
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
    "AUGMENTATIONS",
    "TIMM_AUTO_AUGMENT",
    "load_digits_splits",
    "load_torchvision",
    "image_folder",
    "load_image_dataset",
    "timm_train_transform",
    "timm_normalization",
    "MixupCollate",
    "seeded_images",
]

AUGMENTATIONS = ("none", "timm")
TIMM_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's RandAugment, kept by CaiT, ConcatPlexer and MixViT
TIMM_RE_PROB = 0.25  # DeiT's random-erasing probability


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
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) applied; None: [0, 1]

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


def _check_augment(augment: str) -> str:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {list(AUGMENTATIONS)}")
    return augment


def timm_normalization(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a timm model's pretrained weights expect, from timm's pretrained config.

    ``model``: a timm model name (``"vit_base_patch16_224"``, optionally with a ``.tag``; the model is
    built on the meta device, so nothing is downloaded or allocated) or a timm model; read through
    ``timm.data.resolve_data_config`` (its ``pretrained_cfg``). For example ``vit_base_patch16_224``
    (augreg ImageNet-21k + 1k weights): mean = std = (0.5, 0.5, 0.5); ``cait_s24_224``: ImageNet's
    (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
    """
    import timm
    from timm.data import resolve_data_config

    if isinstance(model, str):
        with torch.device("meta"):
            model = timm.create_model(model, pretrained=False)
    config = resolve_data_config({}, model=model)
    return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


def _resolve_normalize(normalize, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``normalize`` (None, ``(mean, std)`` or a timm model name) as ``(mean, std)`` for ``channels``."""
    if normalize is None:
        return None
    mean, std = timm_normalization(normalize) if isinstance(normalize, str) else normalize
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise ValueError(f"normalize: a mean and a std of one value or of one per channel ({channels}), got "
                         f"mean {mean} and std {std}")
    if not all(v > 0 for v in std):
        raise ValueError(f"normalize: every std must be > 0, got {std}")
    return mean, std


def _normalizing(transform, normalization):
    """``transform`` followed by torchvision's ``Normalize(mean, std)`` (``transform`` when None)."""
    if normalization is None:
        return transform
    from torchvision import transforms

    return transforms.Compose([transform, transforms.Normalize(*normalization)])


class _NormalizedTensors(Dataset):
    """The ``(image, label)`` items of ``dataset`` with the image normalised by ``(mean, std)``."""

    def __init__(self, dataset, normalization):
        self.dataset = dataset
        self.mean, self.std = (torch.tensor(v).view(-1, 1, 1) for v in normalization)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return (image - self.mean) / self.std, label


def timm_train_transform(image_size: int, mean: tuple[float, ...] = (0.0, 0.0, 0.0),
                         std: tuple[float, ...] = (1.0, 1.0, 1.0)):
    """timm's training transform of the DeiT recipe, giving float images in [0, 1] (by default).

    ``timm.data.create_transform(image_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1))``: a random resized crop
    (scale 0.08-1, aspect 3/4-4/3) to ``image_size``, a horizontal flip, RandAugment (9 / 0.5, as DeiT,
    CaiT, ConcatPlexer and MixViT train), conversion to a tensor and random erasing with probability
    0.25. Mean 0 and standard deviation 1 keep the [0, 1] scale of every loader of the course, which
    the evaluation transform (no normalisation) also gives: training and evaluation see the same scale.
    What that changes from DeiT, which normalises by the ImageNet mean and std: the areas RandAugment's
    rotations, shears and translations uncover, and the erased boxes (timm's ``re_mode="const"``: zeros),
    are black, not the mean colour (DeiT's erasing used per-pixel Gaussian noise in normalised units,
    which has no place in [0, 1]). A model that wants normalised inputs normalises them itself
    (as :class:`mux.models.FeatureTeacher` does).

    One repair: at the largest magnitude (10, which ``m9`` with ``mstd0.5`` reaches in about 2% of its
    draws) timm's ``PosterizeIncreasing`` keeps 0 bits, which Pillow before 13 turned into a black
    image and Pillow 13 refuses with a ValueError (in the middle of an epoch); here 0 bits give the
    black image again, as in the runs of the papers.

    ``mean`` / ``std`` other than 0 / 1 (a pretrained model's, see :func:`timm_normalization`): the
    tensor is normalised as timm normalises it, before the random erasing, so an erased box is 0 in
    normalised units (the mean colour), as in timm's own fine-tuning recipes; the evaluation
    transform then normalises with the same values.
    """
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    transform = create_transform(image_size, is_training=True, auto_augment=TIMM_AUTO_AUGMENT, re_prob=TIMM_RE_PROB,
                                 re_mode="const", interpolation="bicubic", mean=tuple(mean), std=tuple(std))
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_keeping_zero_bits
    return transform


def _posterize_keeping_zero_bits(img, bits_to_keep, **_):
    """timm's posterize, where keeping 0 bits gives a black image (Pillow < 13) rather than a ValueError."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep)


def _with_transform(dataset, transform):
    """A shallow copy of a torchvision dataset that reads its items through ``transform``.

    The copy shares the file list (or, for CIFAR, the pixel array) with ``dataset``: the training and
    the held-out split of one data set can be read with different transforms without scanning the
    folder, or holding the images, twice.
    """
    import copy

    from torchvision.datasets.vision import StandardTransform

    other = copy.copy(dataset)
    other.transform = transform
    other.transforms = StandardTransform(transform, getattr(dataset, "target_transform", None))
    return other


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


def _needs_rgb(name: str) -> ValueError:
    return ValueError(f"augment='timm' needs RGB images (timm's RandAugment and colour operations), but {name!r} "
                      "has grey images: use augment='none', or an RGB data set (cifar10, cifar100, imagefolder)")


def load_torchvision(name: str, root: str | Path = "data", download: bool = True, val_fraction: float = 0.1,
                     seed: int = 0, augment: str = "none", normalize=None) -> DatasetSplits:
    """MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 from torchvision, as tensors in [0, 1].

    With ``download=True``, processes that load the same dataset at once (``torchrun``, ``accelerate
    launch``, jobs sharing ``root``) download one at a time: the main process first where Accelerate is
    already set up, otherwise whoever holds the lock file ``root/.<name>.download.lock``; the files are
    downloaded once, the other processes find them.

    ``augment="timm"`` (CIFAR-10/100 only; MNIST and Fashion-MNIST are grey: ValueError) reads the
    training split through :func:`timm_train_transform` at the data set's own size, 32 x 32, unchanged:
    the ImageNet recipe as DeiT has it, random resized crops of 8-100% of the image included, which is a
    strong augmentation for 32-pixel images (the usual CIFAR recipe pads and crops instead); nothing
    is tuned here for small images. The validation split (held out of the same training set) and the
    test split stay unaugmented, in [0, 1] like the training images.

    ``normalize`` (``(mean, std)`` or a timm model name, see :func:`timm_normalization`): every split
    normalised with it after the conversion to a tensor (the training split inside timm's transform).
    """
    import torchvision
    from torchvision import transforms

    if name not in _TORCHVISION:
        raise ValueError(f"unknown torchvision dataset {name!r}; expected one of {sorted(_TORCHVISION)}")
    _check_fraction("val_fraction", val_fraction)
    if _check_augment(augment) == "timm" and _TORCHVISION[name][1][0] != 3:
        raise _needs_rgb(name)
    cls_name, in_shape, num_classes = _TORCHVISION[name]
    normalization = _resolve_normalize(normalize, in_shape[0])
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(root)
    tf = _normalizing(transforms.ToTensor(), normalization)
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
    train = _with_transform(full, _timm_train(in_shape[-1], normalization)) if augment == "timm" else full
    return DatasetSplits(Subset(train, keep.tolist()), Subset(full, held.tolist()), test, num_classes, in_shape,
                         names, name, normalization)


def _timm_train(image_size: int, normalization):
    """:func:`timm_train_transform`, normalised inside it when ``normalization`` is given."""
    return timm_train_transform(image_size) if normalization is None else timm_train_transform(image_size,
                                                                                               *normalization)


def _layout(root: Path) -> str:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return (f"expected '{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' (the ImageNet layout), "
            f"images ending in {', '.join(IMG_EXTENSIONS)}")


def _layouts(root: Path) -> str:
    """Both layouts that :func:`image_folder` reads, for messages about a folder that has neither."""
    return (f"expected the ImageNet layout '{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' "
            f"(ImageNet-1k, ImageNet-100, CIFAR-100 saved as class folders), or TinyImageNet as downloaded: "
            f"'{root}/train/<wnid>/images/<image>', '{root}/val/images/<image>' and '{root}/val/val_annotations.txt'")


_HOW_TO_GET = (
    "How to get them: ImageNet-1k (ILSVRC2012) must be downloaded from https://image-net.org after accepting its "
    "terms of access, its validation images then sorted into class folders (ImageNet-100 is a 100-class subset "
    "of it, in the same layout); TinyImageNet is http://cs231n.stanford.edu/tiny-imagenet-200.zip (CS231n's page): "
    "unzip it and pass the tiny-imagenet-200 folder as it is; CIFAR-100 needs no folder: dataset='cifar100' "
    "downloads it. Offline? dataset='digits' needs no download."
)


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
        loose = [] if classes else [entry.name for entry in os.scandir(path)
                                    if entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS)]
        if loose:  # e.g. ImageNet's val/ as extracted from ILSVRC2012_img_val.tar: 50,000 images, no classes
            problem = (f"'{path}' has no class folders ({len(loose)} images lie directly in it, not sorted by class: "
                       "ImageNet's validation images, as extracted from ILSVRC2012_img_val.tar, must first be moved "
                       "into one folder per class, from the labels of the ILSVRC2012 devkit; the README of "
                       "pytorch/examples' imagenet example links a script, valprep.sh, that does it)")
        elif not classes:
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
VERIFIED_CACHE = "MUX_VERIFIED_CACHE"  # environment: where the records of verified folders go (default below)


def _verified_record(paths: list[str]) -> Path:
    """The file that records that exactly these image files, with these sizes and modification times, were
    all readable: a resumed run (or a second model) then skips opening a million headers again. Its name is
    a hash of every path, size and mtime (``os.stat`` only), so any added, removed or rewritten file means
    verifying again. Kept under ``$MUX_VERIFIED_CACHE`` (default ``~/.cache/mux/verified``), not in the data
    folder, which may be read-only."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    folder = Path(os.environ.get(VERIFIED_CACHE) or Path.home() / ".cache" / "mux" / "verified")
    return folder / f"{digest.hexdigest()}.ok"


def _remember_verified(record: Path, count: int) -> None:
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{count} image files verified\n")
    except OSError:  # a read-only home: verify again next time, nothing worse
        pass
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


def _tiny_imagenet_val(root: Path, train):
    """TinyImageNet's validation set: ``val/images/*`` labelled by ``val/val_annotations.txt``.

    Each line of the annotations is ``<file>\t<wnid>\t<x>\t<y>\t<w>\t<h>`` (a bounding box, unused).
    Returns a copy of the ImageFolder ``train`` (same classes and class indices, same transform) whose
    samples are the validation images; a DatasetUnavailableError for an annotation that names an
    unknown class or a missing file.
    """
    annotations = root / "val" / "val_annotations.txt"
    samples, unknown, missing = [], set(), []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DatasetUnavailableError(
                f"line {number} of '{annotations}' is not '<file> <wnid> ...': {line!r}; TinyImageNet's "
                f"val_annotations.txt lists one validation image and its class per line (re-extract "
                f"tiny-imagenet-200.zip)"
            )
        name, wnid = fields[0].strip(), fields[1].strip()
        path = root / "val" / "images" / name
        if wnid not in train.class_to_idx:
            unknown.add(wnid)
        elif not path.is_file():
            missing.append(str(path))
        else:
            samples.append((str(path), train.class_to_idx[wnid]))
    if unknown:
        shown = ", ".join(repr(w) for w in sorted(unknown)[:5])
        raise DatasetUnavailableError(
            f"'{annotations}' labels validation images with {len(unknown)} class(es) that are not folders of "
            f"'{root / 'train'}' (first: {shown}): TinyImageNet's train/ holds one folder per wnid; re-extract "
            f"tiny-imagenet-200.zip"
        )
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise DatasetUnavailableError(
            f"{len(missing)} image file(s) listed in '{annotations}' are missing (first {min(len(missing), 5)}: "
            f"{shown}); re-extract tiny-imagenet-200.zip"
        )
    if not samples:
        raise DatasetUnavailableError(f"'{annotations}' lists no validation image; {_layouts(root)}")
    val = _with_transform(train, train.transform)
    val.root = str(root / "val")
    val.samples = val.imgs = samples
    val.targets = [target for _, target in samples]
    return val


def image_folder(root: str | Path, image_size: int = 224, val_fraction: float = 0.0, seed: int = 0,
                 verify: bool = True, augment: str = "none", normalize=None) -> DatasetSplits:
    """An ImageNet-style tree: ``root/train/<class>/*`` and ``root/val/<class>/*``; or TinyImageNet.

    Images are resized (shorter side), centre-cropped to ``image_size`` and scaled to [0, 1].
    ``val`` serves as the test split (as is usual for ImageNet); a seeded hold-out of
    ``train`` of size ``val_fraction`` is the validation split (empty when 0); it is stratified,
    so every class needs at least 2 training images when ``val_fraction > 0``.

    TinyImageNet as downloaded (``tiny-imagenet-200/``: ``train/<wnid>/images/*.JPEG``, and the
    validation images together in ``val/images/`` with their classes in ``val/val_annotations.txt``)
    is recognised by that annotation file and read as it is; its ``test/`` has no labels and is not
    used. Class folders may hold their images in subfolders (as TinyImageNet's ``<wnid>/images/``).

    ``augment="timm"``: the training split is read through :func:`timm_train_transform` (DeiT's
    recipe: random resized crop to ``image_size``, flip, RandAugment, random erasing), still in
    [0, 1]; the validation (held-out) and test splits keep the evaluation transform above, so their
    items are those of ``augment="none"``. The two training-split datasets share one file list.

    ``normalize`` (``(mean, std)`` or a timm model name, see :func:`timm_normalization`): every split
    normalised with it after the conversion to a tensor (the training split inside timm's transform).
    The evaluation crop stays the whole resized image (crop fraction 1.0, not timm's 0.9 or 0.875).

    Only files with an image extension (``.jpg``, ``.jpeg``, ``.png``, ``.ppm``, ``.bmp``, ``.pgm``,
    ``.tif``, ``.tiff``, ``.webp``) are images; other files are skipped, as torchvision's
    ``ImageFolder`` does. With ``verify=True`` (default) every image file is opened with PIL and its
    header checked when the dataset is built (a thread pool; a progress bar from 10,000 files on), so
    a broken file fails here rather than in the middle of training; a file cut short after a valid
    header can still pass. ``verify=False`` skips the check, for a very large folder you trust. A folder
    found readable is remembered (by every file's path, size and mtime: :func:`_verified_record`), so loading
    it again, as a resumed run does, only stats the files.
    A missing folder, a class folder without images, or a layout that is neither of the two above
    raises a :class:`DatasetUnavailableError` that names the folder, the layouts and how to get the data.
    """
    from torchvision import transforms

    _check_fraction("val_fraction", val_fraction)
    _check_augment(augment)
    if not image_size >= 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    root = Path(root)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        where = " (no such folder)" if not root.exists() else " (not a folder)" if not root.is_dir() else ""
        raise DatasetUnavailableError(
            f"image folder '{root}' lacks {', '.join(s + '/' for s in missing)}{where}: {_layouts(root)}. "
            f"{_HOW_TO_GET}"
        )
    normalization = _resolve_normalize(normalize, 3)
    tf = _normalizing(transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                          transforms.ToTensor()]), normalization)
    train = _class_folders(root / "train", tf, root)
    if (root / "val" / "val_annotations.txt").is_file():
        test = _tiny_imagenet_val(root, train)
    else:
        if (root / "val" / "images").is_dir() and "images" not in train.classes:
            raise DatasetUnavailableError(
                f"'{root}' looks like TinyImageNet (its validation images in val/images/) but "
                f"'{root / 'val' / 'val_annotations.txt'}', which gives their classes, is missing: re-extract "
                f"tiny-imagenet-200.zip; {_layouts(root)}"
            )
        test = _class_folders(root / "val", tf, root)
        if train.classes != test.classes:
            raise DatasetUnavailableError(
                f"train/ and val/ in '{root}' have different class folders: {train.classes} vs {test.classes}"
            )
    keep, held = _stratified_split(np.asarray(train.targets), val_fraction, seed, train.classes)
    paths = [path for path, _ in train.samples + test.samples] if verify else []
    record = _verified_record(paths) if verify else None
    if verify and not record.is_file():
        bad = _unreadable_images(paths, root)
        if not bad:
            _remember_verified(record, len(paths))
        if bad:
            shown = ", ".join(f"'{path}' ({why})" for path, why in bad[:5])
            raise DatasetUnavailableError(
                f"{len(bad)} of {len(paths)} image files in '{root}' are not readable images (first "
                f"{min(len(bad), 5)}: {shown}). Remove or replace them (re-copy or re-extract the data); "
                f"pass verify=False to skip this check for a large folder you trust."
            )
    augmented = _with_transform(train, _timm_train(image_size, normalization)) if augment == "timm" else train
    return DatasetSplits(Subset(augmented, keep.tolist()), Subset(train, held.tolist()), test, len(train.classes),
                         (3, image_size, image_size), list(train.classes), "imagefolder", normalization)


def load_image_dataset(name: str, root: str | Path = "data", download: bool = True, seed: int = 0,
                       image_size: int = 224, verify: bool = True, augment: str = "none",
                       normalize=None) -> DatasetSplits:
    """Any course image dataset by name: one of ``IMAGE_DATASETS``.

    ``verify`` applies to ``imagefolder`` only (see :func:`image_folder`); ``download`` to the torchvision ones.
    ``augment``: ``"none"`` or ``"timm"`` (training split only, RGB data sets: ``cifar10``, ``cifar100``,
    ``imagefolder``; see :func:`image_folder` and :func:`load_torchvision`); ``digits``, ``mnist`` and
    ``fashion_mnist`` are grey and refuse ``"timm"``.
    ``normalize``: None (images in [0, 1]), ``(mean, std)``, or a timm model name whose pretrained
    config gives them (:func:`timm_normalization`): every split normalised, recorded in the result's
    ``normalization``. Pass it when fine-tuning pretrained weights, which were trained on normalised
    images; a grey data set takes one value (or one per channel) only.
    """
    _check_augment(augment)
    if name == "digits":
        if augment == "timm":
            raise _needs_rgb(name)
        splits = load_digits_splits(seed=seed)
        normalization = _resolve_normalize(normalize, splits.in_shape[0])
        if normalization is None:
            return splits
        return DatasetSplits(*(_NormalizedTensors(s, normalization) for s in (splits.train, splits.val, splits.test)),
                             splits.num_classes, splits.in_shape, splits.class_names, splits.name, normalization)
    if name in _TORCHVISION:
        return load_torchvision(name, root, download=download, seed=seed, augment=augment, normalize=normalize)
    if name == "imagefolder":
        return image_folder(root, image_size=image_size, seed=seed, verify=verify, augment=augment,
                            normalize=normalize)
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(IMAGE_DATASETS)}")


def seeded_images(dataset: Dataset, seed: int, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``limit`` images of ``dataset`` (all when None) as one ``(M, C, H, W)`` tensor, with
    their ``(M,)`` integer labels, any random transforms drawn from ``seed``.

    A training split with ``augment="timm"`` returns another random view of an image at every read.
    A model fitted to such a read (the chapters' logistic-regression floors) must see the same views
    on every run and on a resume, so Python's, NumPy's and torch's generators are seeded for the read
    and then put back as they were, so that the trainings after it draw what they would have drawn.
    """
    size = len(dataset) if limit is None else min(len(dataset), limit)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
            items = [dataset[i] for i in range(size)]
    finally:
        random.setstate(python_state), np.random.set_state(numpy_state)
    return torch.stack([x for x, _ in items]), np.array([int(y) for _, y in items])


class MixupCollate:
    """A ``collate_fn`` for a DataLoader: default collation, then timm's Mixup / CutMix on the batch.

    ``MixupCollate(num_classes)(examples)``: ``examples`` is a list of ``(image (C, H, W), label int)``;
    returns ``(images (B, C, H, W), soft_labels (B, num_classes) float32)``, each row summing to 1.
    The defaults are DeiT's (kept by CaiT, ConcatPlexer and MixViT): ``timm.data.Mixup(mixup_alpha=0.8,
    cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1)``: one draw per
    batch chooses Mixup (lambda ~ Beta(0.8, 0.8)) or CutMix (a box of area 1 - lambda, lambda ~
    Beta(1, 1), lambda corrected to the box's area after clipping), and every image is mixed with its
    mirror in the batch (image i with image B - 1 - i, timm's ``x.flip(0)``); the labels are mixed with
    the same weights after label smoothing. :func:`mux.losses.classification_loss` scores such labels
    with a soft-target cross-entropy. Pass it as ``mux.train(..., collate_fn=MixupCollate(C))``;
    evaluation loaders keep the default collation (integer labels).

    Multiplexing. ``mux.train`` groups a batch of ``B`` instances into ``B / N`` tuples of N consecutive
    instances after collation; Mixup mixes instances across the whole batch (instance i with instance
    B - 1 - i, generally in another tuple), before grouping. So each multiplexed instance is an ordinary
    Mixup/CutMix image with its own soft label, exactly as without multiplexing; nothing is mixed
    within a tuple on purpose (ConcatPlexer's own tuple smoothing, :class:`mux.losses.ConcatPlexerLoss`,
    does that, and combines with this one). MixViT's :class:`mux.losses.MultiInputLoss` accepts these
    soft labels too, as the MixViT paper trains (Mixup / CutMix of the images, then the model's own
    mixing of them): each of its M inputs is then a Mixup image, and each subnetwork's cross-entropy
    is taken against its own input's soft label.

    Odd batches. timm pairs image i with image B - 1 - i and needs an even batch. ``mux.train`` keeps
    the last, partial batch of an epoch, which is odd for ImageNet's 1,281,167 training images at any
    even batch size; so an odd batch is mixed in its first B - 1 images, and its last image stays
    unmixed with its label smoothed as timm smooths labels (one image in an epoch).

    Reproducible and resumable. timm draws from NumPy's global RNG. This collate gives it, for each
    batch, a private RNG seeded from ``seed`` and the batch itself (its labels and a fixed sample of
    its pixels, hashed), and puts NumPy's global state back afterwards: the mixing of a batch is a
    function of ``(seed, batch)`` alone. So it does not depend on which DataLoader worker collates the
    batch, on Accelerate reading one batch ahead, or on where a run was resumed, and it leaves the
    global RNGs of the training run (which ``mux.train`` seeds, and saves with every checkpoint through
    ``Accelerator.save_state``: Python's, NumPy's and torch's) untouched. A run that sees the same
    batches therefore mixes them the same way, a resumed one included: with ``augment="none"`` the
    batches are fixed by ``mux.train``'s seeded order, so a resumed run is exact; with
    ``augment="timm"`` the images themselves are as reproducible as timm's transforms are (they draw
    from the global RNGs of the process that reads the images). Two batches with the same labels and
    pixels get the same mixing; a different ``seed`` gives different mixings of the same batches.
    Picklable: DataLoader workers get a copy, which holds no state that changes.
    """

    _PIXELS_HASHED = 4096  # pixels per batch, evenly spaced, that go into the batch's seed

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 label_smoothing: float = 0.1, prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0):
        from timm.data import Mixup

        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
        for name, value in (("label_smoothing", label_smoothing), ("prob", prob), ("switch_prob", switch_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.label_smoothing, self.prob, self.switch_prob = float(label_smoothing), float(prob), float(switch_prob)
        self.mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.prob,
                           switch_prob=self.switch_prob, mode="batch", label_smoothing=self.label_smoothing,
                           num_classes=self.num_classes)

    def _batch_seed(self, images: torch.Tensor, labels: torch.Tensor) -> np.random.SeedSequence:
        import hashlib

        flat = images.detach().reshape(-1)
        step = max(1, flat.numel() // self._PIXELS_HASHED)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((tuple(images.shape), str(images.dtype))).encode())
        digest.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        digest.update(flat[::step].cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
        return np.random.SeedSequence([self.seed, int.from_bytes(digest.digest(), "little")])

    def __call__(self, examples):
        from torch.utils.data import default_collate

        images, labels = default_collate(examples)
        if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"MixupCollate mixes float images (C, H, W): the dataset must yield (image, label) "
                             f"pairs of such images, got a batch of {getattr(images, 'shape', type(images))} "
                             f"{getattr(images, 'dtype', '')}")
        b = images.shape[0]
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.shape != (b,):
            raise ValueError(f"MixupCollate needs one integer class label per image, got labels of shape "
                             f"{tuple(labels.shape)} and dtype {labels.dtype}")
        if b and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}: is num_classes the data set's?")
        even = b - b % 2  # an odd batch's last image is left unmixed (see the class docstring)
        off = self.label_smoothing / self.num_classes
        soft = torch.full((b, self.num_classes), off)
        soft[torch.arange(b), labels] = 1.0 - self.label_smoothing + off
        if even:
            private = np.random.RandomState(np.random.MT19937(self._batch_seed(images[:even], labels[:even])))
            saved = np.random.get_state()
            np.random.set_state(private.get_state())
            try:
                mixed, mixed_soft = self.mixup(images[:even].clone(), labels[:even])
            finally:
                np.random.set_state(saved)
            images = torch.cat([mixed, images[even:]]) if even < b else mixed
            soft[:even] = mixed_soft.float().cpu()
        return images, soft.float()

    def __repr__(self) -> str:
        return (f"MixupCollate(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, label_smoothing={self.label_smoothing}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, seed={self.seed})")
