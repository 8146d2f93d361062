"""One training loop for every chapter, built on Hugging Face Accelerate.

The same code runs on a CPU, one GPU, or several GPUs under ``accelerate launch`` or
``torchrun`` (``batch_size`` is then per process), with bf16 autocast where the GPU
supports it natively. It seeds everything, shows a tqdm progress bar, writes a checkpoint
every ``checkpoint_every`` steps, at the end and on Ctrl-C, and resumes from the newest
complete checkpoint.

What a step is. One step is one optimiser update: ``grad_accum_steps`` micro-batches of
``batch_size`` instances (whole tuples of N), gradients clipped to ``max_grad_norm`` when it
is set. Weight decay applies to weight matrices only, not to biases, norms and embeddings
(timm's ``param_groups_weight_decay``). The loss function returns one tensor or a dict of
named terms (see :mod:`mux.losses`); every term is averaged over the steps between two log
lines and kept in the history.

Exact resume. The data order of epoch ``e`` is a permutation drawn from a seed derived from
``(seed, e)`` with NumPy's ``SeedSequence`` (so seed 0 / epoch 1 and seed 1 / epoch 0 differ),
and a resumed run skips the batches its epoch already used; the RNG states are saved with
every checkpoint. So a resumed run ends with the same weights as an uninterrupted one,
bit for bit on a CPU. On a GPU that needs ``deterministic=True`` (deterministic kernels) and
the same precision; with bf16 the two runs agree to rounding.

Which run a checkpoint belongs to. A checkpoint stores the model's fingerprint (class,
configuration, parameter shapes) and the run's configuration (seed, learning rate, steps,
batch, N, number of processes, precision, ...). Training refuses to resume from a
checkpoint of another model or another run, and names what differs; only the progress
display and the checkpointing knobs may change between the two.

Checkpoints. A folder ``checkpoint-<step>`` written by ``Accelerator.save_state`` (model,
optimiser, scheduler, RNG states of every process) plus ``trainer_state.json``, written under
a temporary name, flushed to disk and renamed only when every process has finished writing,
so an interruption never leaves a half-written checkpoint that looks complete. If the newest
checkpoint cannot be read (a truncated file), training and :func:`load_weights` fall back to
the previous one with a warning. Ctrl-C (SIGINT) sets a flag that is checked between steps:
the step in flight completes, a checkpoint is written, then ``KeyboardInterrupt`` is raised;
a second Ctrl-C stops at once without saving.

Several processes from a notebook. ``TrainConfig(num_processes=K)`` with K > 1, called
outside a distributed run, trains in K fresh worker processes started under ``torchrun``
(:mod:`mux.launch`) and loads the result into the caller's model: the same training cell
runs on one device or on K.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import extract_model_from_parallel, set_seed
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .env import cuda_has_native_bf16
from .grouping import check_n
from .losses import classification_loss
from .reporting import _sync_folder

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EpochShuffleSampler",
    "train",
    "classification_loss",
    "seed_everything",
    "model_fingerprint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_weights",
]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# TrainConfig fields that may differ between a run and its resumption: they change neither
# the computation nor its result (display, and where and how often checkpoints are written).
NOT_PART_OF_THE_RUN = ("progress", "description", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume",
                       "eval_every",
                       # replaced by what they resolve to (device type, precision, instances per batch, workers)
                       "cpu", "mixed_precision", "batch_size", "num_workers",
                       # the run records the number of processes it actually has (1 to K under torchrun)
                       "num_processes")
# what a checkpoint that cannot be read raises, depending on which file is damaged
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, json.JSONDecodeError, pickle.UnpicklingError,
               SafetensorError)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices): ``accelerate.utils.set_seed``.

    ``deterministic=True`` also asks torch for deterministic kernels (needed for bit-exact
    runs on a GPU; some operations then raise an error that names them).
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(seed, deterministic=deterministic)


def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for ``(seed, epoch)``: distinct pairs give unrelated seeds."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """A new random order of ``size`` indices every epoch, fixed by ``(seed, epoch)``.

    Every process draws the same order (Accelerate then gives each one its share of every
    step's batches); :meth:`set_epoch` selects the epoch.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = int(size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass
class TrainConfig:
    """Knobs of :func:`train`. ``batch_size`` counts instances per micro-batch and process,
    so a micro-batch holds ``batch_size // N`` multiplexed tuples; one step (one optimiser
    update) uses ``grad_accum_steps`` micro-batches.

    ``num_processes``: K > 1 trains on K GPUs (one process each; K CPU processes with
    ``cpu=True`` or without a GPU) when :func:`train` is called from a single process, e.g. a
    notebook: :func:`train` then starts K fresh worker processes with ``python -m
    torch.distributed.run --nproc_per_node K -m mux.launch <job>``, hands them the model, data,
    loss and every other argument (pickled with ``cloudpickle``, which copies functions and
    classes defined in the notebook by value), streams their output into the caller's, and
    loads the final weights from ``checkpoint_dir`` (required) into the caller's model. Running
    the same call again resumes, or returns at once if the run has finished. Why not
    Accelerate's ``notebook_launcher``: it forks the kernel and needs CUDA uninitialised in
    it, but the course notebooks use the GPU between trainings (evaluation, timing), so
    forking is not possible; fresh processes under ``torchrun`` work whatever the kernel has
    done, and are the code path of ``accelerate launch``/``torchrun`` of a script. Under
    ``torchrun`` or ``accelerate launch`` already, K must equal the number of processes they
    started (1, the default, accepts any). Not part of the run's identity: the run records the
    number of processes it has.
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
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
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


def _bare(model: nn.Module) -> nn.Module:
    """The module inside DDP and torch.compile wrappers (its autocast wrapper, if any, stays)."""
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


_VERSION_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset")


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model for resuming: class, configuration and parameter shapes.

    It survives ``torch.compile`` and DDP (the wrappers are removed) and a library upgrade:
    a ``transformers`` configuration contributes only its values that differ from the
    defaults, without version and path entries.
    """
    model = _bare(model)
    config = getattr(model, "config", None)
    if hasattr(config, "to_diff_dict"):
        config = config.to_diff_dict()
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    elif is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _VERSION_KEYS}
    return json.loads(json.dumps({
        "class": type(model).__name__,
        "config": config,
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }, default=str))


