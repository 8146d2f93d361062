"""Losses: one home for every training objective of the course.

A loss function has the signature ``loss_fn(model, batch, n)`` and returns either one
scalar tensor, or a dict of named scalar tensors whose ``"loss"`` entry is the total that
is minimised (the other entries are logged beside it by :func:`mux.train`, e.g.
``{"loss": ce + retrieval, "ce": ce, "retrieval": retrieval}``).

``batch`` is what the data loader yields: ``(x, labels)`` pairs or a dict of tensors with
a ``labels`` entry (see :mod:`mux.evaluate`); ``n`` is the number of instances per tuple.
"""
from __future__ import annotations

from torch import Tensor, nn

from .evaluate import IGNORE_INDEX, logits_of, split_batch
from .grouping import multiplexed_forward

__all__ = ["classification_loss"]


def classification_loss(model: nn.Module, batch, n: int) -> Tensor:
    """Cross-entropy of a multiplexed classifier over the real instances of a batch.

    One label per example (logits ``(M, C)``) or per token (logits ``(M, L, C)``, labels
    ``(M, L)`` with ``IGNORE_INDEX`` where nothing is scored). The copies that pad the last
    tuple of a batch are dropped before the loss, so every example counts once.
    """
    inputs, labels = split_batch(batch)
    logits = logits_of(multiplexed_forward(model, inputs, n))
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
