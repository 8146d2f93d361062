"""Training: one loop (:mod:`.loop`), its checkpoints (:mod:`.checkpoints`), its data order
(:mod:`.data`), clean stops (:mod:`.interrupt`) and the pieces it is built from (:mod:`.parts`)."""
from .checkpoints import latest_checkpoint, list_checkpoints, load_weights, model_fingerprint
from .config import TrainConfig, TrainResult
from .data import EpochShuffleSampler
from .interrupt import TrainingInterrupted
from .loop import train
from .parts import seed_everything

__all__ = ["TrainConfig", "TrainResult", "EpochShuffleSampler", "TrainingInterrupted", "train", "seed_everything",
           "model_fingerprint", "latest_checkpoint", "list_checkpoints", "load_weights"]
