import struct

import numpy as np
import pytest
import torch
from PIL import Image

from data_utils import (
    IMAGE_DATASETS,
    DatasetUnavailableError,
    image_folder,
    load_digits_splits,
    load_image_dataset,
    load_torchvision,
)


def test_digits_splits_are_deterministic_disjoint_and_complete():
    a, b = load_digits_splits(seed=0), load_digits_splits(seed=0)
    assert a.sizes() == {"train": 1257, "val": 180, "test": 360}
    assert sum(a.sizes().values()) == 1797
    for part in ("train", "val", "test"):
        torch.testing.assert_close(getattr(a, part).tensors[0], getattr(b, part).tensors[0])
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and 0 <= x.min() and x.max() <= 1 and 0 <= int(y) < 10
    # every class appears in every split (stratified)
    for part in ("train", "val", "test"):
        assert set(getattr(a, part).tensors[1].tolist()) == set(range(10))
    # a different seed gives a different split
    c = load_digits_splits(seed=1)
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])


def test_digits_bad_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_splits(val_fraction=1.5)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_splits(test_fraction=0)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'imagenette'; expected one of"):
        load_image_dataset("imagenette")
    with pytest.raises(ValueError, match="unknown torchvision dataset"):
        load_torchvision("svhn")
    assert "digits" in IMAGE_DATASETS


def _write_idx(path, array):
    """Write an MNIST-style IDX file (gzip not needed: torchvision reads the raw files)."""
    dims = array.shape
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_loader_reads_local_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 50), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    splits = load_torchvision(name, tmp_path, download=False, val_fraction=0.2)
    assert splits.sizes() == {"train": 40, "val": 10, "test": 20}
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert splits.in_shape == (1, 28, 28) and splits.num_classes == 10


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_missing_torchvision_data_names_dataset_folder_and_alternative(tmp_path, name):
    with pytest.raises(DatasetUnavailableError) as err:
        load_torchvision(name, tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert repr(name) in msg and "nowhere" in msg and "dataset='digits'" in msg


def _make_tree(root, classes=("cat", "dog"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size + 4, 3)).astype(np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def test_image_folder_loads_imagenet_layout(tmp_path):
    _make_tree(tmp_path)
    splits = image_folder(tmp_path, image_size=16)
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert splits.sizes() == {"train": 6, "val": 0, "test": 6}
    x, y = splits.test[0]
    assert x.shape == (3, 16, 16)
    held = image_folder(tmp_path, image_size=16, val_fraction=0.3)
    assert held.sizes()["val"] == 2 and held.sizes()["train"] == 4
    via_name = load_image_dataset("imagefolder", tmp_path, image_size=16)
    assert via_name.sizes() == splits.sizes()


def test_image_folder_missing_parts(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="lacks train/, val/"):
        image_folder(tmp_path / "missing")
    _make_tree(tmp_path / "a", classes=("x",))
    (tmp_path / "a" / "train" / "y").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "train" / "y" / "0.png")
    with pytest.raises(DatasetUnavailableError, match="different class folders"):
        image_folder(tmp_path / "a")
