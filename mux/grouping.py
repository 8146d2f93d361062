"""Grouping a batch of instances into tuples of N, and back.

Every method in the course sees its input as ``(B, N, ...)``: B tuples, each holding N
instances that will share one pass through the backbone. A data loader yields a flat batch
``(B * N, ...)`` of instances; :func:`group` and :func:`ungroup` convert between the two
views, and :func:`pad_to_multiple` implements the remainder policy used everywhere in the
course: when a batch does not divide into tuples of N, it is padded with copies of its own
instances, and the outputs of those copies are dropped (:func:`multiplexed_forward`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["check_n", "group", "ungroup", "pad_to_multiple", "multiplexed_forward"]


def check_n(n: object, name: str = "N") -> int:
    """Return ``n`` if it is an integer >= 1, else raise a ValueError that says so."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} (instances multiplexed together) must be an integer >= 1, got {n!r}")
    return n


def group(x: Tensor, n: int) -> Tensor:
    """Split a flat batch into tuples of N consecutive instances: ``(B*N, ...) -> (B, N, ...)``.

    Raises ValueError when the batch size is not a multiple of N; use
    :func:`pad_to_multiple` first (or drop the remainder) in that case.
    """
    check_n(n)
    if x.dim() < 1 or x.shape[0] % n:
        size = x.shape[0] if x.dim() else "a scalar"
        raise ValueError(
            f"batch of {size} instances cannot be split into tuples of N={n}; "
            "pad with mux.pad_to_multiple or drop the remainder"
        )
    return x.reshape(x.shape[0] // n, n, *x.shape[1:])


def ungroup(x: Tensor) -> Tensor:
    """Inverse of :func:`group`: ``(B, N, ...) -> (B*N, ...)``, instance order preserved."""
    if x.dim() < 2:
        raise ValueError(f"expected a grouped tensor of shape (B, N, ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pad_to_multiple(x: Tensor, n: int) -> tuple[Tensor, int]:
    """Pad a flat batch ``(M, ...)`` with copies of its own instances to a multiple of N.

    Copies are taken cyclically from the start of the batch, so even a batch of one
    instance can fill a tuple. Returns ``(padded, M)``: keep the first M outputs.
    """
    check_n(n)
    m = x.shape[0]
    if m == 0:
        raise ValueError("cannot pad an empty batch: there is no instance to copy")
    missing = (-m) % n
    if missing == 0:
        return x, m
    idx = torch.arange(missing, device=x.device) % m
    return torch.cat([x, x[idx]], dim=0), m


def multiplexed_forward(model: nn.Module, x: Tensor, n: int) -> Tensor:
    """Run a multiplexed model on a flat batch of any size, one output per instance.

    ``x``: ``(M, ...)`` instances. The batch is padded to a multiple of N with copies,
    grouped into ``(ceil(M/N), N, ...)``, passed through ``model`` (which must return
    ``(B, N, ...)``), ungrouped, and the outputs of the padding copies are dropped.
    Returns ``(M, ...)`` in the order of ``x``.
    """
    padded, m = pad_to_multiple(x, n)
    out = model(group(padded, n))
    if out.dim() < 2 or out.shape[1] != n:
        raise ValueError(f"model must return (B, N, ...) with N={n}, got shape {tuple(out.shape)}")
    return ungroup(out)[:m]
