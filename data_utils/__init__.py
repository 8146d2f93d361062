"""Datasets for the course: an embedded offline default, torchvision downloads, image folders.

Every loader returns a :class:`DatasetSplits` of map-style datasets yielding
``(image (C, H, W) float tensor, label int)``.
"""
from .images import (
    IMAGE_DATASETS,
    DatasetSplits,
    DatasetUnavailableError,
    image_folder,
    load_digits_splits,
    load_image_dataset,
    load_torchvision,
)

__all__ = [
    "IMAGE_DATASETS",
    "DatasetSplits",
    "DatasetUnavailableError",
    "image_folder",
    "load_digits_splits",
    "load_image_dataset",
    "load_torchvision",
]
