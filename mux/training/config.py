"""The knobs of a training run (:class:`TrainConfig`) and what it returns (:class:`TrainResult`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..grouping import check_n

__all__ = ["TrainConfig", "TrainResult"]


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

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "log_every", "grad_accum_steps", "keep_checkpoints", "num_processes"):
            check_n(getattr(self, name), name=name)
        for name in ("checkpoint_every", "warmup_steps", "num_workers", "eval_every"):
            check_n(getattr(self, name), name=name, minimum=0)
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
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
