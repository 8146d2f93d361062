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
  order and clean stops; ``mux.evaluate``: every-example evaluation
- ``mux.throughput``: timing and MAC counts
- ``mux.stats``: comparing two models on the same test items (paired gaps, 95% intervals, verdicts)
- ``mux.similarity``: what two models' features share (linear CKA, feature influence, ablation)
- ``mux.notebook``, ``mux.params``, ``mux.reporting``, ``mux.plots``, ``mux.env``: notebook support
  (a training's configuration, parameter checks, metrics and verdicts, figures, devices)

The run machinery (``mux.runner``: executing notebooks, full-scale configurations, training in
several processes) is a layer above: nothing here imports it.
"""
from . import plots, similarity
from .demultiplexers import Demultiplexer, IndexDemultiplexer, MLPDemultiplexer, RSADemultiplexer, SourceAttribution
from .env import device_of, pick_device, versions
from .evaluate import evaluate, evaluation_order, predict, predict_logits
from .grouping import (IGNORE_INDEX, check_n, group, logits_of, multiplexed_forward, pad_to_multiple, split_batch,
                       ungroup, union_mask)
from .losses import (
    ConcatPlexerLoss,
    MultiInputLoss,
    TaskAndRetrievalLoss,
    classification_loss,
    clip_contrastive_loss,
    cross_entropy_and_accuracy,
    masked_lm_loss,
    mixed_labels,
    replaced_token_loss,
    retrieval_loss,
)
from .models import (
    ConcatPlexerConfig,
    ClassAttentionConfig,
    ConcatPlexerModel,
    DataMUXClassifier,
    DataMUXConfig,
    FeatureTeacher,
    ImageMultiplexerConfig,
    ImageMultiplexerModel,
    MIMOCNNConfig,
    MIMOCNNModel,
    MIMOViTConfig,
    MIMOViTModel,
    MixViTConfig,
    MixViTModel,
    MUXPLMConfig,
    MUXPLMModel,
    PatchCodebook,
    SingleCutMix,
    TMUXConfig,
    TMUXModel,
    VisionConfig,
    ViTClassifier,
)
from .multiplexers import (
    MULTIPLEXERS,
    BinaryHadamardMultiplexer,
    ConcatMultiplexer,
    ContextualMultiplexer,
    GaussianHadamardMultiplexer,
    MIMOMultiplexer,
    MLPOrthogonalMultiplexer,
    Multiplexer,
    OrthogonalMultiplexer,
    TokenCutMixMultiplexer,
    cutmix_sources,
    make_multiplexer,
    tuple_mixup,
)
from .params import ParameterError, check_parameters
from .reporting import (accuracy_verdict, paper_vs_ours, read_metrics, se_of_difference, summary_table, verdict_margin,
                        verdict_table, write_metrics)
from .notebook import train_config
from .stats import (PairedDifference, expected_half_width, gap_metrics, gap_table, interval_warning, items_needed,
                    paired_difference, paired_difference_over_seeds, verdict)
from .throughput import count_macs, flops_per_instance, measure_throughput, throughput_ratios
from .training import (
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    model_fingerprint,
    seed_everything,
    train,
)

__version__ = "0.1.0"
