"""The knobs of a training run (:class:`TrainConfig`) and what it returns (:class:`TrainResult`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from torch import nn

from ..grouping import check_n

__all__ = ["TrainConfig", "TrainResult", "TRACKER", "TRACKER_DIR", "TF32", "COMPILE", "EVALUATE_ONLY"]

# Environment variables that set the defaults of the run-time switches below, so that a full-scale run
# (``python -m mux.course full ... --tracker tensorboard --tf32 --compile inductor --evaluate``) turns them
# on for every training of a notebook without the notebook declaring them.
TRACKER = "MUX_TRACKER"
TRACKER_DIR = "MUX_TRACKER_DIR"
TF32 = "MUX_TF32"
COMPILE = "MUX_COMPILE"
EVALUATE_ONLY = "MUX_EVALUATE_ONLY"


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"environment variable {name} must be 1/0 (or true/false), got {os.environ[name]!r}")


@dataclass
class TrainConfig:
    """Knobs of :func:`train`. ``batch_size`` counts instances per micro-batch and process,
    so a micro-batch holds ``batch_size // N`` multiplexed tuples; one step (one optimiser
    update) uses ``grad_accum_steps`` micro-batches.

    ``num_processes``: K > 1, from a single process (a notebook), trains in K new worker
    processes under ``torchrun`` (K GPUs, or K CPU processes with ``cpu=True`` or without a
    GPU) and loads the result into the caller's model (:mod:`mux.runner.launch`); it needs
    ``checkpoint_dir``. Under ``torchrun`` or ``accelerate launch`` already, K must equal the
    number of processes they started (1, the default, accepts any).
    """

    max_steps: int = 500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01  # weight matrices only: never biases, norms or embeddings
    warmup_steps: int = 0
    grad_accum_steps: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    seed: int = 0
    num_workers: int = 0  # data-loader worker processes
    deterministic: bool = False  # deterministic kernels (bit-exact resume on a GPU)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (and on interruption)
    keep_checkpoints: int = 2
    resume: bool = True  # False: refuse a folder that already holds checkpoints
    mixed_precision: str = "auto"  # auto: bf16 on a GPU with native bf16, else full precision
    cpu: bool = False  # force the CPU even when a GPU is present
    progress: bool = True
    log_every: int = 10
    eval_every: int = 0  # with train(eval_fn=...): evaluate every this many steps (0: only at the end)
    description: str = "train"
    num_processes: int = 1  # >1: train() starts this many worker processes (GPUs, or CPU processes) itself
    # run-time switches (defaults from the environment variables above):
    tracker: str = field(default_factory=lambda: os.environ.get(TRACKER, ""))  # Accelerate's log_with: "tensorboard", "wandb", ...; "": none
    tracker_dir: str | None = field(default_factory=lambda: os.environ.get(TRACKER_DIR) or None)  # where file trackers write
    tf32: bool = field(default_factory=lambda: _env_flag(TF32))  # TF32 matrix products and convolutions on an NVIDIA GPU
    compile: str = field(default_factory=lambda: os.environ.get(COMPILE, ""))  # a torch.compile backend ("inductor"); "": none
    evaluate_only: bool = field(default_factory=lambda: _env_flag(EVALUATE_ONLY))  # load the final checkpoint, train nothing

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "log_every", "grad_accum_steps", "keep_checkpoints", "num_processes"):
            check_n(getattr(self, name), name=name)
        for name in ("checkpoint_every", "warmup_steps", "num_workers", "eval_every"):
            check_n(getattr(self, name), name=name, minimum=0)
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.evaluate_only and not self.checkpoint_dir:
            raise ValueError("evaluate_only=True loads the run's final checkpoint: it needs a checkpoint_dir")
        for name in ("tracker", "compile"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a name (a string; '' for none), got {getattr(self, name)!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    history: list[dict] = field(default_factory=list)  # {"step", "lr", "loss", other terms} every log_every steps
    evaluations: list[dict] = field(default_factory=list)  # {"step", what eval_fn returned} every eval_every steps
    resumed_from: int | None = None
    seconds: float = 0.0
    device: str = "cpu"
    num_processes: int = 1
    is_main_process: bool = True  # under several processes, only the main one should write results
