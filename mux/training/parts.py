"""The pieces :func:`mux.train` is built from: seeding, precision and the Accelerator, the optimiser,
RNG snapshots, loss terms, and where a run of several processes is handed over."""
from __future__ import annotations

import datetime
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from torch import Tensor, nn

from ..env import cuda_has_native_bf16
from .config import TrainConfig

__all__ = ["seed_everything", "resolve_precision", "make_accelerator", "adamw", "no_weight_decay_names",
           "rng_snapshot", "rng_restore", "deterministic_algorithms", "loss_terms", "world_size", "hands_over", "LAUNCHERS",
           "process_launcher", "tracker_folder", "start_tracking", "tf32_matmuls", "LOGGER", "PROGRESS_EVERY", "PROGRESS_FILE", "progress_handlers", "ProgressReport"]

LAUNCHERS = "mux.launchers"  # entry-point group of the function that trains in K new processes
LOGGER = "mux.training"  # the logger of the plain-text progress lines (INFO)
PROGRESS_EVERY = "MUX_PROGRESS_EVERY"  # environment: steps between two progress lines (default: log_every)
PROGRESS_FILE = "MUX_PROGRESS_FILE"  # environment: a file the progress lines are appended to, and echoed to stderr


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices): ``accelerate.utils.set_seed``.

    ``deterministic=True`` also asks torch for deterministic kernels (needed for bit-exact
    runs on a GPU; some operations then raise an error that names them).
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(seed, deterministic=deterministic)


def resolve_precision(cfg: TrainConfig) -> str:
    """``cfg.mixed_precision``, with ``auto`` resolved: bf16 on a GPU that runs it natively, else none."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if not cfg.cpu and torch.cuda.is_available() and cuda_has_native_bf16():
        return "bf16"  # bf16 only where the GPU runs it natively, not emulated
    return "no"


def make_accelerator(cfg: TrainConfig, accelerator: Accelerator | None = None) -> Accelerator:
    """``accelerator`` if given (it must hold nothing prepared), else a new one for ``cfg``.

    Accelerate's state is process-wide: in a single process (a notebook training several
    models), a state left with another precision or device by an earlier run is reset; under
    several processes that is an error that says what to do."""
    if accelerator is not None:
        if accelerator._models or accelerator._optimizers:
            raise ValueError("the accelerator passed to train() already holds prepared models or optimizers; "
                             "its checkpoints would mix them with this run's")
        return accelerator
    precision = resolve_precision(cfg)
    state = AcceleratorState._shared_state
    if state:
        other = state.get("_mixed_precision") != precision or (cfg.cpu and PartialState().device.type != "cpu")
        if other and PartialState().num_processes > 1:
            raise ValueError(
                f"Accelerate was already set up in this process with mixed_precision="
                f"{state.get('_mixed_precision')!r}; this run asks for {precision!r}. Under several processes pass "
                "the same mixed_precision to every run, or pass one Accelerator with accelerator=..."
            )
        if other:
            AcceleratorState._reset_state(reset_partial_state=True)
    trackers = [name.strip() for name in cfg.tracker.split(",") if name.strip()]
    accelerator = Accelerator(mixed_precision=precision, cpu=cfg.cpu, step_scheduler_with_optimizer=False,
                              log_with=trackers or None, project_dir=tracker_folder(cfg) if trackers else None)
    if trackers and (not accelerator.log_with or (trackers != ["all"] and len(accelerator.log_with) < len(trackers))):
        raise ValueError(f"tracker={cfg.tracker!r}: Accelerate finds {len(accelerator.log_with)} of these trackers "
                         "installed; install the one you named (tensorboard: `pip install tensorboard`, wandb: "
                         "`pip install wandb`, ...) or leave the tracker unset")
    return accelerator


def tracker_folder(cfg: TrainConfig) -> str:
    """Where file-based trackers (TensorBoard) write: ``cfg.tracker_dir``, else ``tracker/`` beside the
    run's checkpoint folder, else ``tracker/`` in the working folder. Each training is a run named by its tag."""
    if cfg.tracker_dir:
        return cfg.tracker_dir
    return os.path.join(os.path.dirname(cfg.checkpoint_dir.rstrip("/")), "tracker") if cfg.checkpoint_dir else "tracker"


def start_tracking(accelerator: Accelerator, cfg: TrainConfig, run: dict) -> None:
    """Open this training's run in the trackers the Accelerator was made with (``cfg.tracker``), with the
    run's identity as its configuration (numbers and strings only, as TensorBoard's hparams want)."""
    if accelerator.log_with:
        config = {k: v for k, v in run.items() if isinstance(v, (bool, int, float, str))}
        accelerator.init_trackers(cfg.description, config=config)


@contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 matrix products and convolutions on an NVIDIA GPU (Ampere or newer) while the block runs, when
    ``enabled``: about 3x the fp32 rate for the float32 work left outside autocast, with 10 mantissa bits.
    The previous settings are put back afterwards; on a CPU nothing changes."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def no_weight_decay_names(model: nn.Module) -> list[str]:
    """Parameters that weight decay must spare beyond 1-d ones (timm's rule): embedding tables,
    and what any module lists in its ``no_weight_decay()`` (timm's convention, names relative
    to that module)."""
    names = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, nn.Embedding):
            names.append(f"{dot}weight")
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names += [f"{dot}{name}" for name in listed()]
    return names


