"""Demultiplexers: one processed mixture in, N instance representations out.

DataMUX's MLP demultiplexer gives each instance index i its own small MLP
(Linear d -> d, GELU, LayerNorm); a task head shared by all instances then turns each
recovered representation into a prediction.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .grouping import check_n

__all__ = ["MLPDemultiplexer"]


class MLPDemultiplexer(nn.Module):
    """N separate MLPs, one per instance index: ``(B, ..., d) -> (B, N, ..., d)``."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.n = check_n(n)
        self.d = check_n(d, name="d (the feature dimension)")
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(self.d, self.d), nn.GELU(), nn.LayerNorm(self.d)) for _ in range(self.n)
        )

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() < 2 or h.shape[-1] != self.d:
            raise ValueError(f"MLPDemultiplexer expects (B, ..., d={self.d}), got shape {tuple(h.shape)}")
        return torch.stack([mlp(h) for mlp in self.mlps], dim=1)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}"
