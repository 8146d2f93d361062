"""Image data at full scale: timm augmentation, TinyImageNet's layout, missing data, Mixup/CutMix and soft targets.

Every test writes its own tiny image folders (3 classes x 4 images of 20 x 20): nothing is downloaded.
"""
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

import mux
from data_utils import (
    DatasetUnavailableError,
    MixupCollate,
    image_folder,
    load_digits_splits,
    load_image_dataset,
    load_torchvision,
)
from mux.losses import ConcatPlexerLoss, MultiInputLoss, classification_loss, cross_entropy_and_accuracy

CLASSES = ("n01", "n02", "n03")
SIZE = 20


def _image(rng, size=SIZE):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))


def _imagenet_tree(root, per_class=4):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                _image(rng).save(root / split / c / f"{i}.png")
    return root


def _tiny_imagenet_tree(root, per_class=4):
    """TinyImageNet as downloaded: train/<wnid>/images/, val/images/ + val/val_annotations.txt, test/images/."""
    rng = np.random.default_rng(1)
    for c in CLASSES:
        (root / "train" / c / "images").mkdir(parents=True)
        (root / "train" / c / f"{c}_boxes.txt").write_text("".join(f"{c}_{i}.JPEG\t0\t0\t9\t9\n"
                                                                   for i in range(per_class)))
        for i in range(per_class):
            _image(rng).save(root / "train" / c / "images" / f"{c}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(7):  # classes in an order unlike the sorted one: n02, n03, n01, n02, ...
        wnid = CLASSES[(i + 1) % 3]
        _image(rng).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t9\t9")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    _image(rng).save(root / "test" / "images" / "test_0.JPEG")
    (root / "wnids.txt").write_text("\n".join(CLASSES) + "\n")
    return root


# ---------------------------------------------------------------- augment="timm"

def test_timm_augmentation_on_the_training_split_only(tmp_path):
    root = _imagenet_tree(tmp_path)
    plain = image_folder(root, image_size=16, val_fraction=0.25)
    aug = image_folder(root, image_size=16, val_fraction=0.25, augment="timm")
    assert aug.sizes() == plain.sizes() == {"train": 9, "val": 3, "test": 12}
    assert aug.in_shape == (3, 16, 16) and aug.class_names == list(CLASSES)
    torch.manual_seed(0)
    draws = [aug.train[0][0] for _ in range(4)]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x in draws)
    assert all(0 <= x.min() and x.max() <= 1 for x in draws)  # [0, 1], as the evaluation transform gives
    assert any(not torch.equal(draws[0], x) for x in draws[1:])  # random: two reads differ
    assert aug.train[0][1] == plain.train[0][1]
    # the held-out and test splits are read as with augment="none", item by item
    for part in ("val", "test"):
        for i in range(len(getattr(plain, part))):
            x, y = getattr(aug, part)[i]
            x0, y0 = getattr(plain, part)[i]
            assert y == y0 and torch.equal(x, x0)
    # the same files, one folder scan: the training copy shares the held-out one's file list
    assert aug.train.dataset.samples is aug.val.dataset.samples
    assert load_image_dataset("imagefolder", root, image_size=16, augment="timm").sizes() == \
        image_folder(root, image_size=16).sizes()


