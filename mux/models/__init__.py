"""One file per method; each composes a multiplexer, a backbone and a demultiplexer."""
from .datamux import DataMUXClassifier, DataMUXConfig

__all__ = ["DataMUXClassifier", "DataMUXConfig"]
