"""One file per method; each composes a multiplexer, a backbone and a demultiplexer."""
from .concatplexer import ConcatPlexerConfig, ConcatPlexerModel, FeatureTeacher
from .datamux import DataMUXClassifier, DataMUXConfig
from .image_multiplexer import ImageMultiplexerConfig, ImageMultiplexerModel, PatchCodebook
from .mimo import MIMOCNNConfig, MIMOCNNModel, MIMOViTConfig, MIMOViTModel
from .mixvit import ClassAttentionConfig, MixViTConfig, MixViTModel, SingleCutMix, Subnetwork
from .mux_plm import MUXPLMConfig, MUXPLMModel
from .tmux import TMUXConfig, TMUXModel
from .vit import VisionConfig, ViTClassifier

__all__ = ["DataMUXClassifier", "DataMUXConfig", "TMUXConfig", "TMUXModel", "MUXPLMConfig", "MUXPLMModel",
           "VisionConfig", "ViTClassifier", "ImageMultiplexerConfig", "ImageMultiplexerModel", "PatchCodebook",
           "ConcatPlexerConfig", "ConcatPlexerModel", "FeatureTeacher",
           "ClassAttentionConfig", "MixViTConfig", "MixViTModel", "Subnetwork", "SingleCutMix",
           "MIMOViTConfig", "MIMOViTModel", "MIMOCNNConfig", "MIMOCNNModel"]
