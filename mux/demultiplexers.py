"""Demultiplexers: one processed mixture in, N instance representations out.

The contract every demultiplexer follows
----------------------------------------
A demultiplexer is a module ``forward(h, **context) -> (B, N, ..., d)``:

- ``h`` is the shared backbone's output for the mixture, ``(B, ..., d)``: ``(B, d)`` for a
  pooled vector, ``(B, L, d)`` for a token sequence. The demultiplexer returns one
  representation per instance index, ``(B, N, ..., d)``, with the dimensions between B and
  d kept as they are. A task head shared by all instances then turns each one into a
  prediction.
- What ``h`` covers is the model's choice: a sentence-level task passes only the state it
  classifies from (e.g. position 0, ``h[:, 0]``, shape ``(B, d)``), a token-level task
  passes every position ``(B, L, d)`` and gets ``(B, N, L, d)`` back.
- ``context`` carries, by keyword, whatever a demultiplexer needs beyond the mixture; a
  demultiplexer that needs nothing more accepts and ignores it, so a model can call every
  demultiplexer the same way. Chapter 02 uses it for T-MUX's index
  demultiplexer (:class:`IndexDemultiplexer`), which reads the backbone states of the N
  prefix tokens (one per instance index, ``prefix=(B, N, d)``) and combines each with ``h``. MUX-PLMs' RSA
  demultiplexer (:class:`RSADemultiplexer`, chapter 03) instead keeps learned keys, one per
  instance index, as its own parameters, and needs no context.
- A demultiplexer checks the shapes it receives and raises a ValueError that names the
  shape it expected.

DataMUX's MLP demultiplexer (:class:`MLPDemultiplexer`) gives each instance index i its
own small MLP, ``LayerNorm(GELU(W_i h + b_i))``, all N computed in one batched operation.

MixViT (chapter 05) demultiplexes earlier, before its last blocks: its
:class:`SourceAttribution` turns the shared patch tokens into M copies, each tagged for one
subnetwork (a learned vector or a learned Linear per subnetwork), and the class-attention
blocks then read each copy separately.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .grouping import check_n

__all__ = ["Demultiplexer", "MLPDemultiplexer", "IndexDemultiplexer", "RSADemultiplexer", "SourceAttribution"]


class Demultiplexer(nn.Module):
    """Base class: ``forward(h, **context)``, ``(B, ..., d) -> (B, N, ..., d)``.

    Subclasses implement :meth:`demultiplex`; ``forward`` first checks that ``h`` is
    ``(B, ..., d)``. See the module docstring for the contract.
    """

    def __init__(self, n: int, d: int):
        super().__init__()
        self.n = check_n(n)
        self.d = check_n(d, name="d (the feature dimension)")

    def check_input(self, h: Tensor) -> None:
        if h.dim() < 2 or h.shape[-1] != self.d:
            raise ValueError(f"{type(self).__name__} expects (B, ..., d={self.d}), got shape {tuple(h.shape)}")

    def demultiplex(self, h: Tensor, **context) -> Tensor:  # pragma: no cover - abstract
        """``(B, ..., d) -> (B, N, ..., d)``; implemented by each demultiplexer."""
        raise NotImplementedError

    def forward(self, h: Tensor, **context) -> Tensor:
        self.check_input(h)
        return self.demultiplex(h, **context)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}"


class MLPDemultiplexer(Demultiplexer):
    """One small MLP per instance index, all N at once: ``(B, ..., d) -> (B, N, ..., d)``.

    For instance index i: ``out_i = LayerNorm_i(GELU(h @ weight[i].T + bias[i]))``, the same
    as ``nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))`` with its own
    parameters. Parameters, stacked over the N indices:

    - ``weight`` ``(N, d, d)``: ``weight[i]`` is laid out like ``nn.Linear.weight``, (out, in)
    - ``bias`` ``(N, d)``
    - ``norm_weight``, ``norm_bias`` ``(N, d)``: each index's LayerNorm scale and shift

    Initialisation is that of N separate ``nn.Linear(d, d)`` (Kaiming-uniform weight with
    a=sqrt(5), bias uniform in +-1/sqrt(d)) and ``nn.LayerNorm(d)`` (scale 1, shift 0),
    drawn from the global RNG in the same order as N such modules built one after the
    other, so a seeded model starts from the same numbers as the per-index loop it
    replaces. ``context`` is accepted and ignored.
    """

    def __init__(self, n: int, d: int):
        super().__init__(n, d)
        self.weight = nn.Parameter(torch.empty(self.n, self.d, self.d))  # (N, d_out, d_in)
        self.bias = nn.Parameter(torch.empty(self.n, self.d))  # (N, d)
        self.norm_weight = nn.Parameter(torch.ones(self.n, self.d))  # (N, d)
        self.norm_bias = nn.Parameter(torch.zeros(self.n, self.d))  # (N, d)
        self.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay (biases and norms, as for N separate modules)."""
        return {"bias", "norm_weight", "norm_bias"}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every index as ``nn.Linear(d, d)`` + ``nn.LayerNorm(d)`` would, index by index."""
        bound = 1 / math.sqrt(self.d)  # nn.Linear's bias bound: 1/sqrt(fan_in)
        for i in range(self.n):
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
            nn.init.uniform_(self.bias[i], -bound, bound)
        nn.init.ones_(self.norm_weight)
        nn.init.zeros_(self.norm_bias)

    def demultiplex(self, h: Tensor, **context) -> Tensor:
        lead = h.shape[:-1]  # (B, ...)
        flat = h.reshape(lead[0], -1, self.d)  # (B, M, d), M = product of the middle dims
        z = torch.einsum("bmi,noi->bnmo", flat, self.weight) + self.bias[None, :, None, :]  # (B, N, M, d)
        z = F.layer_norm(F.gelu(z), (self.d,))  # normalise each d-vector, no affine yet
        z = z * self.norm_weight[None, :, None, :] + self.norm_bias[None, :, None, :]  # per-index scale, shift
        return z.reshape(lead[0], self.n, *lead[1:], self.d)  # (B, N, ..., d)


class IndexDemultiplexer(Demultiplexer):
    """T-MUX's index ("prefix") demultiplexer: ``(B, ..., d)`` + prefix ``(B, N, d)`` -> ``(B, N, ..., d)``.

    Every instance i enters the backbone with N + 1 extra leading tokens (see
    :class:`mux.models.TMUXModel`): N slots holding a filler token except slot i, which holds
    instance i's own index token, then the sentence's ``[CLS]``. After the mean over N, the
    mixture's slot i differs from every other slot only through instance i's index token,
    and the backbone's output there, ``key_i`` (the ``prefix`` context, ``(B, N, d)``), is
    what the demultiplexer uses to find instance i in every other state ``h_t``::

        out_{i,t} = LayerNorm(GELU(W [key_i ; h_t] + b))      (2d -> d)

    One MLP for all indices; what differs between instances is the key. The product
    ``W [key_i ; h_t]`` is computed as ``W_k key_i + W_h h_t`` (the two halves of ``W``), so
    ``h`` is projected once, not N times. Parameters: ``proj`` = ``nn.Linear(2d, d)`` (its
    weight is ``[W_k | W_h]``), ``norm`` = ``nn.LayerNorm(d)``.
    """

    def __init__(self, n: int, d: int):
        super().__init__(n, d)
        self.proj = nn.Linear(2 * self.d, self.d)
        self.norm = nn.LayerNorm(self.d)

    def demultiplex(self, h: Tensor, prefix: Tensor | None = None, **context) -> Tensor:
        if prefix is None or prefix.dim() != 3 or tuple(prefix.shape) != (h.shape[0], self.n, self.d):
            got = None if prefix is None else tuple(prefix.shape)
            raise ValueError(f"IndexDemultiplexer needs prefix=(B={h.shape[0]}, N={self.n}, d={self.d}), the backbone's "
                             f"states at the N index slots; got {got}")
        w_key, w_h = self.proj.weight[:, : self.d], self.proj.weight[:, self.d:]  # (d, d) each
        keys = prefix @ w_key.T + self.proj.bias  # (B, N, d)
        lead = h.shape[:-1]  # (B, ...)
        states = (h @ w_h.T).reshape(lead[0], 1, -1, self.d)  # (B, 1, M, d)
        z = self.norm(F.gelu(keys[:, :, None, :] + states))  # (B, N, M, d)
        return z.reshape(lead[0], self.n, *lead[1:], self.d)


class RSADemultiplexer(Demultiplexer):
    """MUX-PLMs' RSA-inspired demultiplexer: ``(B, ..., d) -> (B, N, ..., d)`` with N learned keys.

    T-MUX finds instance i through the backbone's state at an index token of a prefix, which
    makes every sequence N tokens longer (:class:`IndexDemultiplexer`). The RSA demultiplexer
    keeps N keys ``k_1 .. k_N`` (``keys``, ``(N, d)``, drawn at random and trained) as its own
    parameters, so the input keeps its length. For instance i at position t::

        out_{i,t} = MLP([k_i ; h_t])    MLP: 2d -> d, GELU, LayerNorm, then (layers - 1) x (d -> d, GELU, LayerNorm)

    ``layers`` = 2 by default (the authors' 2-3 layers, ``2d -> d -> d``). The multiplexer's
    v_i and these k_i play the parts of RSA's encryption and decryption keys; neither depends
    on the input, so the keys learned in one training stage carry over to the next.

    As in :class:`IndexDemultiplexer`, the first layer's ``W [k_i ; h_t]`` is computed as
    ``W_k k_i + W_h h_t`` (the two halves of ``first.weight``): ``h`` is projected once, not N
    times. A sentence-level model passes only position 0 (``h[:, 0]``, ``(B, d)``) and gets
    ``(B, N, d)``; a token-level model passes ``(B, L, d)`` and gets ``(B, N, L, d)``.
    Parameters: ``keys``; ``first`` = ``nn.Linear(2d, d)``, ``first_norm``; ``rest``, a
    ``nn.Sequential`` of ``(Linear(d, d), GELU, LayerNorm)`` blocks. ``context`` is ignored.
    """

    def __init__(self, n: int, d: int, layers: int = 2, key_std: float = 1.0):
        super().__init__(n, d)
        check_n(layers, name="layers (of the demultiplexer's MLP)")
        self.layers = int(layers)
        self.keys = nn.Parameter(torch.randn(self.n, self.d) * key_std)  # k_i: one private key per index
        self.first = nn.Linear(2 * self.d, self.d)
        self.first_norm = nn.LayerNorm(self.d)
        self.rest = nn.Sequential(*[nn.Sequential(nn.Linear(self.d, self.d), nn.GELU(), nn.LayerNorm(self.d))
                                    for _ in range(self.layers - 1)])

    def no_weight_decay(self) -> set[str]:
        """The keys are embeddings, kept out of weight decay like the word embeddings."""
        return {"keys"}

    def demultiplex(self, h: Tensor, **context) -> Tensor:
        w_key, w_h = self.first.weight[:, : self.d], self.first.weight[:, self.d:]  # (d, d) each
        keys = self.keys.to(h.dtype) @ w_key.T + self.first.bias  # (N, d)
        lead = h.shape[:-1]  # (B, ...)
        states = (h @ w_h.T).reshape(lead[0], 1, -1, self.d)  # (B, 1, M, d)
        z = self.first_norm(F.gelu(keys[None, :, None, :] + states))  # (B, N, M, d)
        return self.rest(z).reshape(lead[0], self.n, *lead[1:], self.d)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, layers={self.layers}"


class SourceAttribution(Demultiplexer):
    """MixViT's source attribution (section 2.3): patch tokens that say which input they belong to.

    ``s_i`` specialises the generic tokens t ``(B, L, d)`` for subnetwork i:

    - ``kind="encoding"`` (eq. 2): ``s_i(t) = t W_i^T + b_i``, one learned Linear d -> d per
      subnetwork (``weight`` ``(M, d, d)``, ``bias`` ``(M, d)``);
    - ``kind="embedding"`` (eq. 3): ``s_i(t) = b_i``, a learned vector per subnetwork, the
      encoding with ``W_i = 0`` (``2d`` numbers for M = 2);
    - ``kind="none"``: ``s_i = 0``, the ablation without attribution (identical subnetworks).

    Two ways to call it:

    - ``forward(t)`` (inference, "SourceAttributionTiled" of appendix I): the M attributed
      copies ``t + s_i(t)``, ``(B, M, L, d)``, one per subnetwork: the demultiplexer contract.
    - ``forward(t, sources=mask)`` (training): with the CutMix source mask ``(B, M, L)``, the
      one set ``t* = t + sum_i M_i * s_i(t)``, ``(B, L, d)``, where each token is attributed
      to the input it came from.

    Initialisation (not in the paper): ``b_i`` and ``W_i`` drawn with std 0.02, as a ViT's
    position embedding, so the subnetworks differ from the first step but start close to t.
    """

    KINDS = ("embedding", "encoding", "none")

    def __init__(self, n: int, d: int, kind: str = "embedding"):
        super().__init__(n, d)
        if kind not in self.KINDS:
            raise ValueError(f"unknown source attribution {kind!r}; expected one of {list(self.KINDS)}")
        self.kind = kind
        self.bias = nn.Parameter(torch.zeros(self.n, self.d)) if kind != "none" else None
        self.weight = nn.Parameter(torch.zeros(self.n, self.d, self.d)) if kind == "encoding" else None
        for p in (self.bias, self.weight):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"bias"} if self.kind == "embedding" else set()  # embeddings, like position embeddings

    def offsets(self, t: Tensor) -> Tensor:
        """``s_i(t)`` for every subnetwork: ``(B, L, d) -> (B, M, L, d)`` (zeros for kind="none")."""
        if self.kind == "none":
            return t.new_zeros(t.shape[0], self.n, *t.shape[1:])
        s = self.bias.to(t.dtype)[None, :, None, :].expand(t.shape[0], -1, t.shape[1], -1)
        if self.kind == "encoding":
            s = s + torch.einsum("bld,mod->bmlo", t, self.weight.to(t.dtype))
        return s

    def demultiplex(self, h: Tensor, sources: Tensor | None = None, **context) -> Tensor:
        if h.dim() != 3:
            raise ValueError(f"SourceAttribution expects patch tokens (B, L, d={self.d}), got shape {tuple(h.shape)}")
        s = self.offsets(h)
        if sources is None:
            return h.unsqueeze(1) + s
        if tuple(sources.shape) != (h.shape[0], self.n, h.shape[1]):
            raise ValueError(f"SourceAttribution expects a source mask (B, M={self.n}, L) = "
                             f"{(h.shape[0], self.n, h.shape[1])}, got {tuple(sources.shape)}")
        return h + (sources.unsqueeze(-1).to(h.dtype) * s).sum(dim=1)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, kind={self.kind}"