def test_pretrained_weights_get_images_normalised_by_their_timm_config(tmp_path):
    from data_utils.images import timm_normalization

    # the mean and std come from timm's pretrained config (nothing downloaded)
    assert timm_normalization("vit_base_patch16_224") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert timm_normalization("cait_s24_224") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    root = _imagenet_tree(tmp_path)
    plain = image_folder(root, image_size=16, val_fraction=0.25)
    assert plain.normalization is None
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    normed = image_folder(root, image_size=16, val_fraction=0.25, normalize="cait_s24_224", augment="timm")
    assert normed.normalization == (mean, std)
    assert load_image_dataset("imagefolder", root, image_size=16, normalize="cait_s24_224").normalization == (mean, std)
    for part in ("val", "test"):  # the evaluation splits: the [0, 1] image, normalised
        for i in range(len(getattr(plain, part))):
            x, y = getattr(normed, part)[i]
            x0, y0 = getattr(plain, part)[i]
            assert y == y0
            torch.testing.assert_close(x, (x0 - m) / s)
    # the training split, through timm's transform normalised as timm does it: beyond [0, 1]
    torch.manual_seed(0)
    draws = torch.stack([normed.train[i % len(normed.train)][0] for i in range(8)])
    assert draws.min() < -0.5 and draws.max() > 1.2
    assert draws.min() >= (0 - max(mean)) / min(std) - 1e-5 and draws.max() <= (1 - min(mean)) / min(std) + 1e-5
    # the default stays in [0, 1]; a pair given by hand; a wrong number of channels is refused
    with_pair = image_folder(root, image_size=16, normalize=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    torch.testing.assert_close(with_pair.test[0][0], plain.test[0][0] * 2 - 1)
    with pytest.raises(ValueError, match="one per channel"):
        image_folder(root, image_size=16, normalize=((0.5, 0.5), (0.5, 0.5)))
    digits = load_image_dataset("digits", normalize=((0.5,), (0.5,)))
    torch.testing.assert_close(digits.test[0][0], load_image_dataset("digits").test[0][0] * 2 - 1)


def test_timm_posterize_at_magnitude_10_gives_a_black_image_under_any_pillow():
    """m9 with mstd0.5 reaches magnitude 10 in ~2% of draws: 0 bits, which Pillow 13 refuses."""
    import copy

    from timm.data.auto_augment import RandAugment

    from data_utils import timm_train_transform

    ra = next(t for t in timm_train_transform(16).transforms if isinstance(t, RandAugment))
    op = copy.copy(next(op for op in ra.ops if op.name == "PosterizeIncreasing"))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = op(_image(np.random.default_rng(0)))
    assert out.size == (SIZE, SIZE) and not np.asarray(out).any()
    pickle.loads(pickle.dumps(ra))  # DataLoader workers under spawn get a copy


def test_augment_values_and_grey_data_sets(tmp_path):
    root = _imagenet_tree(tmp_path)
    with pytest.raises(ValueError, match=r"unknown augment 'randaugment'; expected one of \['none', 'timm'\]"):
        image_folder(root, image_size=16, augment="randaugment")
    with pytest.raises(ValueError, match=r"augment='timm' needs RGB images.*'digits'"):
        load_image_dataset("digits", augment="timm")
    with pytest.raises(ValueError, match=r"augment='timm' needs RGB images.*'mnist'"):
        load_torchvision("mnist", tmp_path / "nowhere", download=False, augment="timm")
    assert load_image_dataset("digits").sizes() == load_digits_splits().sizes()


def test_timm_augmentation_on_cifar_at_its_own_size(tmp_path, monkeypatch):
    """CIFAR-10's files, faked: 30 training and 10 test images of 32 x 32."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (count, 3072)).astype(np.uint8),
                         "labels": [i % 10 for i in range(count)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kw: True)  # fake files
    plain = load_torchvision("cifar10", tmp_path, download=False, val_fraction=0.35)
    aug = load_torchvision("cifar10", tmp_path, download=False, val_fraction=0.35, augment="timm")
    assert aug.sizes() == plain.sizes()
    torch.manual_seed(0)
    a, b = aug.train[0][0], aug.train[0][0]
    assert a.shape == (3, 32, 32) and 0 <= min(a.min(), b.min()) and max(a.max(), b.max()) <= 1
    assert not torch.equal(a, b)
    assert torch.equal(aug.val[0][0], plain.val[0][0]) and torch.equal(aug.test[3][0], plain.test[3][0])
    assert aug.train.dataset.data is aug.val.dataset.data  # the pixels are held once


# ---------------------------------------------------------------- layouts and missing data

def test_tiny_imagenet_layout_as_downloaded(tmp_path):
    root = _tiny_imagenet_tree(tmp_path / "tiny-imagenet-200")
    splits = image_folder(root, image_size=16)
    assert splits.class_names == list(CLASSES) and splits.num_classes == 3
    assert splits.sizes() == {"train": 12, "val": 0, "test": 7}
    # the labels come from val_annotations.txt, in its order, with the train folders' class indices
    assert [y for _, y in splits.test.samples] == [(i + 1) % 3 for i in range(7)]
    assert [splits.test[i][1] for i in range(7)] == [(i + 1) % 3 for i in range(7)]
    assert splits.test[0][0].shape == (3, 16, 16)
    # train/<wnid>/images/: the nested folder is read, the boxes files are skipped
    assert all("/images/" in path and path.endswith(".JPEG") for path, _ in splits.train.dataset.samples)
    assert [splits.train[i][1] for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    held = image_folder(root, image_size=16, val_fraction=0.25, augment="timm")
    assert held.sizes() == {"train": 9, "val": 3, "test": 7}
    assert torch.equal(held.test[2][0], splits.test[2][0])


def test_tiny_imagenet_annotation_problems(tmp_path):
    root = _tiny_imagenet_tree(tmp_path / "tiny")
    annotations = root / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.write_text(text + "val_9.JPEG\tn99\t0\t0\t9\t9\n")
    with pytest.raises(DatasetUnavailableError, match=r"1 class\(es\) that are not folders.*'n99'"):
        image_folder(root, image_size=16)
    annotations.write_text(text + "val_9.JPEG\tn01\t0\t0\t9\t9\n")
    with pytest.raises(DatasetUnavailableError, match=r"1 image file\(s\) listed in .* are missing.*val_9\.JPEG"):
        image_folder(root, image_size=16)
    annotations.unlink()
    with pytest.raises(DatasetUnavailableError, match=r"looks like TinyImageNet.*val_annotations\.txt.*is missing"):
        image_folder(root, image_size=16)


def test_missing_folder_names_the_path_the_layouts_and_how_to_get_them(tmp_path):
    where = tmp_path / "data" / "imagenet"
    with pytest.raises(DatasetUnavailableError) as err:
        image_folder(where)
    msg = str(err.value)
    assert f"'{where}' lacks train/, val/ (no such folder)" in msg
    assert f"'{where}/train/<class>/<image>'" in msg and f"'{where}/val/val_annotations.txt'" in msg
    assert "image-net.org" in msg and "terms" in msg and "tiny-imagenet-200.zip" in msg and "dataset='digits'" in msg
    (where / "train").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError, match=r"lacks val/: expected the ImageNet layout"):
        load_image_dataset("imagefolder", where)


def test_imagenet_validation_images_not_sorted_into_classes(tmp_path):
    root = _imagenet_tree(tmp_path)
    for c in CLASSES:  # val/ as extracted from ILSVRC2012_img_val.tar: the images lie directly in it
        for path in (root / "val" / c).iterdir():
            path.rename(root / "val" / f"{c}_{path.name}")
        (root / "val" / c).rmdir()
    with pytest.raises(DatasetUnavailableError, match=r"has no class folders \(12 images lie directly in it.*valprep"):
        image_folder(root, image_size=16)


# ---------------------------------------------------------------- Mixup / CutMix

def _examples(b=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, SIZE, SIZE, generator=g), i % classes) for i in range(b)]


def test_mixup_collate_soft_labels_reproducible_and_even_batches():
    examples = _examples()
    images, soft = MixupCollate(3)(examples)
    assert images.shape == (8, 3, SIZE, SIZE) and soft.shape == (8, 3) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    assert (soft > 0).all()  # label smoothing 0.1: every class has some weight
    plain = torch.stack([x for x, _ in examples])
    assert not torch.equal(images, plain)  # mixed
    # the same seed and batch give the same mixing whatever the global RNGs hold; they are left alone
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    again_images, again_soft = MixupCollate(3, seed=0)(examples)
    assert np.array_equal(np.random.get_state()[1], state)
    assert torch.equal(images, again_images) and torch.equal(soft, again_soft)
    clone = pickle.loads(pickle.dumps(MixupCollate(3)))  # for DataLoader workers
    assert torch.equal(clone(examples)[1], soft)
    others = [MixupCollate(3, seed=s)(examples)[1] for s in range(1, 6)]
    assert any(not torch.equal(o, soft) for o in others)
    # mixing only: with label smoothing 0, every row is lam * onehot(y_i) + (1 - lam) * onehot(y_{B-1-i})
    _, unsmoothed = MixupCollate(3, label_smoothing=0.0, cutmix_alpha=0.0)(examples)
    y = torch.tensor([label for _, label in examples])  # 0, 1, 2, 0, 1, 2, 0, 1: y[0] != y[-1]
    lam = unsmoothed[0, y[0]]
    expected = lam * F.one_hot(y, 3) + (1 - lam) * F.one_hot(y.flip(0), 3)
    torch.testing.assert_close(unsmoothed, expected.float())
    # an odd batch (the last of an epoch): the first six are mixed as a batch of six, the last is left alone
    odd_images, odd_soft = MixupCollate(3, seed=0)(examples[:7])
    six_images, six_soft = MixupCollate(3, seed=0)(examples[:6])
    assert torch.equal(odd_images[:6], six_images) and torch.equal(odd_soft[:6], six_soft)
    assert torch.equal(odd_images[6], examples[6][0])
    torch.testing.assert_close(odd_soft[6], F.one_hot(torch.tensor(examples[6][1]), 3).float() * 0.9 + 0.1 / 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\)"):
        MixupCollate(2)(examples)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        MixupCollate(1)
    assert repr(MixupCollate(3)).startswith("MixupCollate(num_classes=3, mixup_alpha=0.8, cutmix_alpha=1.0")


def test_mixup_collate_in_a_data_loader_with_workers_matches_the_main_process(tmp_path):
    splits = image_folder(_imagenet_tree(tmp_path), image_size=16)
    collate = MixupCollate(3, seed=2)
    main = list(DataLoader(splits.train, batch_size=4, collate_fn=collate))
    workers = list(DataLoader(splits.train, batch_size=4, collate_fn=collate, num_workers=2))
    assert len(main) == 3
    for (x, y), (xw, yw) in zip(main, workers):
        assert torch.equal(x, xw) and torch.equal(y, yw)


# ---------------------------------------------------------------- soft targets in the losses

class _Fixed(torch.nn.Module):
    """A multiplexed 'model' that returns the logits it holds, grouped: (B*N, C) -> (B, N, C)."""

    def __init__(self, logits, n):
        super().__init__()
        self.logits, self.n = torch.nn.Parameter(logits.clone()), n

    def forward(self, x):
        return self.logits[: x.shape[0] * self.n].reshape(x.shape[0], self.n, -1)


def test_one_hot_soft_targets_equal_integer_labels_and_soft_gradients_flow():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 3, 1, 4, 2, 2])
    onehot = F.one_hot(labels, 5).float()
    x = torch.zeros(6, 1)
    for n in (1, 2, 3):
        hard = classification_loss(_Fixed(logits, n), (x, labels), n)
        soft = classification_loss(_Fixed(logits, n), (x, onehot), n)
        torch.testing.assert_close(soft, hard)
        torch.testing.assert_close(soft, F.cross_entropy(logits, labels))
    # a mixed target: the probability-weighted cross-entropy, and its gradient softmax - target
    target = torch.softmax(torch.randn(6, 5), dim=-1)
    model = _Fixed(logits, 2)
    loss = classification_loss(model, (x, target), 2)
    torch.testing.assert_close(loss, -(target * torch.log_softmax(logits, -1)).sum(-1).mean())
    loss.backward()
    torch.testing.assert_close(model.logits.grad, (torch.softmax(logits, -1) - target) / 6)
    # regression is unchanged; soft labels over the wrong number of classes are named
    reg = _Fixed(torch.randn(6, 1), 2)
    torch.testing.assert_close(classification_loss(reg, (x, torch.ones(6)), 2),
                               F.mse_loss(reg.logits.squeeze(-1), torch.ones(6)))
    with pytest.raises(ValueError, match=r"soft labels .* need logits of their shape.*num_classes"):
        classification_loss(_Fixed(logits, 2), (x, torch.rand(6, 4)), 2)
    ce, acc = cross_entropy_and_accuracy(logits, onehot)
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels))
    assert acc == (logits.argmax(-1) == labels).float().mean()
    with pytest.raises(ValueError, match="class indices must be integers"):
        cross_entropy_and_accuracy(logits, labels.float())


def test_concatplexer_and_mixvit_losses_take_soft_labels():
    labels = torch.tensor([0, 2, 1, 1, 2])
    onehot = F.one_hot(labels, 3).float()
    torch.testing.assert_close(mux.mixed_labels(onehot, 2, 3, 0.8), mux.mixed_labels(labels, 2, 3, 0.8))
    torch.manual_seed(0)
    config = mux.ConcatPlexerConfig(num_classes=3, image_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=3,
                                    num_heads=2, n_mux=2, concat_point=1)
    model = mux.ConcatPlexerModel(config).train()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    loss = ConcatPlexerLoss(smoothing_weight=0.5)
    hard, soft = loss(model, (x, labels), 2), loss(model, (x, onehot), 2)
    for k in ("loss", "ce", "acc", "smooth"):
        torch.testing.assert_close(soft[k], hard[k])
    mixed = torch.softmax(torch.randn(5, 3), dim=-1)
    loss(model, (x, mixed), 2)["loss"].backward()
    assert model.head.weight.grad is not None

    # MixViT's loss: one-hot soft labels give what integer labels give (the same draws), and a bad shape is named
    vit = mux.MixViTModel(mux.MixViTConfig(num_classes=3, image_size=8, patch_size=2, in_chans=3, embed_dim=16,
                                           depth=1, class_depth=1, num_heads=2, subnetworks=2))
    x8 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    y8 = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(1)
    hard = MultiInputLoss()(vit, (x8, y8), 1)
    torch.manual_seed(1)
    soft = MultiInputLoss()(vit, (x8, F.one_hot(y8, 3).float()), 1)
    for k in ("loss", "acc"):
        torch.testing.assert_close(soft[k], hard[k])
    with pytest.raises(ValueError, match="soft labels \\(B, C\\), got floating-point labels of shape \\(4,\\)"):
        MultiInputLoss()(vit, (x8, torch.rand(4)), 1)


def test_mux_train_with_mixup_on_an_image_folder_and_exact_resume(tmp_path):
    """mux.train with MixupCollate: flat batches of 12 images, 4 tuples of N=3, soft labels; resumed exactly."""
    splits = image_folder(_imagenet_tree(tmp_path / "images"), image_size=16)

    def model():
        return mux.DataMUXClassifier.for_data(splits, n_mux=3, seed=0, width=16)

    def cfg(**kw):
        return mux.TrainConfig(**{**dict(max_steps=4, batch_size=12, lr=1e-2, seed=0, progress=False, log_every=1,
                                         cpu=True), **kw})

    seen = []

    def recording_loss(m, batch, n):
        seen.append(batch[1].clone())
        return classification_loss(m, batch, n)

    before = [p.detach().clone() for p in model().parameters()]
    full = mux.train(model(), splits.train, cfg(), n=3, loss_fn=recording_loss, collate_fn=MixupCollate(3))
    assert full.steps == 4 and all(np.isfinite(h["loss"]) for h in full.history)
    assert all(s.shape == (12, 3) and s.is_floating_point() for s in seen)
    assert any(not torch.equal(p, q) for p, q in zip(before, full.model.parameters()))
    # one batch per epoch (12 images): the batches differ by their order, and so do their mixings
    assert not torch.equal(seen[0], seen[1])
    ckpt = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
    mux.train(model(), splits.train, cfg(**ckpt), n=3, collate_fn=MixupCollate(3))
    shutil.rmtree(mux.latest_checkpoint(tmp_path / "ckpt"))  # as if stopped after step 2
    resumed = mux.train(model(), splits.train, cfg(**ckpt), n=3, collate_fn=MixupCollate(3))
    assert resumed.resumed_from == 2
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