def list_checkpoints(checkpoint_dir: str | os.PathLike | None) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders under ``checkpoint_dir``, oldest first."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return []
    found = sorted(
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()
    )
    return [p for _, p in found]


def latest_checkpoint(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder under ``checkpoint_dir``, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _check_fingerprint(saved: dict, model: nn.Module, where: Path) -> None:
    current = model_fingerprint(model)
    if saved != current:
        diff = [k for k in ("class", "config", "shapes") if saved.get(k) != current.get(k)]
        raise ValueError(
            f"checkpoint {where} was written by a different model ({', '.join(diff)} differ): "
            f"saved {saved.get('class')} with config {saved.get('config')}, "
            f"this run builds {current['class']} with config {current['config']}. "
            "Use another checkpoint_dir, or delete this one to start over."
        )


def _check_run(saved: dict | None, current: dict, where: Path) -> None:
    if saved is None:
        raise ValueError(f"checkpoint {where} does not record its training configuration (written by an older "
                         "version of the course): delete it, or use another checkpoint_dir")
    diff = [f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(
            f"checkpoint {where} belongs to another training run ({'; '.join(diff)}). Resuming would continue "
            "or return that run, not this one. Use another checkpoint_dir for this run, or delete that folder "
            "to start over."
        )


def _read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _readable_checkpoints(root, what: str):
    """Yield ``(path, state)`` newest first, warning about each unreadable checkpoint skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            yield path, _read_state(path)
        except _UNREADABLE as err:
            warnings.warn(f"{what}: cannot read {path / STATE_FILE} ({err}); trying an older checkpoint", stacklevel=3)


def load_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a training checkpoint's weights into ``model`` (checks it is the same model).

    ``checkpoint`` is a ``checkpoint-<step>`` folder or a folder of them (the newest readable
    one is used). Tied weights (e.g. a language model's output layer sharing the embedding)
    are restored by safetensors' model loader.
    """
    from safetensors.torch import load_model

    path = Path(checkpoint)
    candidates = [(path, None)] if (path / STATE_FILE).is_file() else _readable_checkpoints(path, "load_weights")
    bare = _bare(model)
    tried = []
    for ckpt, state in candidates:
        state = state if state is not None else _read_state(ckpt)
        _check_fingerprint(state["fingerprint"], bare, ckpt)
        try:
            load_model(bare, str(ckpt / "model.safetensors"), strict=True)
            return model
        except _UNREADABLE as err:
            if ckpt == path:
                raise
            tried.append(ckpt.name)
            warnings.warn(f"load_weights: cannot read {ckpt} ({err}); trying an older checkpoint", stacklevel=2)
    raise FileNotFoundError(
        f"no readable checkpoint found at {path} (expected a checkpoint-<step> folder"
        + (f"; unreadable: {', '.join(tried)})" if tried else ")")
    )


def _resolve_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if not cfg.cpu and torch.cuda.is_available() and cuda_has_native_bf16():
        return "bf16"  # bf16 only where the GPU runs it natively, not emulated
    return "no"


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    """A new Accelerator for ``cfg``. Accelerate's state is process-wide: in a single process
    (a notebook training several models), a state left with another precision or device by
    an earlier run is reset; under several processes that is an error that says what to do."""
    precision = _resolve_precision(cfg)
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
    return Accelerator(mixed_precision=precision, cpu=cfg.cpu, step_scheduler_with_optimizer=False)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folder itself) to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _sync_folder(folder)


def _save(accelerator: Accelerator, root: Path, step: int, state: dict, keep: int) -> Path:
    final, tmp = root / f"checkpoint-{step:08d}", root / f"checkpoint-{step:08d}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its files (RNG states) before the rename
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _sync_folder(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class _StopRequest:
    """Ctrl-C (SIGINT) handler for the duration of training: the first press asks the loop to
    stop after the step in flight; a second press raises ``KeyboardInterrupt`` at once.
    Installed only in the main thread (Python delivers signals there)."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nInterrupted: finishing this step and saving a checkpoint (Ctrl-C again stops at once, "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rng_snapshot():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _rng_restore(snapshot) -> None:
    random.setstate(snapshot[0])
    np.random.set_state(snapshot[1])
    torch.set_rng_state(snapshot[2])
    if snapshot[3] is not None:
        torch.cuda.set_rng_state_all(snapshot[3])


@contextmanager
def _deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        if on:
            torch.use_deterministic_algorithms(before)


def _loss_terms(value) -> dict[str, Tensor]:
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


def _no_weight_decay_names(model: nn.Module) -> list[str]:
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


def _build_loader(data, cfg: TrainConfig, n: int, collate_fn) -> tuple[DataLoader, EpochShuffleSampler, torch.Generator]:
    """The training DataLoader: seeded shuffling per epoch, whole tuples per batch.

    A DataLoader passed in brings its dataset, ``batch_size`` (a multiple of N), ``collate_fn``
    and workers; its sampler is replaced by the seeded one (exact resume needs it)."""
    if isinstance(data, DataLoader):
        loader = data
        if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or \
                type(loader.batch_sampler) is not BatchSampler:
            raise ValueError("train() replaces the DataLoader's sampler by its seeded shuffle; a DataLoader with a "
                             "custom sampler or batch_sampler is not supported (pass the dataset and collate_fn)")
        if loader.batch_size is None or loader.batch_size % n:
            raise ValueError(f"the DataLoader's batch_size ({loader.batch_size}) must be a multiple of N={n}: "
                             "a batch holds whole tuples")
        if collate_fn is not None:
            raise ValueError("pass collate_fn either in the DataLoader or to train(), not both")
        dataset, per_batch, collate_fn = loader.dataset, loader.batch_size, loader.collate_fn
        workers, extra = loader.num_workers, dict(pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                                                  persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            extra["prefetch_factor"] = loader.prefetch_factor
    else:
        dataset, per_batch, workers, extra = data, max(n, cfg.batch_size // n * n), cfg.num_workers, {}
    if len(dataset) == 0:
        raise ValueError("train_data is empty")
    sampler = EpochShuffleSampler(len(dataset), cfg.seed)
    generator = torch.Generator()  # worker seeds come from here, not from the global RNG
    loader = DataLoader(dataset, batch_size=per_batch, sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                        generator=generator, **extra)
    return loader, sampler, generator


def _run_identity(cfg: TrainConfig, n: int, loader: DataLoader, loss_fn, num_processes: int, device_type: str,
                  mixed_precision: str) -> dict:
    """What a checkpoint records of its run, and must match to be resumed (see the module docstring)."""
    run = {k: v for k, v in asdict(cfg).items() if k not in NOT_PART_OF_THE_RUN}
    run.update(n=n, instances_per_batch=loader.batch_size, num_workers=loader.num_workers,
               examples=len(loader.dataset), num_processes=num_processes,
               device_type=device_type, mixed_precision=mixed_precision,
               loss_fn=f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', repr(loss_fn))}")
    return run


def _refuse_existing(root: Path | None, cfg: TrainConfig) -> list[Path]:
    """The checkpoints under ``root``; a ValueError if there are some and ``cfg.resume`` is False."""
    existing = list_checkpoints(root)
    if existing and not cfg.resume:
        raise ValueError(
            f"checkpoint_dir {root} already holds checkpoints ({', '.join(p.name for p in existing)}) and resume=False: "
            "a new run there would be mixed with the old one. Delete the folder, or choose another checkpoint_dir."
        )
    return existing


def _world_size() -> int:
    """The number of processes of the distributed run this process belongs to (1: none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def train(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    cfg: TrainConfig,
    n: int,
    loss_fn: Callable[[nn.Module, object, int], Tensor | dict] = classification_loss,
    *,
    collate_fn: Callable | None = None,
    accelerator: Accelerator | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data`` (instances) multiplexed N at a time for ``cfg.max_steps`` steps.

    ``train_data`` is a dataset of instances (``(x, label)`` pairs or dicts of tensors, batched
    by ``collate_fn``) or a DataLoader over one. ``loss_fn(model, batch, n)`` returns the loss,
    or a dict of named terms with the total under ``"loss"`` (:mod:`mux.losses`); a ``loss_fn``
    with a ``set_step(step, max_steps)`` method is told the step before each one (a schedule
    that depends on progress then resumes exactly, since the step is checkpointed).
    ``accelerator``: an existing Accelerator to use (then ``cfg.mixed_precision`` and
    ``cfg.cpu`` are its business); it must hold no other prepared objects, since its
    checkpoints would save them too. What ``train`` prepares is released when it returns.
    ``eval_fn(model) -> {name: number}``: called every ``cfg.eval_every`` steps and after the
    last step, on every process, with the model in eval mode and the RNG states put back
    afterwards (so it changes nothing in the training run); its results, with their step, are
    kept in ``TrainResult.evaluations`` and in the checkpoints, e.g. a held-out accuracy curve
    (``lambda m: mux.evaluate(m, val_data, n)``).

    Resumes from ``cfg.checkpoint_dir`` when it holds a checkpoint of this model and run
    (``cfg.resume``); raises ValueError, naming what differs, when it holds another's.

    ``cfg.num_processes`` K > 1 from a single process: trains in K worker processes started
    here (see :class:`TrainConfig` and :mod:`mux.launch`); everything passed must then be
    picklable by ``cloudpickle``. The returned ``model`` is the one passed in, holding the
    trained weights; the other fields are those of the workers' run.
    """
    check_n(n)
    if cfg.num_processes > 1:
        world = _world_size()
        if world == 1:
            if accelerator is not None:
                raise ValueError(f"num_processes={cfg.num_processes} trains in new worker processes, which cannot "
                                 "use an Accelerator of this one: leave accelerator=None (or num_processes=1)")
            from .launch import train_in_processes

            return train_in_processes(model, train_data, cfg, n, loss_fn=loss_fn, collate_fn=collate_fn,
                                      eval_fn=eval_fn)
        if world != cfg.num_processes:
            raise ValueError(
                f"TrainConfig(num_processes={cfg.num_processes}), but this process is one of {world} started by "
                f"torchrun or accelerate launch: set num_processes={world} (or 1, which accepts what the launcher "
                f"started), or launch {cfg.num_processes} processes."
            )
    started = time.perf_counter()
    fingerprint = model_fingerprint(model)
    if accelerator is None:
        accelerator = _make_accelerator(cfg)
    elif accelerator._models or accelerator._optimizers:
        raise ValueError("the accelerator passed to train() already holds prepared models or optimizers; "
                         "its checkpoints would mix them with this run's")
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    existing = _refuse_existing(root, cfg)
    loader, sampler, generator = _build_loader(train_data, cfg, n, collate_fn)
    run = _run_identity(cfg, n, loader, loss_fn, accelerator.num_processes, accelerator.device.type,
                        accelerator.mixed_precision)

    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=_no_weight_decay_names(model))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    prepared = accelerator.prepare(model, optimizer, loader, scheduler)
    model, optimizer, loader, scheduler = prepared

    step, history, evaluations, resumed_from = 0, [], [], None
    if root is not None and cfg.resume:
        for ckpt, state in _readable_checkpoints(root, "train"):
            _check_fingerprint(state.get("fingerprint", {}), model, ckpt)
            _check_run(state.get("run"), run, ckpt)
            try:
                accelerator.load_state(str(ckpt))
            except _UNREADABLE as err:
                warnings.warn(f"train: cannot load {ckpt} ({err}); trying an older checkpoint", stacklevel=2)
                continue
            step, history, resumed_from = state["step"], state["history"], state["step"]
            evaluations = state.get("evaluations", [])
            break
        else:
            if existing:
                warnings.warn(f"train: no checkpoint in {root} could be loaded; starting from step 0", stacklevel=2)

    def micro_batches(position: int):
        """Every micro-batch from ``position`` on, across epochs."""
        epoch, skip = divmod(position, len(loader))
        while True:
            sampler.set_epoch(epoch)
            loader.set_epoch(epoch)
            generator.manual_seed(_epoch_seed(cfg.seed, epoch, stream=1))
            yield from accelerator.skip_first_batches(loader, skip) if skip else loader
            epoch, skip = epoch + 1, 0

    accum = cfg.grad_accum_steps
    stream = micro_batches(step * accum)
    # at most two updates a second, the loss shown at the next one: in a notebook each update
    # is a message to the front end, and a cell that trains many models must not flood the
    # kernel's output channel (a client that reads it only when the cell ends loses messages)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.description, leave=False, mininterval=0.5,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    last_saved, totals, counted, updating, rng = resumed_from, {}, 0, False, None

    def checkpoint_state() -> dict:
        return {"history": history, "evaluations": evaluations, "fingerprint": fingerprint, "run": run,
                "train_config": asdict(cfg)}

    def run_eval() -> None:
        if eval_fn is None or (evaluations and evaluations[-1]["step"] == step):
            return
        snapshot = _rng_snapshot()
        inner = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
        inner.eval()
        try:
            with torch.no_grad():
                values = eval_fn(inner)
        finally:
            inner.train()
            _rng_restore(snapshot)
        if not isinstance(values, Mapping):
            raise TypeError(f"eval_fn must return a dict of numbers, got {type(values).__name__}")
        evaluations.append({"step": step, **{k: float(v) for k, v in values.items()}})

    try:
        with _StopRequest() as stop, _deterministic(cfg.deterministic):
            while step < cfg.max_steps:
                model.train()
                rng = _rng_snapshot()  # to save a consistent state if interrupted before the update
                if hasattr(loss_fn, "set_step"):  # a loss whose mixing follows a schedule (MultiInputLoss)
                    loss_fn.set_step(step, cfg.max_steps)
                for micro in range(accum):
                    with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
                        terms = _loss_terms(loss_fn(model, next(stream), n))
                        accelerator.backward(terms["loss"] / accum)
                    for k, v in terms.items():
                        totals[k] = totals.get(k, 0.0) + v.detach().float() / accum
                updating = True  # from here until the step counter moves, the state is between steps
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                updating = False
                counted += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    names = sorted(totals)
                    means = accelerator.reduce(torch.stack([totals[k] for k in names]) / counted, "mean").tolist()
                    entry = {"step": step, "lr": scheduler.get_last_lr()[0], **dict(zip(names, means))}
                    history.append(entry)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k in totals}, refresh=False)
                    totals, counted = {}, 0
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.max_steps:
                    run_eval()
                if root is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    _save(accelerator, root, step, checkpoint_state(), cfg.keep_checkpoints)
                    last_saved = step
                requested = stop.requested
                if accelerator.num_processes > 1:  # every process stops after the same step
                    flag = torch.tensor(float(requested), device=accelerator.device)
                    requested = accelerator.reduce(flag, "sum").item() > 0
                if requested and step < cfg.max_steps:
                    if root is not None and step != last_saved:
                        _save(accelerator, root, step, checkpoint_state(), cfg.keep_checkpoints)
                    raise KeyboardInterrupt(f"training interrupted after step {step}"
                                            + (f"; checkpoint saved in {root}" if root is not None else ""))
        run_eval()  # a run resumed at its last step has not been evaluated there yet
        if root is not None and step != last_saved:
            _save(accelerator, root, step, checkpoint_state(), cfg.keep_checkpoints)
    except KeyboardInterrupt as err:
        # Raised by a second Ctrl-C, or where no handler could be installed (not the main
        # thread). Before the update began the state is that of the end of the last step
        # (once the RNGs are rewound): save it. During the update it is neither: keep the
        # last checkpoint. Under several processes the others are not stopping: never save.
        if root is not None and step != last_saved and not str(err).startswith("training interrupted"):
            if not updating and rng is not None and accelerator.num_processes == 1:
                _rng_restore(rng)
                _save(accelerator, root, step, checkpoint_state(), cfg.keep_checkpoints)
            else:
                print(f"\nStopped during an update: not saved; the newest checkpoint is step {last_saved or 0}",
                      file=sys.stderr, flush=True)
        raise
    finally:
        bar.close()
        # hand the caller's model back without Accelerate's autocast wrapper, and make the
        # accelerator forget this run's model, optimiser, loader and scheduler
        bare = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        accelerator.free_memory()
    return TrainResult(
        model=bare,
        steps=step,
        history=history,
        evaluations=evaluations,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        device=str(accelerator.device),
        num_processes=accelerator.num_processes,
        is_main_process=accelerator.is_main_process,
    )
