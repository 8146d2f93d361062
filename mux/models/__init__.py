"""One file per method; each composes a multiplexer, a backbone and a demultiplexer."""
from .datamux import DataMUXClassifier, DataMUXConfig
from .mux_plm import MUXPLMConfig, MUXPLMModel
from .tmux import TMUXConfig, TMUXModel

__all__ = ["DataMUXClassifier", "DataMUXConfig", "TMUXConfig", "TMUXModel", "MUXPLMConfig", "MUXPLMModel"]
