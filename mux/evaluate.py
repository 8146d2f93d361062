"""Evaluation that counts every example, for any N and any dataset size.

Examples are grouped into tuples in dataset order (instances 0..N-1 form the first tuple,
and so on); the last, incomplete tuple is padded with copies whose outputs are dropped.
The result is exactly one prediction per example, in dataset order.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .grouping import check_n, multiplexed_forward

__all__ = ["predict_logits", "predict", "evaluate"]


def _loader(data: Dataset, n: int, batch_size: int) -> DataLoader:
    check_n(batch_size, name="batch_size")
    size = max(n, batch_size // n * n)  # whole tuples per batch: only the last batch pads
    return DataLoader(data, batch_size=size, shuffle=False)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset, n: int, batch_size: int = 256, device=None) -> tuple[Tensor, Tensor]:
    """Return ``(logits (M, classes), labels (M,))`` for all M examples of ``data``, in order."""
    check_n(n)
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in _loader(data, n, batch_size):
            logits.append(multiplexed_forward(model, x.to(device), n).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def predict(model: nn.Module, data: Dataset, n: int, batch_size: int = 256, device=None) -> Tensor:
    """Predicted class of every example of ``data``, in dataset order: shape ``(len(data),)``."""
    logits, _ = predict_logits(model, data, n, batch_size, device)
    return logits.argmax(dim=-1)


def evaluate(model: nn.Module, data: Dataset, n: int, batch_size: int = 256, device=None) -> dict:
    """Accuracy and cross-entropy over every example: ``{"accuracy", "loss", "n_examples"}``."""
    logits, labels = predict_logits(model, data, n, batch_size, device)
    return {
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "n_examples": int(labels.numel()),
    }
