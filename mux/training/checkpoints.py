"""Checkpoints of a training run: written atomically, found, checked to belong to this run, resumed, loaded.

A checkpoint is a folder ``checkpoint-<step>`` written by ``Accelerator.save_state`` (model,
optimiser, scheduler, RNG states of every process) plus ``trainer_state.json``. It is written
under a temporary name, flushed to disk and renamed only when every process has finished
writing, so an interruption never leaves a half-written checkpoint that looks complete. If the
newest checkpoint cannot be read (a truncated file), resuming and :func:`load_weights` fall
back to the previous one with a warning.

Which run a checkpoint belongs to. It stores the model's fingerprint (class, configuration,
parameter shapes) and the run's identity (seed, learning rate, steps, batch, N, number of
processes, precision, ...). Resuming refuses a checkpoint of another model or another run and
names what differs; only the display and the checkpointing knobs may change between the two
(:data:`NOT_PART_OF_THE_RUN`).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from safetensors import SafetensorError
from torch import nn

from ..reporting import sync_folder
from .config import TrainConfig

__all__ = ["CHECKPOINT_RE", "STATE_FILE", "NOT_PART_OF_THE_RUN", "UNREADABLE", "Progress", "bare_model",
           "model_fingerprint", "run_identity", "list_checkpoints", "latest_checkpoint", "readable_checkpoints",
           "refuse_existing", "check_same_model", "check_same_run", "save_checkpoint", "resume", "load_weights"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# TrainConfig fields that may differ between a run and its resumption: they change neither
# the computation nor its result (display, and where and how often checkpoints are written).
NOT_PART_OF_THE_RUN = ("progress", "description", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume",
                       "eval_every",
                       # replaced by what they resolve to (device type, precision, instances per batch, workers)
                       "cpu", "mixed_precision", "batch_size", "num_workers",
                       # the run records the number of processes it actually has (1 to K under torchrun)
                       "num_processes",
                       # how the run is watched, compiled or used: the same steps and weights
                       "tracker", "tracker_dir", "compile", "evaluate_only")
# what a checkpoint that cannot be read raises, depending on which file is damaged
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, json.JSONDecodeError, pickle.UnpicklingError,
              SafetensorError)
_VERSION_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash",
                 "_attn_implementation_autoset")


@dataclass
class Progress:
    """Where a run stands: what :func:`resume` restores and every checkpoint records."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    last_saved: int | None = None


def bare_model(model: nn.Module) -> nn.Module:
    """The module inside DDP and torch.compile wrappers (its autocast wrapper, if any, stays)."""
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model for resuming: class, configuration and parameter shapes.

    It survives ``torch.compile`` and DDP (the wrappers are removed) and a library upgrade:
    a ``transformers`` configuration contributes only its values that differ from the
    defaults, without version and path entries.
    """
    model = bare_model(model)
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


def run_identity(cfg: TrainConfig, n: int, loader, loss_fn, num_processes: int, device_type: str,
                 mixed_precision: str) -> dict:
    """What a checkpoint records of its run, and must match to be resumed."""
    run = {k: v for k, v in asdict(cfg).items() if k not in NOT_PART_OF_THE_RUN}
    run.update(n=n, instances_per_batch=loader.batch_size, num_workers=loader.num_workers,
               examples=len(loader.dataset), num_processes=num_processes,
               device_type=device_type, mixed_precision=mixed_precision,
               loss_fn=f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', repr(loss_fn))}")
    return run


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


def read_state(path: Path) -> dict:
    """The ``trainer_state.json`` of checkpoint folder ``path``."""
    return json.loads((path / STATE_FILE).read_text())


def readable_checkpoints(root, what: str):
    """Yield ``(path, state)`` newest first, warning (as ``what``) about each unreadable checkpoint skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            yield path, read_state(path)
        except UNREADABLE as err:
            warnings.warn(f"{what}: cannot read {path / STATE_FILE} ({err}); trying an older checkpoint", stacklevel=3)


