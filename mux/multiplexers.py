"""Multiplexers: N instances in, one mixed representation out.

DataMUX (Murahari et al., 2022, eq. 1) mixes N instances with fixed per-instance linear
transforms phi_i and the mean over instances:

    x_mix = (1/N) * sum_i phi_i(x_i)

Every multiplexer here acts on the last dimension (size d) and keeps any dimensions in
between, so the same module mixes vectors ``(B, N, d) -> (B, d)``, token sequences
``(B, N, L, d) -> (B, L, d)`` (T-MUX) or channels-last feature maps
``(B, N, H, W, d) -> (B, H, W, d)`` (the CNN backbone). The transforms are drawn once from
an explicit seed and stored as buffers, so they are saved and restored with the model but
never trained.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .grouping import check_n

__all__ = [
    "Multiplexer",
    "OrthogonalMultiplexer",
    "GaussianHadamardMultiplexer",
    "BinaryHadamardMultiplexer",
    "MULTIPLEXERS",
    "make_multiplexer",
]


class Multiplexer(nn.Module):
    """Base class: per-instance fixed transform, then the mean over the N instances.

    Subclasses implement :meth:`transform`, ``(B, N, ..., d) -> (B, N, ..., d)``.
    ``forward`` checks the input shape and returns ``(B, ..., d)``.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__()
        self.n = check_n(n)
        self.d = check_n(d, name="d (the feature dimension)")
        self.seed = int(seed)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def check_input(self, x: Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.n or x.shape[-1] != self.d:
            raise ValueError(
                f"{type(self).__name__} expects (B, N={self.n}, ..., d={self.d}), "
                f"got shape {tuple(x.shape)}"
            )

    def transform(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.transform(x).mean(dim=1)

    def _per_instance(self, v: Tensor, x: Tensor) -> Tensor:
        """Reshape an ``(N, d)`` table so it broadcasts against ``(B, N, ..., d)``."""
        return v.view(1, self.n, *([1] * (x.dim() - 3)), self.d).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, seed={self.seed}"


class OrthogonalMultiplexer(Multiplexer):
    """phi_i(x) = Q_i x with Q_i a Haar-random d x d orthogonal matrix (buffer ``weight``, (N, d, d)).

    Each Q_i is drawn with ``torch.nn.init.orthogonal_`` (QR of a Gaussian matrix with the
    sign fix that makes it Haar-distributed) from one generator seeded by ``seed``.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        g = self._generator()
        weight = torch.empty(self.n, self.d, self.d)
        for i in range(self.n):
            nn.init.orthogonal_(weight[i], generator=g)
        self.register_buffer("weight", weight)

    def transform(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], self.n, -1, self.d)  # (B, N, M, d)
        out = torch.einsum("bnmd,ned->bnme", flat, self.weight.to(x.dtype))
        return out.reshape(x.shape)


class GaussianHadamardMultiplexer(Multiplexer):
    """phi_i(x) = v_i * x (element-wise), v_i a fixed Gaussian vector (buffer ``weight``, (N, d)).

    Rows are L2-normalised and scaled by sqrt(d), so every v_i has unit mean square and
    the mixture keeps the scale of its inputs.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        v = torch.randn(self.n, self.d, generator=self._generator())
        v = v / v.norm(dim=1, keepdim=True) * math.sqrt(self.d)
        self.register_buffer("weight", v)

    def transform(self, x: Tensor) -> Tensor:
        return x * self._per_instance(self.weight, x)


class BinaryHadamardMultiplexer(Multiplexer):
    """phi_i(x) = m_i * x with m_i a 0/1 mask keeping instance i's own block of about d/N dims.

    The blocks are contiguous and disjoint (buffer ``weight``, (N, d)), so the mixture is a
    concatenation of one slice of each instance. Needs d >= N. Deterministic: ``seed`` is
    accepted for a uniform signature and ignored.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        if self.d < self.n:
            raise ValueError(f"binary_hadamard needs d >= N to give each instance a block, got d={d}, N={n}")
        mask = torch.zeros(self.n, self.d)
        for i, block in enumerate(torch.tensor_split(torch.arange(self.d), self.n)):
            mask[i, block] = 1.0
        self.register_buffer("weight", mask)

    def transform(self, x: Tensor) -> Tensor:
        return x * self._per_instance(self.weight, x)


MULTIPLEXERS: dict[str, type[Multiplexer]] = {
    "orthogonal": OrthogonalMultiplexer,
    "gaussian_hadamard": GaussianHadamardMultiplexer,
    "binary_hadamard": BinaryHadamardMultiplexer,
}


def make_multiplexer(kind: str, n: int, d: int, seed: int = 0) -> Multiplexer:
    """Build a multiplexer by name: one of ``MULTIPLEXERS`` (orthogonal, gaussian_hadamard, binary_hadamard)."""
    if kind not in MULTIPLEXERS:
        raise ValueError(f"unknown multiplexer {kind!r}; expected one of {sorted(MULTIPLEXERS)}")
    return MULTIPLEXERS[kind](n, d, seed)
