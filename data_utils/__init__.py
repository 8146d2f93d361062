"""Datasets for the course: an embedded offline default, torchvision downloads, image folders.

Every image loader returns a :class:`DatasetSplits` of map-style datasets yielding
``(image (C, H, W) float tensor, label int)``. Text (:mod:`data_utils.text`): English sentences
from the documentation shipped with Python, a WordPiece tokenizer, and labelled tasks
(:data:`TEXT_TASKS`) whose items are dicts with ``labels``, padded by a ``transformers`` collator.
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
from .text import (
    TEXT_TASKS,
    load_sentences,
    load_text_task,
    load_tokenizer,
    text_splits,
    train_wordpiece_tokenizer,
)

__all__ = [
    "IMAGE_DATASETS",
    "DatasetSplits",
    "DatasetUnavailableError",
    "image_folder",
    "load_digits_splits",
    "load_image_dataset",
    "load_torchvision",
    "TEXT_TASKS",
    "load_sentences",
    "text_splits",
    "train_wordpiece_tokenizer",
    "load_tokenizer",
    "load_text_task",
]