def refuse_existing(root: Path | None, cfg: TrainConfig) -> list[Path]:
    """The checkpoints under ``root``; a ValueError if there are some and ``cfg.resume`` is False."""
    existing = list_checkpoints(root)
    if existing and not cfg.resume:
        raise ValueError(
            f"checkpoint_dir {root} already holds checkpoints ({', '.join(p.name for p in existing)}) and resume=False: "
            "a new run there would be mixed with the old one. Delete the folder, or choose another checkpoint_dir."
        )
    return existing


def check_same_model(saved: dict, model: nn.Module, where: Path) -> None:
    """A ValueError naming what differs unless ``saved`` is ``model``'s fingerprint."""
    current = model_fingerprint(model)
    if saved != current:
        diff = [k for k in ("class", "config", "shapes") if saved.get(k) != current.get(k)]
        raise ValueError(
            f"checkpoint {where} was written by a different model ({', '.join(diff)} differ): "
            f"saved {saved.get('class')} with config {saved.get('config')}, "
            f"this run builds {current['class']} with config {current['config']}. "
            "Use another checkpoint_dir, or delete this one to start over."
        )


def check_same_run(saved: dict | None, current: dict, where: Path) -> None:
    """A ValueError naming every difference unless the ``saved`` run identity is ``current``."""
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


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folder itself) to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    sync_folder(folder)


def save_checkpoint(accelerator: Accelerator, root: Path, progress: Progress, record: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>`` under ``root`` atomically (every process takes part); keep the newest ``keep``.

    ``record``: what else the state file holds (fingerprint, run identity, configuration)."""
    step = progress.step
    final, tmp = root / f"checkpoint-{step:08d}", root / f"checkpoint-{step:08d}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its files (RNG states) before the rename
    if accelerator.is_main_process:
        state = {"step": step, "history": progress.history, "evaluations": progress.evaluations, **record}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sync_folder(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    progress.last_saved = step
    return final


def resume(accelerator: Accelerator, model: nn.Module, root: Path | None, run: dict, existing: list[Path]) -> Progress:
    """Load the newest readable checkpoint of this model and run under ``root`` into the prepared objects.

    Raises ValueError, naming what differs, at a checkpoint of another model or run; a fresh
    :class:`Progress` when there is none (with a warning if some existed but none loaded)."""
    for ckpt, state in readable_checkpoints(root, "train"):
        check_same_model(state.get("fingerprint", {}), model, ckpt)
        check_same_run(state.get("run"), run, ckpt)
        try:
            accelerator.load_state(str(ckpt))
        except UNREADABLE as err:
            warnings.warn(f"train: cannot load {ckpt} ({err}); trying an older checkpoint", stacklevel=2)
            continue
        return Progress(step=state["step"], history=state["history"], evaluations=state.get("evaluations", []),
                        resumed_from=state["step"], last_saved=state["step"])
    if existing:
        warnings.warn(f"train: no checkpoint in {root} could be loaded; starting from step 0", stacklevel=2)
    return Progress()


def load_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a training checkpoint's weights into ``model`` (checks it is the same model).

    ``checkpoint`` is a ``checkpoint-<step>`` folder or a folder of them (the newest readable
    one is used). Tied weights (e.g. a language model's output layer sharing the embedding)
    are restored by safetensors' model loader.
    """
    from safetensors.torch import load_model

    path = Path(checkpoint)
    candidates = [(path, None)] if (path / STATE_FILE).is_file() else readable_checkpoints(path, "load_weights")
    bare = bare_model(model)
    tried = []
    for ckpt, state in candidates:
        state = state if state is not None else read_state(ckpt)
        check_same_model(state["fingerprint"], bare, ckpt)
        try:
            load_model(bare, str(ckpt / "model.safetensors"), strict=True)
            return model
        except UNREADABLE as err:
            if ckpt == path:
                raise
            tried.append(ckpt.name)
            warnings.warn(f"load_weights: cannot read {ckpt} ({err}); trying an older checkpoint", stacklevel=2)
    raise FileNotFoundError(
        f"no readable checkpoint found at {path} (expected a checkpoint-<step> folder"
        + (f"; unreadable: {', '.join(tried)})" if tried else ")")
    )
