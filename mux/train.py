"""One training loop for every chapter, built on Hugging Face Accelerate.

The same code runs on a CPU, one GPU, or several GPUs under ``accelerate launch`` or
``torchrun`` (``batch_size`` is then per process), with bf16 autocast where the GPU
supports it. It seeds everything, shows a tqdm progress bar, writes a checkpoint every
``checkpoint_every`` steps, at the end and on Ctrl-C, and resumes from the newest complete
checkpoint. Data order depends only on ``(seed, epoch)``, and a resumed run skips the
batches already used in its epoch, so a resumed run ends with the same weights as an
uninterrupted one.

A checkpoint is a folder ``checkpoint-<step>`` written by ``Accelerator.save_state``
(model, optimiser, scheduler, RNG states) plus ``trainer_state.json`` (step, history, the
model's fingerprint). It is written under a temporary name and renamed when complete, so
an interruption never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .grouping import check_n, multiplexed_forward

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "classification_loss",
    "seed_everything",
    "model_fingerprint",
    "latest_checkpoint",
    "load_weights",
]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): ``accelerate.utils.set_seed``."""
    set_seed(seed)


@dataclass
class TrainConfig:
    """Knobs of :func:`train`. ``batch_size`` counts instances (per process), so a step sees
    ``batch_size // N`` multiplexed tuples."""

    max_steps: int = 500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (and on interruption)
    keep_checkpoints: int = 2
    resume: bool = True
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that supports it, else full precision
    cpu: bool = False  # force the CPU even when a GPU is present
    progress: bool = True
    log_every: int = 10
    description: str = "train"

    def __post_init__(self):
        check_n(self.max_steps, name="max_steps")
        check_n(self.batch_size, name="batch_size")
        check_n(self.log_every, name="log_every")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} every log_every steps
    resumed_from: int | None = None
    seconds: float = 0.0
    device: str = "cpu"
    num_processes: int = 1
    is_main_process: bool = True  # under several processes, only the main one should write results


def classification_loss(model: nn.Module, batch, n: int) -> Tensor:
    """Cross-entropy of a multiplexed classifier over the real instances of a batch."""
    x, y = batch
    logits = multiplexed_forward(model, x, n)
    return nn.functional.cross_entropy(logits.float(), y)


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model for resuming: class, config and parameter shapes."""
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps({
        "class": type(model).__name__,
        "config": config,
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }, default=str))


def latest_checkpoint(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder under ``checkpoint_dir``, or None."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


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


def load_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a training checkpoint's weights into ``model`` (checks it is the same model)."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint found at {path} (expected a checkpoint-<step> folder)")
        path = latest
    state = json.loads((path / STATE_FILE).read_text())
    _check_fingerprint(state["fingerprint"], model, path)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model


def _resolve_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if not cfg.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _save(accelerator: Accelerator, cfg: TrainConfig, step: int, history: list, fingerprint: dict) -> Path:
    root = Path(cfg.checkpoint_dir)
    final, tmp = root / f"checkpoint-{step:08d}", root / f"checkpoint-{step:08d}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state = {"step": step, "history": history, "fingerprint": fingerprint, "train_config": asdict(cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name))
        for old in kept[: max(0, len(kept) - max(1, cfg.keep_checkpoints))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def train(
    model: nn.Module,
    train_data: Dataset,
    cfg: TrainConfig,
    n: int,
    loss_fn: Callable[[nn.Module, object, int], Tensor] = classification_loss,
) -> TrainResult:
    """Train ``model`` on ``train_data`` (instances) multiplexed N at a time for ``cfg.max_steps`` steps.

    Resumes from ``cfg.checkpoint_dir`` when it holds a checkpoint of the same model
    (``cfg.resume``); raises ValueError when it holds a different model's.
    """
    check_n(n)
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    started = time.perf_counter()
    fingerprint = model_fingerprint(model)
    accelerator = Accelerator(
        mixed_precision=_resolve_precision(cfg),
        cpu=cfg.cpu,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    per_batch = max(n, cfg.batch_size // n * n)  # whole tuples; only an epoch's last batch pads
    loader = DataLoader(train_data, batch_size=per_batch, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step, history, resumed_from = 0, [], None
    ckpt = latest_checkpoint(cfg.checkpoint_dir) if cfg.resume else None
    if ckpt is not None:
        state = json.loads((ckpt / STATE_FILE).read_text())
        _check_fingerprint(state["fingerprint"], accelerator.unwrap_model(model), ckpt)
        accelerator.load_state(str(ckpt))
        step, history, resumed_from = state["step"], state["history"], state["step"]

    steps_per_epoch = len(loader)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.description, leave=False,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    last_saved = resumed_from
    try:
        while step < cfg.max_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
                model.train()
                loss = loss_fn(model, batch, n)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    value = accelerator.reduce(loss.detach().float(), "mean").item()
                    history.append({"step": step, "loss": value, "lr": scheduler.get_last_lr()[0]})
                    bar.set_postfix(loss=f"{value:.3f}")
                bar.update(1)
                if cfg.checkpoint_dir and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    _save(accelerator, cfg, step, history, fingerprint)
                    last_saved = step
                if step >= cfg.max_steps:
                    break
    except KeyboardInterrupt:
        if cfg.checkpoint_dir and step != last_saved:
            _save(accelerator, cfg, step, history, fingerprint)
        raise
    finally:
        bar.close()
    if cfg.checkpoint_dir and step != last_saved:
        _save(accelerator, cfg, step, history, fingerprint)
    return TrainResult(
        model=accelerator.unwrap_model(model),
        steps=step,
        history=history,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        device=str(accelerator.device),
        num_processes=accelerator.num_processes,
        is_main_process=accelerator.is_main_process,
    )
