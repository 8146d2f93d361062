"""Grouping a batch of instances into tuples of N, and back.

Every method in the course sees its input as ``(B, N, ...)``: B tuples, each holding N
instances that will share one pass through the backbone. A data loader yields a flat batch
``(B * N, ...)`` of instances; :func:`group` and :func:`ungroup` convert between the two
views, and :func:`pad_to_multiple` implements the remainder policy used everywhere in the
course: when a batch does not divide into tuples of N, it is padded with copies of its own
instances, and the outputs of those copies are dropped (:func:`multiplexed_forward`).

A batch is either one tensor (images) or a dict of tensors that share their first dimension
(text: ``input_ids``, ``attention_mask``, ``labels``, as a ``transformers`` collator makes
them). Every function here maps over the tensors of a dict in the same way, so the instances
of one tuple stay aligned across keys. Combining the N attention masks of a tuple is the
multiplexer's business (a position of the mixture is real where at least one instance has a
real token: :func:`union_mask`).

**The batch protocol** that evaluation, losses, models and data share: a batch is ``(x, labels)``
or a dict with a ``labels`` key (:func:`split_batch`); a model returns logits or an output with a
``logits`` entry (:func:`logits_of`); a label of :data:`IGNORE_INDEX` (-100, as in ``transformers``
and ``torch.nn.CrossEntropyLoss``) marks a position that is not scored (padding, unlabelled tokens).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "attention_padding",
    "IGNORE_INDEX",
    "split_batch",
    "logits_of",
    "check_n",
    "check_positive",
    "group",
    "ungroup",
    "pad_to_multiple",
    "batch_size_of",
    "union_mask",
    "multiplexed_forward",
]


IGNORE_INDEX = -100  # label of positions that are not scored (padding, unlabelled tokens)


def split_batch(batch) -> tuple[object, Tensor]:
    """``(inputs, labels)`` of a batch: ``(x, y)`` pairs, or a dict with a ``labels`` key."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise KeyError(f"a dict batch needs a 'labels' entry to be scored; it has keys {list(batch)}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"expected a batch (inputs, labels) or a dict with 'labels', got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def logits_of(output) -> Tensor:
    """The logits of a model output: the tensor itself, or its ``logits`` entry."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise KeyError(f"the model output ({type(output).__name__}) has no 'logits' entry")
    return logits


def check_positive(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0 (not a bool), else a ValueError that names ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_n(n: object, name: str = "N", minimum: int = 1) -> int:
    """Return ``n`` if it is an integer >= ``minimum`` (not a bool), else raise a ValueError that says so."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        what = "N (instances multiplexed together)" if name == "N" else name
        raise ValueError(f"{what} must be an integer >= {minimum}, got {n!r}")
    return n


def _map(batch, fn):
    """Apply ``fn`` to a tensor, or to every tensor of a dict (other values are kept)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in batch.items()}
    raise TypeError(f"expected a tensor or a dict of tensors, got {type(batch).__name__}")


def batch_size_of(batch) -> int:
    """Number of instances in a flat batch (a tensor, or a dict of tensors sharing dim 0)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("a batch must have a first (instance) dimension, got a scalar tensor")
        return batch.shape[0]
    if isinstance(batch, Mapping):
        sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0}
        if not sizes:
            raise ValueError(f"a dict batch needs at least one tensor, got keys {list(batch)}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the tensors of a dict batch must share their first dimension, got sizes {sizes}")
        return next(iter(sizes.values()))
    raise TypeError(f"expected a tensor or a dict of tensors, got {type(batch).__name__}")