def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (timm's ``param_groups_weight_decay``)."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    return torch.optim.AdamW(groups, lr=cfg.lr)


def rng_snapshot():
    """The states of Python's, NumPy's and torch's global RNGs (CUDA's too, once initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def rng_restore(snapshot) -> None:
    """Put back the RNG states of :func:`rng_snapshot`."""
    random.setstate(snapshot[0])
    np.random.set_state(snapshot[1])
    torch.set_rng_state(snapshot[2])
    if snapshot[3] is not None:
        torch.cuda.set_rng_state_all(snapshot[3])


@contextmanager
def deterministic_algorithms(on: bool):
    """Within the block, torch's deterministic-algorithms setting is what the run set; restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        if on:
            torch.use_deterministic_algorithms(before)


def loss_terms(value) -> dict[str, Tensor]:
    """A loss function's result as named scalar terms with the total under ``"loss"``."""
    if isinstance(value, Tensor):
        terms = {"loss": value}
    elif isinstance(value, Mapping) and "loss" in value:
        terms = dict(value)
    else:
        raise TypeError("loss_fn must return a scalar tensor or a dict of scalar tensors with a 'loss' entry "
                        f"(the total to minimise), got {type(value).__name__}"
                        + (f" with keys {list(value)}" if isinstance(value, Mapping) else ""))
    for k, v in terms.items():
        if not isinstance(v, Tensor) or v.numel() != 1:
            raise TypeError(f"loss term {k!r} must be a scalar tensor, got {getattr(v, 'shape', type(v).__name__)}")
    return terms


def world_size() -> int:
    """The number of processes of the distributed run this process belongs to (1: none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def hands_over(cfg: TrainConfig, accelerator: Accelerator | None) -> bool:
    """Whether this call trains in new worker processes (``num_processes`` K > 1 outside a distributed run).

    Inside one, K must be its number of processes (1 accepts any)."""
    k, world = cfg.num_processes, world_size()
    if k > 1 and world == 1:
        if accelerator is not None:
            raise ValueError(f"num_processes={k} trains in new worker processes, which cannot use an Accelerator of "
                             "this one: leave accelerator=None (or num_processes=1)")
        return True
    if k > 1 and world != k:
        raise ValueError(f"TrainConfig(num_processes={k}), but this process is one of {world} started by torchrun or "
                         f"accelerate launch: set num_processes={world} (or 1, which accepts what the launcher "
                         f"started), or launch {k} processes.")
    return False


def process_launcher():
    """The function that trains in K new processes: registered under the entry-point group
    :data:`LAUNCHERS` by the course's run machinery (``mux.runner.launch``), which this
    library does not import."""
    found = list(entry_points(group=LAUNCHERS, name="processes"))
    if not found:
        raise RuntimeError(f"num_processes > 1 needs the launcher registered under the entry point group {LAUNCHERS!r} "
                           "by the installed course package: install it with `pip install -e .` (or `make install`)")
    return found[0].load()


def progress_handlers() -> logging.Logger:
    """The ``mux.training`` logger, with plain handlers when the environment asks for them.

    A progress bar in a notebook kernel is a widget: it reaches neither a run's log nor a batch job's
    output. So when ``MUX_PROGRESS_FILE`` is set (the full-scale runner sets it for the kernel), every
    progress line is appended to that file and echoed to the process's original stderr
    (``sys.__stderr__``, which a kernel shares with the job that started it). Without it the lines are
    INFO records that no handler prints by default, so a notebook's outputs do not change."""
    logger = logging.getLogger(LOGGER)
    path = os.environ.get(PROGRESS_FILE)
    if not path or any(getattr(h, "mux_progress", None) == path for h in logger.handlers):
        return logger
    for handler in [h for h in logger.handlers if getattr(h, "mux_progress", None)]:
        logger.removeHandler(handler)  # another file than the one asked for now
        handler.close()
    handlers = [logging.FileHandler(path, mode="a", encoding="utf-8")]
    if sys.__stderr__ is not None:
        handlers.append(logging.StreamHandler(sys.__stderr__))
    for handler in handlers:
        handler.mux_progress = path
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


class ProgressReport:
    """A plain-text line every K steps, at the last step and at every evaluation (step, loss, lr, steps/s, ETA).

    K is ``MUX_PROGRESS_EVERY`` from the environment, else the run's ``log_every``. Only the main process
    writes; the losses are the newest means of the run's history (every ``log_every`` steps)."""

    def __init__(self, cfg: TrainConfig, start_step: int, is_main: bool):
        self.tag, self.total, self.start_step, self.is_main = cfg.description, cfg.max_steps, start_step, is_main
        try:
            self.every = max(1, int(os.environ.get(PROGRESS_EVERY) or cfg.log_every))
        except ValueError:
            raise ValueError(f"{PROGRESS_EVERY} must be a whole number of steps, got "
                             f"{os.environ.get(PROGRESS_EVERY)!r}") from None
        self.logger = progress_handlers()
        self.started = time.perf_counter()

    def rate(self, step: int) -> float:
        """Steps a second since this run started (or resumed)."""
        return (step - self.start_step) / max(time.perf_counter() - self.started, 1e-9)

    def step(self, step: int, history: list[dict], lr: float) -> None:
        if not self.is_main or (step % self.every and step != self.total):
            return
        rate = self.rate(step)
        eta = datetime.timedelta(seconds=round((self.total - step) / rate)) if rate > 0 else "?"
        last = history[-1] if history else {}
        terms = " ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("step", "lr"))
        self.logger.info(f"[{self.tag}] step {step}/{self.total} {terms} lr {lr:.3g} {rate:.2f} steps/s ETA {eta}")

    def evaluation(self, step: int, values: Mapping) -> None:
        if self.is_main:
            text = " ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "step")
            self.logger.info(f"[{self.tag}] step {step}/{self.total} evaluation: {text}")
