"""Write a torchvision dataset (CIFAR-10/100, MNIST, Fashion-MNIST) as an ImageNet-style folder.

    python scripts/export_image_folder.py cifar100 data/cifar100 [--download-root data]

gives ``data/cifar100/train/<class>/<index>.png`` and ``data/cifar100/val/<class>/<index>.png``
(the dataset's test split), the layout every full-scale vision configuration reads with
``dataset: imagefolder``, so that timm's training transforms and several data-loader workers
apply to CIFAR exactly as to ImageNet. Files already written are kept, so an interrupted export
continues where it stopped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def export(name: str, out: str | Path, download_root: str | Path = "data") -> dict[str, int]:
    """Export ``name`` into ``out``; return the number of images per split."""
    from torchvision import datasets

    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    out = Path(out)
    counts = {}
    for split, train in (("train", True), ("val", False)):
        try:
            ds = getattr(datasets, DATASETS[name])(str(download_root), train=train, download=True)
        except Exception as err:  # noqa: BLE001 - a download failure: say what and where
            raise SystemExit(f"could not get {name} into '{download_root}' ({err}); download it on a machine with "
                             f"internet access and copy the folder there") from err
        classes = [c.replace("/", "_") for c in ds.classes]
        for c in classes:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            path = out / split / classes[ds.targets[i]] / f"{i:06d}.png"
            if not path.exists():
                image, _ = ds[i]
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
        counts[split] = len(ds)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("out", help="the image folder to write (train/ and val/ inside)")
    parser.add_argument("--download-root", default="data", help="where torchvision downloads the dataset")
    args = parser.parse_args(argv)
    counts = export(args.dataset, args.out, args.download_root)
    print(f"wrote {counts['train']} training and {counts['val']} validation images under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
