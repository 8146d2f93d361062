import struct
from pathlib import Path

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


# --- torchvision downloads under several processes (no internet needed: the dataset class is faked) ---

def _fake_mnist(monkeypatch, calls, targets=tuple(range(10)) * 10, fail=None, during=None):
    """Replace torchvision's MNIST with a tiny in-memory one that records how it was called."""
    import torchvision

    class FakeMNIST(torch.utils.data.Dataset):
        classes = [str(i) for i in range(10)]

        def __init__(self, root, train=True, download=False, transform=None):
            calls.append(("MNIST", "train" if train else "test", f"download={download}"))
            if fail is not None:
                raise fail
            if during is not None:
                during(root)
            self.targets = torch.tensor(targets if train else list(range(10)))
            self.data = torch.zeros(len(self.targets), 1, 28, 28)

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.data[i], int(self.targets[i])

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)


def _fake_accelerate(monkeypatch, calls, set_up):
    """Replace Accelerate's PartialState with one that records use; ``set_up``: as if an Accelerator exists."""
    import contextlib

    import accelerate

    class FakeState:
        _shared_state = {"distributed_type": "MULTI_GPU"} if set_up else {}

        def __init__(self, *args, **kwargs):
            calls.append("PartialState()")

        @contextlib.contextmanager
        def main_process_first(self):
            calls.append("main process first: enter")
            yield  # an exception in the body is thrown here, so 'exit' is then not recorded
            calls.append("main process first: exit")

    monkeypatch.setattr(accelerate, "PartialState", FakeState)


def test_torchvision_download_lets_the_main_process_go_first(tmp_path, monkeypatch):
    calls = []
    _fake_accelerate(monkeypatch, calls, set_up=True)
    _fake_mnist(monkeypatch, calls)
    splits = load_torchvision("mnist", tmp_path, val_fraction=0.2)
    assert splits.sizes() == {"train": 80, "val": 20, "test": 10}
    assert calls == ["PartialState()", "main process first: enter", ("MNIST", "train", "download=True"),
                     ("MNIST", "test", "download=True"), "main process first: exit"]
    # a failed download on the main process still ends its turn (the others would otherwise wait forever)
    calls.clear()
    _fake_mnist(monkeypatch, calls, fail=RuntimeError("no internet"))
    with pytest.raises(DatasetUnavailableError, match="no internet"):
        load_torchvision("mnist", tmp_path)
    assert calls[-1] == "main process first: exit"
    # reading files already there needs no turn
    calls.clear()
    _fake_mnist(monkeypatch, calls)
    load_torchvision("mnist", tmp_path, download=False)
    assert calls == [("MNIST", "train", "download=False"), ("MNIST", "test", "download=False")]


