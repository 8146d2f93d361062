"""mux: the small library behind the data-multiplexing course.

Every method is a composition (see README.md):
inputs (N) -> front -> multiplexer -> shared backbone -> demultiplexer -> head -> N predictions.

- ``mux.grouping``: batches of instances <-> tuples of N, the padding policy
- ``mux.multiplexers``: ways of mixing N instances into one representation
- ``mux.demultiplexers``: ways of recovering N representations from one
- ``mux.models``: one file per method (``datamux``, ``tmux``, ``mux_plm``, ``vit``,
  ``image_multiplexer``, ``concatplexer``, ``mixvit``, ``mimo``)
- ``mux.losses``: training objectives (a tensor, or named terms with the total under "loss")
- ``mux.training``: the one training loop (``mux.train``, on Accelerate), its checkpoints, data
  order and clean stops; ``mux.evaluation``: every-example evaluation (``mux.evaluate``)
- ``mux.throughput``: timing and MAC counts
- ``mux.stats``: comparing two models on the same test items (paired gaps, 95% intervals, verdicts)
- ``mux.similarity``: what two models' features share (linear CKA, feature influence, ablation)
- ``mux.notebook``, ``mux.params``, ``mux.reporting``, ``mux.plots``, ``mux.env``: notebook support
  (a training's configuration, parameter checks, metrics and verdicts, figures, devices)

The run machinery (``mux.runner``: executing notebooks, full-scale configurations, training in
several processes) is a layer above: nothing here imports it.
"""
from __future__ import annotations

import importlib

# Every name below is imported from its module on first use (``mux.train`` imports ``mux.training``):
# ``import mux`` itself costs nothing, so a process that only runs notebooks (``mux.runner``) does not
# load torch, transformers and timm (about 600 MB) beside the kernel that does.
_EXPORTS = {
    "demultiplexers": (
        "Demultiplexer", "IndexDemultiplexer", "MLPDemultiplexer", "RSADemultiplexer", "SourceAttribution"
    ),
    "env": ("device_of", "pick_device", "versions"),
    "evaluation": ("evaluate", "evaluation_order", "predict", "predict_logits"),
    "grouping": (
        "IGNORE_INDEX", "check_n", "group", "logits_of", "multiplexed_forward", "pad_to_multiple", "split_batch",
        "ungroup", "union_mask"
    ),
    "losses": (
        "ConcatPlexerLoss", "MultiInputLoss", "TaskAndRetrievalLoss", "classification_loss",
        "clip_contrastive_loss", "cross_entropy_and_accuracy", "masked_lm_loss", "mixed_labels",
        "replaced_token_loss", "retrieval_loss"
    ),
    "models": (
        "ConcatPlexerConfig", "ClassAttentionConfig", "ConcatPlexerModel", "DataMUXClassifier", "DataMUXConfig",
        "FeatureTeacher", "ImageMultiplexerConfig", "ImageMultiplexerModel", "MIMOCNNConfig", "MIMOCNNModel",
        "MIMOViTConfig", "MIMOViTModel", "MixViTConfig", "MixViTModel", "MUXPLMConfig", "MUXPLMModel",
        "PatchCodebook", "SingleCutMix", "TMUXConfig", "TMUXModel", "VisionConfig", "ViTClassifier"
    ),
    "multiplexers": (
        "MULTIPLEXERS", "BinaryHadamardMultiplexer", "ConcatMultiplexer", "ContextualMultiplexer",
        "GaussianHadamardMultiplexer", "MIMOMultiplexer", "MLPOrthogonalMultiplexer", "Multiplexer",
        "OrthogonalMultiplexer", "TokenCutMixMultiplexer", "cutmix_sources", "make_multiplexer", "tuple_mixup"
    ),
    "params": ("ParameterError", "check_parameters"),
    "reporting": ("paper_vs_ours", "read_metrics", "summary_table", "write_metrics"),
    "notebook": ("train_config",),
    "stats": (
        "PairedDifference", "expected_half_width", "gap_metrics", "gap_table", "interval_warning", "items_needed",
        "paired_difference", "paired_difference_over_seeds", "verdict"
    ),
    "throughput": ("count_macs", "flops_per_instance", "measure_throughput", "throughput_ratios"),
    "training": (
        "TrainConfig", "TrainingInterrupted", "TrainResult", "latest_checkpoint", "list_checkpoints",
        "load_weights", "model_fingerprint", "seed_everything", "train"
    ),
}
_ORIGIN = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("course", "demultiplexers", "env", "evaluation", "grouping", "losses", "models", "multiplexers",
               "notebook", "params", "plots", "reporting", "runner", "similarity", "stats", "throughput", "training",
               "vision_flops")

__all__ = sorted(_ORIGIN)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _ORIGIN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_ORIGIN[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ORIGIN) | set(_SUBMODULES))
