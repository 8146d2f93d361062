"""Stopping a training run cleanly: Ctrl-C (SIGINT) or a scheduler's SIGTERM.

The first signal asks the loop to stop after the step in flight; the loop then saves a
checkpoint and raises :class:`TrainingInterrupted`. A second signal, more than a second after
the first, raises a plain ``KeyboardInterrupt`` at once, without saving (two within a second
are one request: SLURM signals the kernel and the course's runner, which passes it on). SLURM and Kubernetes send SIGTERM before they
kill a job, so a preempted run resumes from the step it was told to stop at.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = ["TrainingInterrupted", "StopRequest"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped after a complete step, at a signal; ``checkpoint_dir`` (if any) holds that step.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it too; tell it from an
    immediate stop (a second Ctrl-C, nothing saved) with ``isinstance``."""

    def __init__(self, step: int | None, checkpoint_dir: str | Path | None, note: str = ""):
        self.step, self.checkpoint_dir = step, checkpoint_dir
        text = "training interrupted" + (f" after step {step}" if step is not None else "")
        if checkpoint_dir is not None:
            text += f"; checkpoint saved in {checkpoint_dir}"
        super().__init__(text + (f"; {note}" if note else ""))


class StopRequest:
    """SIGINT and SIGTERM handlers for the duration of training (:mod:`mux.training.interrupt`).

    Installed only in the main thread (Python delivers signals there); elsewhere Ctrl-C is a
    plain ``KeyboardInterrupt``. :meth:`agreed` is the request as every process sees it."""

    SAME_REQUEST_SECONDS = 1.0  # signals this close together are one request (SLURM and a forwarding runner)

    def __init__(self):
        self.requested, self._previous, self._first = False, {}, 0.0

    def _handler(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first <= self.SAME_REQUEST_SECONDS:
                return  # SLURM signals the kernel and the runner, which passes it on: both are one request
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint (a second signal stops "
              "at once, without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop: under several processes all stop after the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0