def test_torchvision_download_without_accelerate_takes_a_file_lock_and_leaves_accelerate_alone(tmp_path, monkeypatch):
    from filelock import FileLock, Timeout

    def lock_is_held(root):
        locks = list(Path(root).glob(".*lock"))
        assert len(locks) == 1, f"expected one lock file in {root}, found {locks}"
        with pytest.raises(Timeout):  # another process (here: another open of the file) cannot take it
            FileLock(str(locks[0]), timeout=0).acquire()
        calls.append("lock held")

    calls = []
    _fake_accelerate(monkeypatch, calls, set_up=False)
    _fake_mnist(monkeypatch, calls, during=lock_is_held)
    load_torchvision("mnist", tmp_path / "data")
    # the loader must not be the one to set up Accelerate: that would fix the device and backend for the
    # training that follows (a later Accelerator(cpu=True) keeps them; torchrun processes would not see each other)
    assert "PartialState()" not in calls
    assert calls == [("MNIST", "train", "download=True"), "lock held", ("MNIST", "test", "download=True"), "lock held"]
    # a folder where no lock file can be made (read-only, data already there) is read as before, without a lock
    import filelock

    class ReadOnlyFolderLock:
        def __init__(self, path, *args, **kwargs):
            self.path = path

        def acquire(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", self.path)

        def release(self, *args, **kwargs):
            raise AssertionError("released a lock that was never taken")

    monkeypatch.setattr(filelock, "FileLock", ReadOnlyFolderLock)
    calls.clear()
    _fake_mnist(monkeypatch, calls)
    assert load_torchvision("mnist", tmp_path / "data").sizes()["test"] == 10
    assert calls == [("MNIST", "train", "download=True"), ("MNIST", "test", "download=True")]


def test_stratified_hold_out_keeps_every_class_in_training(tmp_path, monkeypatch):
    calls = []
    _fake_mnist(monkeypatch, calls, targets=[0] * 2 + [1] * 100)
    # 90% held out, stratified: both examples of class 0 would land in val and training would never see it
    with pytest.raises(ValueError, match=r"val_fraction=0.9 leaves class\(es\) '0' with no training example"):
        load_torchvision("mnist", tmp_path, download=False, val_fraction=0.9)
    splits = load_torchvision("mnist", tmp_path, download=False, val_fraction=0.5)
    assert splits.sizes()["val"] == 51
    _fake_mnist(monkeypatch, calls, targets=[0] * 3 + [1] * 3)
    # 10% of 6 is one example: too few to hold out one of each of the 2 classes
    with pytest.raises(ValueError, match="val_fraction=0.1 holds out 1 and keeps 5 of 6 examples.*2 classes"):
        load_torchvision("mnist", tmp_path, download=False, val_fraction=0.1)


def test_digits_fractions_must_leave_a_training_split():
    for val, test in ((0.8, 0.2), (0.5, 0.6)):
        with pytest.raises(ValueError, match=rf"val_fraction \+ test_fraction must be < 1.*{val} \+ {test}"):
            load_digits_splits(val_fraction=val, test_fraction=test)
    with pytest.raises(ValueError, match="test_fraction=0.001 holds out 2 and keeps 1795 of 1797"):
        load_digits_splits(test_fraction=0.001)


# --- image folders: bad files and layouts fail when the dataset is built, not in the middle of training ---

def test_image_folder_rejects_unreadable_image_files(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, and not named like one: skipped")
    for i in range(6):
        (tmp_path / "train" / "dog" / f"broken{i}.jpg").write_text("a text file named like an image")
    good = (tmp_path / "val" / "cat" / "0.png").read_bytes()
    (tmp_path / "val" / "cat" / "truncated.png").write_bytes(good[:60])
    with pytest.raises(DatasetUnavailableError) as err:
        image_folder(tmp_path, image_size=16)
    msg = str(err.value)
    assert "7 of 19 image files" in msg and "verify=False" in msg and "notes.txt" not in msg
    # 6 text files and the cut-short PNG (counted: 7); the first 5 are named, in the order found
    assert msg.count("broken") == 5 and "broken5.jpg" not in msg
    with pytest.raises(DatasetUnavailableError, match="7 of 19 image files"):
        load_image_dataset("imagefolder", tmp_path, image_size=16)
    # verify=False skips the check: the bad files then fail only when read
    unchecked = load_image_dataset("imagefolder", tmp_path, image_size=16, verify=False)
    assert unchecked.sizes() == {"train": 12, "val": 0, "test": 7}
    assert image_folder(tmp_path, image_size=16, verify=False).sizes() == unchecked.sizes()


def test_a_folder_found_readable_is_not_opened_again_until_a_file_changes(tmp_path, monkeypatch):
    import data_utils.images as images

    _make_tree(tmp_path / "data")
    monkeypatch.setenv(images.VERIFIED_CACHE, str(tmp_path / "cache"))
    opened = []
    real = images._unreadable_images
    monkeypatch.setattr(images, "_unreadable_images", lambda paths, root: opened.append(len(paths)) or real(paths, root))
    first = image_folder(tmp_path / "data", image_size=16)
    second = image_folder(tmp_path / "data", image_size=16)
    assert opened == [first.sizes()["train"] + first.sizes()["val"] + first.sizes()["test"]]
    assert second.sizes() == first.sizes() and len(list((tmp_path / "cache").glob("*.ok"))) == 1
    victim = tmp_path / "data" / "val" / "cat" / "0.png"
    victim.write_bytes(victim.read_bytes()[:60])  # rewritten, cut short: checked again, and refused
    with pytest.raises(DatasetUnavailableError, match="1 of"):
        image_folder(tmp_path / "data", image_size=16)
    assert len(opened) == 2


def test_image_folder_empty_class_folders(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "readme.txt").write_text("no image here")
    (tmp_path / "val" / "bird").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(DatasetUnavailableError) as err:
        image_folder(tmp_path, image_size=16)
    msg = str(err.value)
    assert msg.startswith(f"class folder(s) without images: '{tmp_path / 'train' / 'bird'}';")
    assert "train/<class>/<image>" in msg and ".png" in msg
    (tmp_path / "x" / "train").mkdir(parents=True)
    (tmp_path / "x" / "val").mkdir()
    with pytest.raises(DatasetUnavailableError, match="has no class folders"):
        image_folder(tmp_path / "x")


def test_image_folder_class_too_small_for_a_hold_out(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "train" / "owl").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "owl" / "0.png")
    (tmp_path / "val" / "owl").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "val" / "owl" / "0.png")
    with pytest.raises(ValueError, match=r"class\(es\) 'owl' have only 1 example.*val_fraction=0"):
        image_folder(tmp_path, image_size=16, val_fraction=0.3)
    assert image_folder(tmp_path, image_size=16).sizes() == {"train": 7, "val": 0, "test": 7}


def test_image_folder_bad_image_size(tmp_path):
    _make_tree(tmp_path)
    for size in (0, -8):
        with pytest.raises(ValueError, match=f"image_size must be a positive number of pixels, got {size}"):
            image_folder(tmp_path, image_size=size)


class _RandomView(torch.utils.data.Dataset):
    """An augmented split in miniature: every read draws noise from torch, NumPy and Python's random."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        import random

        noise = torch.rand(1, 2, 2) + float(np.random.rand()) + random.random()
        return noise + i, i % 3


def test_seeded_images_draws_the_same_views_and_leaves_the_generators_as_they_were():
    import random

    from data_utils import seeded_images

    ds = _RandomView()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(3), np.random.rand(), random.random())  # what the code after the read would draw
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    x, y = seeded_images(ds, seed=3)
    after = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    again, labels = seeded_images(ds, seed=3, limit=4)
    assert x.shape == (6, 1, 2, 2) and y.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(again, x[:4]) and labels.tolist() == [0, 1, 2, 0]
    assert not torch.equal(seeded_images(ds, seed=4)[0], x)  # another seed, other views
