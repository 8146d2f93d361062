"""Datasets for the course: an embedded offline default, torchvision downloads, image folders, text.

Every image loader returns a :class:`DatasetSplits` of map-style datasets yielding
``(image (C, H, W) float tensor in [0, 1], label int)``; ``augment="timm"`` augments the training
split (timm's DeiT recipe) and :class:`MixupCollate` is timm's Mixup/CutMix as a ``collate_fn``.
Text (:mod:`data_utils.text`): English sentences from the documentation shipped with Python, a
WordPiece tokenizer, and labelled tasks (:data:`TEXT_TASKS`) whose items are dicts with ``labels``,
padded by a ``transformers`` collator. GLUE and CoNLL-2003 NER (:mod:`data_utils.glue`: the Hub or
local files, each task's own metrics). Pre-training corpora and the MLM / replaced-token collators
(:mod:`data_utils.corpus`).
"""
from .images import (
    AUGMENTATIONS,
    IMAGE_DATASETS,
    DatasetSplits,
    DatasetUnavailableError,
    MixupCollate,
    image_folder,
    load_digits_splits,
    load_image_dataset,
    load_torchvision,
    seeded_images,
    timm_train_transform,
)
from .corpus import ReplacedTokenCollator, corpus_stats, load_pretraining_corpus, mlm_collator
from .glue import GLUE_TASKS, GlueTask, glue_metrics, load_conll_ner, load_glue_task, ner_f1
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
    "AUGMENTATIONS",
    "MixupCollate",
    "seeded_images",
    "timm_train_transform",
    "TEXT_TASKS",
    "load_sentences",
    "text_splits",
    "train_wordpiece_tokenizer",
    "load_tokenizer",
    "load_text_task",
    "GLUE_TASKS",
    "GlueTask",
    "glue_metrics",
    "load_glue_task",
    "load_conll_ner",
    "ner_f1",
    "load_pretraining_corpus",
    "mlm_collator",
    "ReplacedTokenCollator",
    "corpus_stats",
]
