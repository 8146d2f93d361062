"""One training loop for every chapter, built on Hugging Face Accelerate.

The same code runs on a CPU, one GPU, or several GPUs under ``accelerate launch`` or
``torchrun`` (``batch_size`` is then per process), with bf16 autocast where the GPU supports
it natively. It seeds everything, shows a tqdm progress bar, writes a checkpoint every
``checkpoint_every`` steps, at the end and when stopped, and resumes from the newest complete
checkpoint of the same run (:mod:`mux.training.checkpoints`).

What a step is. One step is one optimiser update: ``grad_accum_steps`` micro-batches of
``batch_size`` instances (whole tuples of N), gradients clipped to ``max_grad_norm`` when it
is set. Weight decay applies to weight matrices only. The loss function returns one tensor or
a dict of named terms (:mod:`mux.losses`); every term is averaged over the steps between two
log lines and kept in the history.

Exact resume. The data order of every epoch is fixed by ``(seed, epoch)``
(:mod:`mux.training.data`), a resumed run skips the batches its epoch already used, and the
RNG states are saved with every checkpoint. So a resumed run ends with the same weights as an
uninterrupted one, bit for bit on a CPU. On a GPU that needs ``deterministic=True`` and the
same precision; with bf16 the two runs agree to rounding.

Stopping. Ctrl-C or SIGTERM lets the step in flight finish, saves a checkpoint and raises
:class:`~mux.training.interrupt.TrainingInterrupted`; a second one stops at once. A
``KeyboardInterrupt`` that arrives otherwise (a second Ctrl-C, a thread without signal
handlers) saves the last complete step if it came before the update began.

Several processes from a notebook: ``TrainConfig(num_processes=K)``, called outside a
distributed run, hands the whole call to the course's process launcher (``mux.runner.launch``),
which runs this same function in K workers under ``torchrun`` and loads the result into the
caller's model.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..env import return_freed_memory
from ..grouping import check_n
from ..losses import classification_loss
from .checkpoints import Progress, model_fingerprint, refuse_existing, resume, run_identity, save_checkpoint
from .config import TrainConfig, TrainResult
from .data import build_loader, micro_batches
from .interrupt import StopRequest, TrainingInterrupted
from .parts import (ProgressReport, adamw, deterministic_algorithms, hands_over, loss_terms, make_accelerator,
                    process_launcher, rng_restore, rng_snapshot, seed_everything, start_tracking, tf32_matmuls)

__all__ = ["train"]


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

    ``train_data``: a dataset of instances (``(x, label)`` pairs or dicts of tensors, batched by
    ``collate_fn``) or a DataLoader over one. ``loss_fn(model, batch, n)``: the loss, or a dict of
    named terms with the total under ``"loss"``; one with a ``set_step(step, max_steps)`` method
    is told the step before each one. ``accelerator``: an existing one, holding nothing prepared.
    ``eval_fn(model) -> {name: number}``: run every ``cfg.eval_every`` steps and after the last,
    in eval mode, with the RNG states put back afterwards; kept in ``TrainResult.evaluations``.
    """
    check_n(n)
    if hands_over(cfg, accelerator):
        return process_launcher()(model, train_data, cfg, n, loss_fn=loss_fn, collate_fn=collate_fn, eval_fn=eval_fn)
    started, fingerprint = time.perf_counter(), model_fingerprint(model)
    accelerator = make_accelerator(cfg, accelerator)
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    existing = refuse_existing(root, cfg)
    loader, sampler, generator = build_loader(train_data, cfg, n, collate_fn)
    run = run_identity(cfg, n, loader, loss_fn, accelerator.num_processes, accelerator.device.type,
                       accelerator.mixed_precision)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    optimizer = adamw(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    p = resume(accelerator, model, root, run, existing) if root is not None and cfg.resume else Progress()
    model = ready_to_run(accelerator, model, cfg, root, run, p)
    record = {"fingerprint": fingerprint, "run": run, "train_config": asdict(cfg)}
    save = lambda: save_checkpoint(accelerator, root, p, record, cfg.keep_checkpoints)  # noqa: E731

    accum = cfg.grad_accum_steps
    batches = micro_batches(accelerator, loader, sampler, generator, cfg.seed, p.step * accum)
    # at most two bar updates a second: in a notebook each is a message to the front end
    bar = tqdm(total=cfg.max_steps, initial=p.step, desc=cfg.description, leave=False, mininterval=0.5,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    totals, counted, updating, rng = {}, 0, False, None
    report = ProgressReport(cfg, p.step, accelerator.is_main_process)  # plain lines for logs (see parts.py)
    try:
        with StopRequest() as stop, deterministic_algorithms(cfg.deterministic), tf32_matmuls(cfg.tf32):
            while p.step < cfg.max_steps:
                model.train()
                rng = rng_snapshot()  # to save a consistent state if interrupted before the update
                if hasattr(loss_fn, "set_step"):  # a loss whose mixing follows a schedule (MultiInputLoss)
                    loss_fn.set_step(p.step, cfg.max_steps)
                for micro in range(accum):
                    with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
                        terms = loss_terms(loss_fn(model, next(batches), n))
                        accelerator.backward(terms["loss"] / accum)
                    for k, v in terms.items():
                        totals[k] = totals.get(k, 0.0) + v.detach().float() / accum
                updating = True  # from here until the step counter moves, the state is between steps
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                p.step, updating, counted = p.step + 1, False, counted + 1
                if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
                    log_means(accelerator, totals, counted, p, scheduler.get_last_lr()[0], bar)
                    totals, counted = {}, 0
                bar.update(1)
                report.step(p.step, p.history, scheduler.get_last_lr()[0])
                if cfg.eval_every and p.step % cfg.eval_every == 0 or p.step == cfg.max_steps:
                    evaluate_in_place(accelerator, model, eval_fn, p, report)
                if root is not None and cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                    save()
                if stop.agreed(accelerator) and p.step < cfg.max_steps:
                    if root is not None and p.step != p.last_saved:
                        save()
                    raise TrainingInterrupted(p.step, root)
        with tf32_matmuls(cfg.tf32):  # a run resumed at its last step (or evaluate_only) is evaluated here
            evaluate_in_place(accelerator, model, eval_fn, p, report)
        if root is not None and p.step != p.last_saved:
            save()
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # a second signal, or no handler (not the main thread)
        if root is not None and p.step != p.last_saved:
            save_between_steps(accelerator, save, p, None if updating else rng)
        raise
    finally:
        bar.close()
        # the caller's model without Accelerate's autocast wrapper or torch.compile's; the accelerator forgets this run
        bare = accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)
        for tracker in accelerator.trackers:  # not end_training(): that also ends a torchrun's process group
            tracker.finish()
        forget_run(accelerator)
    return TrainResult(model=bare, steps=p.step, history=p.history, evaluations=p.evaluations,
                       resumed_from=p.resumed_from, seconds=time.perf_counter() - started,
                       device=str(accelerator.device), num_processes=accelerator.num_processes,
                       is_main_process=accelerator.is_main_process)


def forget_run(accelerator: Accelerator) -> None:
    """The accelerator drops its references to the run's model, optimiser and loaders (and collects garbage);
    the memory they held goes back to the operating system (:func:`mux.env.return_freed_memory`)."""
    accelerator.free_memory()
    return_freed_memory()


def ready_to_run(accelerator: Accelerator, model: nn.Module, cfg: TrainConfig, root: Path | None, run: dict,
                 p: Progress) -> nn.Module:
    """The run-time switches, once the run is prepared and resumed: ``evaluate_only`` refuses a run without
    its final checkpoint, ``compile`` wraps the model in ``torch.compile`` (checkpoints keep saving the
    prepared module underneath, Accelerate's own reference), and the trackers open this run."""
    if cfg.evaluate_only and p.step != cfg.max_steps:
        accelerator.free_memory()
        raise ValueError(f"evaluate_only: {root} holds no final checkpoint of this run (newest: step {p.step} of "
                         f"{cfg.max_steps}); train it first (without evaluate_only / --evaluate)")
    if cfg.compile:
        model = torch.compile(model, backend=cfg.compile)
    start_tracking(accelerator, cfg, run)
    return model


def save_between_steps(accelerator: Accelerator, save, p: Progress, rng) -> None:
    """At an immediate stop: before the update began (``rng``, the step's starting RNG states, given)
    the state is that of the last step's end once the RNGs are rewound, so save it; during the
    update it is neither. Under several processes the others are not stopping: never save."""
    if rng is not None and accelerator.num_processes == 1:
        rng_restore(rng)
        save()
    else:
        print(f"\nStopped during an update: not saved; the newest checkpoint is step {p.last_saved or 0}",
              file=sys.stderr, flush=True)


def log_means(accelerator: Accelerator, totals: dict, counted: int, p: Progress, lr: float, bar) -> None:
    """Append the mean of every loss term since the last log line (over every process) to the history."""
    names = sorted(totals)
    means = accelerator.reduce(torch.stack([totals[k] for k in names]) / counted, "mean").tolist()
    p.history.append({"step": p.step, "lr": lr, **dict(zip(names, means))})
    if accelerator.log_with:
        accelerator.log({"lr": lr, **{f"train/{k}": v for k, v in zip(names, means)}}, step=p.step)
    bar.set_postfix({k: f"{v:.3f}" for k, v in zip(names, means)}, refresh=False)


def evaluate_in_place(accelerator: Accelerator, model: nn.Module, eval_fn, p: Progress,
                      report: ProgressReport | None = None) -> None:
    """``eval_fn`` on the model at step ``p.step`` (once per step), in eval mode, RNG states put back after."""
    if eval_fn is None or (p.evaluations and p.evaluations[-1]["step"] == p.step):
        return
    snapshot = rng_snapshot()
    inner = accelerator.unwrap_model(model, keep_fp32_wrapper=True)
    inner.eval()
    try:
        with torch.no_grad():
            values = eval_fn(inner)
    finally:
        inner.train()
        rng_restore(snapshot)
    if not isinstance(values, Mapping):
        raise TypeError(f"eval_fn must return a dict of numbers, got {type(values).__name__}")
    p.evaluations.append({"step": p.step, **{k: float(v) for k, v in values.items()}})
    if accelerator.log_with:
        accelerator.log({f"eval/{k}": float(v) for k, v in values.items()}, step=p.step)
    if report is not None:
        report.evaluation(p.step, p.evaluations[-1])