def group(x, n: int):
    """Split a flat batch into tuples of N consecutive instances: ``(B*N, ...) -> (B, N, ...)``.

    ``x`` is a tensor or a dict of tensors (each one grouped the same way). Raises ValueError
    when the batch size is not a multiple of N; use :func:`pad_to_multiple` first (or drop
    the remainder) in that case.
    """
    check_n(n)
    size = batch_size_of(x)
    if size % n:
        raise ValueError(
            f"batch of {size} instances cannot be split into tuples of N={n}; "
            "pad with mux.pad_to_multiple or drop the remainder"
        )
    return _map(x, lambda t: t.reshape(size // n, n, *t.shape[1:]))


def ungroup(x):
    """Inverse of :func:`group`: ``(B, N, ...) -> (B*N, ...)``, instance order preserved."""

    def one(t: Tensor) -> Tensor:
        if t.dim() < 2:
            raise ValueError(f"expected a grouped tensor of shape (B, N, ...), got shape {tuple(t.shape)}")
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

    return _map(x, one)


def pad_to_multiple(x, n: int):
    """Pad a flat batch ``(M, ...)`` with copies of its own instances to a multiple of N.

    Copies are taken cyclically from the start of the batch, so even a batch of one
    instance can fill a tuple; in a dict batch every tensor gets the same copies.
    Returns ``(padded, M)``: keep the first M outputs.
    """
    check_n(n)
    m = batch_size_of(x)
    if m == 0:
        raise ValueError("cannot pad an empty batch: there is no instance to copy")
    missing = (-m) % n
    if missing == 0:
        return x, m
    idx = torch.arange(missing) % m
    return _map(x, lambda t: torch.cat([t, t[idx.to(t.device)]], dim=0)), m


def union_mask(mask: Tensor) -> Tensor:
    """The attention mask of a mixture: ``(B, N, L) -> (B, L)``, 1 where any instance has a real token.

    A position where every instance is padding carries no information and is never attended.
    """
    if mask.dim() < 3:
        raise ValueError(f"expected grouped masks (B, N, L), got shape {tuple(mask.shape)}")
    return (mask != 0).any(dim=1).to(mask.dtype)


def attention_padding(mask: Tensor | None) -> Tensor | None:
    """A padding mask as handed to ``transformers``' attention-mask builders; ``None`` on the meta
    device, where a model is only being measured (``mux.count_macs`` on a model built there):
    the builders ask whether the mask is all ones, which a meta tensor cannot answer."""
    return None if mask is None or mask.device.type == "meta" else mask


def _outputs_as_dict(out) -> tuple[dict, type | None]:
    if isinstance(out, Mapping):  # includes transformers' ModelOutput
        return dict(out), type(out)
    if is_dataclass(out) and not isinstance(out, type):
        return {f.name: getattr(out, f.name) for f in fields(out)}, type(out)
    raise TypeError(
        f"a multiplexed model must return a tensor (B, N, ...), a dict or a dataclass of such tensors; "
        f"got {type(out).__name__}"
    )


def multiplexed_forward(model: nn.Module, x, n: int):
    """Run a multiplexed model on a flat batch of any size, one output per instance.

    ``x``: ``(M, ...)`` instances, a tensor or a dict of tensors. The batch is padded to a
    multiple of N with copies and grouped into ``(ceil(M/N), N, ...)``; a tensor is passed as
    ``model(x)``, a dict as ``model(**x)``. The model returns ``(B, N, ...)``, or a dict /
    dataclass (e.g. a ``transformers`` ``ModelOutput``) whose tensors are ``(B, N, ...)``;
    every such tensor is ungrouped and the outputs of the padding copies are dropped.
    Scalars (0-dim tensors, e.g. an auxiliary loss) and ``None`` pass through unchanged.
    Returns outputs of ``M`` instances, in the order of ``x``, in the model's output type.
    """
    padded, m = pad_to_multiple(x, n)
    b = batch_size_of(padded) // n
    grouped = group(padded, n)
    out = model(**grouped) if isinstance(grouped, Mapping) else model(grouped)

    def per_instance(key: str, t):
        if t is None or not isinstance(t, Tensor) or t.dim() == 0:
            return t
        if t.dim() < 2 or tuple(t.shape[:2]) != (b, n):
            what = f"model output {key}" if key else "the model's output"
            raise ValueError(f"{what} must be (B={b}, N={n}, ...): a multiplexed model must return one output "
                             f"per instance; got shape {tuple(t.shape)}")
        return ungroup(t)[:m]

    if isinstance(out, Tensor):
        return per_instance("", out)
    values, kind = _outputs_as_dict(out)
    values = {k: per_instance(repr(k), v) for k, v in values.items()}
    return values if kind is dict else kind(**values)
