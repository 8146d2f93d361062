"""Multiplexers: N instances in, one mixed representation out.

DataMUX (Murahari et al., 2022, eq. 1) mixes N instances with fixed per-instance linear
transforms phi_i and the mean over instances:

    x_mix = (1/N) * sum_i phi_i(x_i)

The course uses this mean everywhere. The authors' code, for the orthogonal transform,
uses the sum divided by sqrt(N) instead, ``sum_i phi_i(x_i) / sqrt(N)``: the same mixture
times sqrt(N) (notebook 01, exercise 2, asks whether that constant matters).

The contract every multiplexer follows
--------------------------------------
A multiplexer is a module ``forward(x, mask=None) -> mixed`` built from two steps that a
subclass overrides::

    z     = self.transform(x, mask)   # per instance:  (B, N, ..., d) -> (B, N, ..., d')
    mixed = self.combine(z, mask)     # across the N:   (B, N, ..., d') -> (B, ..., d')

- ``x`` has shape ``(B, N, ..., d)``: B tuples of N instances, any dimensions in between
  (none for vectors, ``L`` for token sequences, ``H, W`` for channels-last feature maps),
  and the feature dimension d last. ``forward`` checks N and d and raises a ValueError that
  names the expected shape.
- ``mask`` is optional, of shape ``x.shape[:-1]``, i.e. ``(B, N, ...)``: one entry per
  instance and position, 1 (or True) for a real token, 0 (or False) for padding. With
  ``mask=None`` every position is real.
- ``transform`` acts on each instance separately (it may look at the instance's own mask,
  e.g. as an attention mask). Default: the identity.
- ``combine`` mixes the N transformed instances into one. Default: the mean over N,
  DataMUX's eq. 1; with a mask, padding positions contribute zero and the sum is still
  divided by N, so each real token keeps the weight 1/N whatever the other instances'
  lengths (with a mask of all ones this is the plain mean). A subclass may combine
  otherwise, e.g. by concatenating along the sequence dimension, so the output's shape is
  whatever the subclass documents: ``(B, ..., d)`` for a mean, ``(B, N * L', d)`` for a
  concatenation of N sequences of length L'.
- Padding must never leak into the mixture where a subclass mixes token sequences: a
  subclass that attends over tokens, picks tokens or concatenates them must use ``mask``
  to ignore padding positions (and mask them out of its own attention). ``combine``
  receives the mask as given to ``forward``; a subclass whose ``transform`` changes the
  sequence length must therefore override ``combine`` as well.
- ``forward`` returns the mixture only. A model whose backbone needs an attention mask
  for the mixture derives it from ``mask`` itself (after a mean over N, a position is real
  when any instance is real there: ``mux.grouping.union_mask``; after a concatenation,
  concatenate the masks too).

Chapter 03 implements MUX-PLMs' contextual multiplexer (:class:`ContextualMultiplexer`):
``transform`` = a Transformer layer over each instance's own sequence (attention mask =
that instance's ``mask``), then the Hadamard product with a fixed Gaussian vector per
instance; ``combine`` = a Transformer layer across the N instances at each position, then
the mean over N. Chapter 04 (vision) adds two:

- the Image Multiplexer's :class:`MLPOrthogonalMultiplexer`: ``transform`` = a shallow MLP
  of the instance's own, then its fixed orthogonal Q_i; ``combine`` = the mean over N.
- ConcatPlexer's C-Multiplexer (:class:`ConcatMultiplexer`): ``transform`` = a 1-D
  convolution (kernel = stride = N) shortening each image's L tokens to L/N, times the
  slot's fixed Gaussian vector; ``combine`` = concatenation of the N shortened sequences
  into one of L tokens, ``(B, L, d)``, plus a learned position embedding. It adds nothing
  up: it makes room.

:func:`tuple_mixup` mixes the N instances of a tuple with each other (ConcatPlexer's
mixed-label smoothing, eq. 5); the same weights mix their one-hot labels.
Chapter 05 (MixViT, multi-input multi-output) adds two more:

- MixViT's :class:`TokenCutMixMultiplexer`: ``transform`` = the identity (one patch
  embedding shared by all sources); ``combine`` picks, at every position, the token of one
  source, following CutMix masks voted per patch (:func:`cutmix_sources`).
- :class:`MIMOMultiplexer`, MIMO and MixMo carried over to ViTs: ``transform`` = a learned
  patch embedding per source; ``combine`` = a sum weighted per position (all ones: MIMO's
  sum; MixMo's CutMix or linear weights).

The three DataMUX multiplexers below act on the last dimension only, so the same module
mixes vectors ``(B, N, d) -> (B, d)``, token sequences ``(B, N, L, d) -> (B, L, d)`` or
channels-last feature maps ``(B, N, H, W, d) -> (B, H, W, d)`` (the CNN backbone). Their
transforms are drawn once from an explicit seed and stored as buffers, so they are saved
and restored with the model but never trained.

Scale of the mixture: the mean does not keep the scale of its inputs. The orthogonal
phi_i keeps the norm of its input exactly and the Gaussian-Hadamard phi_i on average, but
the mean of N terms pointing in unrelated directions has a norm of about 1/sqrt(N) times
that of one instance. Binary-Hadamard loses more: each phi_i keeps d/N of the d dimensions
(about 1/sqrt(N) of the norm), the N blocks are disjoint, and the mean divides their
concatenation by N, so the mixture has about 1/N of one instance's norm.
``tests/test_multiplexers.py`` measures both, with independent Gaussian instances.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .grouping import attention_padding, check_n, check_positive

__all__ = [
    "Multiplexer",
    "OrthogonalMultiplexer",
    "GaussianHadamardMultiplexer",
    "BinaryHadamardMultiplexer",
    "ContextualMultiplexer",
    "MLPOrthogonalMultiplexer",
    "ConcatMultiplexer",
    "tuple_mixup",
    "TokenCutMixMultiplexer",
    "MIMOMultiplexer",
    "cutmix_sources",
    "MULTIPLEXERS",
    "make_multiplexer",
    "mix_in_blocks",
]


class Multiplexer(nn.Module):
    """Base class: ``forward(x, mask=None)`` = ``combine(transform(x, mask), mask)``.

    ``x``: ``(B, N, ..., d)``; ``mask``: ``(B, N, ...)`` with 1 for real tokens and 0 for
    padding, or None (all real). See the module docstring for the full contract.

    On its own, ``Multiplexer(n, d)`` is the plain mean of the N instances (identity
    transform, mean over N): the "no transform at all" baseline. Subclasses override
    :meth:`transform` (per instance) and/or :meth:`combine` (across instances).
    """

    #: True when the mixture is the masked mean of per-instance terms phi_i(x_i), each computed from
    #: instance i alone: a model may then embed and mix the instances a block at a time
    #: (:meth:`partial_sum`), which keeps the per-instance tensors small (MUX-PLMs at large N).
    separable = True

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__()
        self.n = check_n(n)
        self.d = check_n(d, name="d (the feature dimension)")
        self.seed = int(seed)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Raise a ValueError unless ``x`` is ``(B, N, ..., d)`` and ``mask`` is None or ``(B, N, ...)``
        holding only 0s and 1s."""
        if x.dim() < 3 or x.shape[1] != self.n or x.shape[-1] != self.d:
            raise ValueError(
                f"{type(self).__name__} expects (B, N={self.n}, ..., d={self.d}), "
                f"got shape {tuple(x.shape)}"
            )
        if mask is None:
            return
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"{type(self).__name__} expects a mask of shape (B, N, ...) = x.shape[:-1] = "
                f"{tuple(x.shape[:-1])} (1 = real token, 0 = padding), got shape {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and mask.device.type != "meta" and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{type(self).__name__} expects a mask of 0s and 1s (or booleans), got other values")

    def transform(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-instance step, ``(B, N, ..., d) -> (B, N, ..., d')``. Default: the identity."""
        return self._transform_block(x, 0)

    def _transform_block(self, x: Tensor, start: int) -> Tensor:
        """phi_i for the instances ``start .. start + k - 1`` of ``x`` ``(B, k, ..., d)``. Default: the identity."""
        return x

    def partial_sum(self, x: Tensor, mask: Tensor | None, start: int) -> Tensor:
        """``sum_i phi_i(x_i)`` over a block of instances, padding contributing zero: ``x`` ``(B, k, ..., d)``
        holds instances ``start .. start + k - 1``, ``mask`` ``(B, k, ...)`` or None -> ``(B, ..., d)``.

        For a separable multiplexer the mixture is the sum of the partial sums of blocks that
        cover the N instances, divided by N: the same numbers as ``forward`` up to the order of
        the additions."""
        if not self.separable:
            raise TypeError(f"{type(self).__name__} mixes the instances with each other: it has no partial sums")
        k = x.shape[1]
        if not 0 <= start <= self.n - k:
            raise ValueError(f"instances {start} .. {start + k - 1} are not among the N={self.n} of {type(self).__name__}")
        z = self._transform_block(x, start)
        if mask is not None:
            z = z * mask.unsqueeze(-1).to(z.dtype)
        return z.sum(dim=1)

    def combine(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """Across-instance step, ``(B, N, ..., d') -> (B, ..., d')``. Default: the mean over N.

        With a mask ``(B, N, ...)``, padding positions contribute zero and the sum is still
        divided by N (a mask of all ones gives the plain mean).
        """
        if mask is None:
            return z.mean(dim=1)
        if tuple(mask.shape) != tuple(z.shape[:-1]):
            raise ValueError(
                f"{type(self).__name__}.combine (mean over N) expects a mask of shape z.shape[:-1] = "
                f"{tuple(z.shape[:-1])}, got {tuple(mask.shape)}; a transform that changes the "
                "sequence length needs its own combine"
            )
        return (z * mask.unsqueeze(-1).to(z.dtype)).sum(dim=1) / self.n

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mix ``x`` ``(B, N, ..., d)`` (optional ``mask`` ``(B, N, ...)``) into one representation."""
        self.check_input(x, mask)
        return self.combine(self.transform(x, mask), mask)

    def _per_instance(self, v: Tensor, x: Tensor) -> Tensor:
        """Reshape a ``(k, d)`` table (k = N, or a block of instances) so it broadcasts against ``(B, k, ..., d)``."""
        return v.view(1, v.shape[0], *([1] * (x.dim() - 3)), self.d).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, seed={self.seed}"


class OrthogonalMultiplexer(Multiplexer):
    """phi_i(x) = Q_i x with Q_i a Haar-random d x d orthogonal matrix (buffer ``weight``, (N, d, d)).

    Each Q_i is drawn with ``torch.nn.init.orthogonal_`` (QR of a Gaussian matrix with the
    sign fix that makes it Haar-distributed) from one generator seeded by ``seed``. Each
    phi_i keeps the norm of its input exactly; the mean over N of independent instances
    has about 1/sqrt(N) of that norm.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        g = self._generator()
        weight = torch.empty(self.n, self.d, self.d)
        for i in range(self.n):
            nn.init.orthogonal_(weight[i], generator=g)
        self.register_buffer("weight", weight)

    def _transform_block(self, x: Tensor, start: int) -> Tensor:
        k = x.shape[1]
        flat = x.reshape(x.shape[0], k, -1, self.d)  # (B, k, M, d)
        out = torch.einsum("bnmd,ned->bnme", flat, self.weight[start:start + k].to(x.dtype))
        return out.reshape(x.shape)


class GaussianHadamardMultiplexer(Multiplexer):
    """phi_i(x) = v_i * x (element-wise), v_i a fixed Gaussian vector (buffer ``weight``, (N, d)).

    Rows are L2-normalised and scaled by sqrt(d), so every v_i has unit mean square and each
    phi_i keeps, on average, the norm of its input. The mixture does not: the mean over N
    of independent instances has about 1/sqrt(N) of one instance's norm.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        v = torch.randn(self.n, self.d, generator=self._generator())
        v = v / v.norm(dim=1, keepdim=True) * math.sqrt(self.d)
        self.register_buffer("weight", v)

    def _transform_block(self, x: Tensor, start: int) -> Tensor:
        return x * self._per_instance(self.weight[start:start + x.shape[1]], x)


class BinaryHadamardMultiplexer(Multiplexer):
    """phi_i(x) = m_i * x with m_i a 0/1 mask keeping instance i's own block of about d/N dims.

    The blocks are contiguous and disjoint (buffer ``weight``, (N, d)), so the sum over N is
    a concatenation of one slice of each instance, and the mean is that concatenation
    divided by N: its norm is about 1/N of one instance's. Needs d >= N. Deterministic:
    ``seed`` is accepted for a uniform signature and ignored.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        if self.d < self.n:
            raise ValueError(f"binary_hadamard needs d >= N to give each instance a block, got d={d}, N={n}")
        mask = torch.zeros(self.n, self.d)
        for i, block in enumerate(torch.tensor_split(torch.arange(self.d), self.n)):
            mask[i, block] = 1.0
        self.register_buffer("weight", mask)

    def _transform_block(self, x: Tensor, start: int) -> Tensor:
        return x * self._per_instance(self.weight[start:start + x.shape[1]], x)


def _key_mask(mask: Tensor) -> Tensor:
    """A (rows, length) 0/1 attention mask where a row with no real entry attends everywhere.

    Such a row (every instance is padding at that position, or an instance that is all
    padding) carries nothing; letting it attend everywhere only avoids the NaN of a softmax
    over nothing. Its output is dropped afterwards (the masked mean gives it weight zero).
    """
    mask = (mask != 0).long()
    empty = mask.sum(dim=-1, keepdim=True) == 0
    return mask | empty.long()


class ContextualMultiplexer(GaussianHadamardMultiplexer):
    """MUX-PLMs' contextual multiplexer (Murahari et al., 2023, eqs. 1-2), for token sequences.

    ``(B, N, L, d)`` embeddings + mask ``(B, N, L)`` -> ``(B, L, d)``:

    1. ``transform``, per instance: a Transformer layer over the instance's own L tokens
       (``TRANS_ctx``, attending only to the instance's real tokens), plus a residual,
       then the Hadamard product with the instance's fixed Gaussian vector v_i (the buffer
       ``weight`` of :class:`GaussianHadamardMultiplexer`, same seed, same numbers):
       ``g_i = (x_i + TRANS_ctx(x_i)) * v_i``.
    2. ``combine``, across instances: at each position t, the N vectors ``g_{1..N, t}`` form a
       sequence of length N, and a second layer (``TRANS_inst``) attends across it (only to
       the instances with a real token at t), plus a residual; then the masked mean over N
       (padding contributes zero, the sum is divided by N, as in :class:`Multiplexer`).

    Unlike the fixed multiplexers, both layers are trained. The layers are ``transformers``'
    ``BertLayer`` (self-attention, feed-forward, post-LayerNorm; SDPA attention). The paper
    says "a single transformer layer" for each step; the outer residual (the layer's output
    added to its input) follows the authors' code as the papers' README reports it. No
    position information is added across instances: ``TRANS_inst`` sees the N instances as a
    set, and v_i is what tells them apart.

    ``num_heads`` defaults to ``d // 64`` (at least 1) as in BERT; ``intermediate_size`` to 4d.
    """

    separable = False  # TRANS_inst attends across the instances

    def __init__(self, n: int, d: int, seed: int = 0, num_heads: int | None = None,
                 intermediate_size: int | None = None, dropout: float = 0.1):
        super().__init__(n, d, seed)
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        heads = num_heads or max(1, self.d // 64)
        if self.d % heads:
            raise ValueError(f"the contextual multiplexer needs d ({self.d}) to be a multiple of num_heads ({heads})")
        self.layer_config = BertConfig(hidden_size=self.d, num_attention_heads=heads,
                                       intermediate_size=intermediate_size or 4 * self.d,
                                       hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                       attn_implementation="sdpa")
        self.context_layer = BertLayer(self.layer_config)  # TRANS_ctx: within each instance
        self.instance_layer = BertLayer(self.layer_config)  # TRANS_inst: across the N instances

    def _attend(self, layer: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
        """``x + layer(x)`` for ``x`` ``(rows, length, d)``, attending where ``mask`` ``(rows, length)`` is 1."""
        from transformers.masking_utils import create_bidirectional_mask

        attend = create_bidirectional_mask(config=self.layer_config, inputs_embeds=x, attention_mask=attention_padding(_key_mask(mask)))
        return x + layer(x, attention_mask=attend)

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        super().check_input(x, mask)
        if x.dim() != 4:
            raise ValueError(f"ContextualMultiplexer mixes token sequences (B, N, L, d={self.d}), got shape {tuple(x.shape)}")

    def transform(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, length, d = x.shape
        mask = torch.ones(b, n, length, dtype=torch.long, device=x.device) if mask is None else mask
        h = self._attend(self.context_layer, x.reshape(b * n, length, d), mask.reshape(b * n, length))
        return self._transform_block(h.view(b, n, length, d), 0)  # * v_i

    def combine(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, length, d = z.shape
        mask = torch.ones(b, n, length, dtype=torch.long, device=z.device) if mask is None else mask
        across = z.transpose(1, 2).reshape(b * length, n, d)  # at each position, the N instances as a sequence
        h = self._attend(self.instance_layer, across, mask.transpose(1, 2).reshape(b * length, n))
        return super().combine(h.view(b, length, n, d).transpose(1, 2), mask)  # masked mean over N

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, seed={self.seed}, heads={self.layer_config.num_attention_heads}"


class MLPOrthogonalMultiplexer(OrthogonalMultiplexer):
    """The Image Multiplexer's mixing (ConcatPlexer paper, section 4.1, Fig. 2a).

    ``phi_i(x) = Q_i MLP_i(x)``: each instance index i has a shallow MLP of its own,
    ``Linear(d, d) -> GELU -> Linear(d, d)`` (trained), then the fixed Haar-random orthogonal
    Q_i of :class:`OrthogonalMultiplexer` (same seed, same matrices); the mixture is the mean
    over N. Acts on the last dimension, so it mixes token sequences ``(B, N, L, d) -> (B, L, d)``
    position by position. The paper says "a shallow MLP" and no more: one hidden layer of
    width d is this course's reading.

    The N MLPs are computed in one batched operation; their parameters are stacked over the
    N indices (``fc1_weight`` ``(N, d, d)`` laid out like ``nn.Linear.weight``, ``fc1_bias``
    ``(N, d)``, same for ``fc2``) and start as N separate ``nn.Linear(d, d)`` would.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        super().__init__(n, d, seed)
        for name in ("fc1", "fc2"):
            self.register_parameter(f"{name}_weight", nn.Parameter(torch.empty(self.n, self.d, self.d)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.empty(self.n, self.d)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each index's two layers start as ``nn.Linear(d, d)`` does (Kaiming-uniform, a=sqrt(5))."""
        bound = 1 / math.sqrt(self.d)
        for i in range(self.n):
            for name in ("fc1", "fc2"):
                nn.init.kaiming_uniform_(getattr(self, f"{name}_weight")[i], a=math.sqrt(5))
                nn.init.uniform_(getattr(self, f"{name}_bias")[i], -bound, bound)

    def no_weight_decay(self) -> set[str]:
        return {"fc1_bias", "fc2_bias"}

    def _transform_block(self, x: Tensor, start: int) -> Tensor:
        k = x.shape[1]
        flat = x.reshape(x.shape[0], k, -1, self.d)  # (B, k, M, d)
        idx = slice(start, start + k)
        h = torch.einsum("bnmi,noi->bnmo", flat, self.fc1_weight[idx]) + self.fc1_bias[None, idx, None]
        h = torch.einsum("bnmi,noi->bnmo", nn.functional.gelu(h), self.fc2_weight[idx]) + self.fc2_bias[None, idx, None]
        return super()._transform_block(h.reshape(x.shape), start)  # Q_i


class ConcatMultiplexer(GaussianHadamardMultiplexer):
    """ConcatPlexer's C-Multiplexer (section 3.2, Fig. 2b): shorten, then concatenate.

    ``(B, N, L, d)`` token sequences (one per image) -> ``(B, L, d)``:

    1. ``transform``, per image: a 1-D convolution over the token axis with kernel = stride
       = N and d output channels (shared by the N slots), ``L -> L/N`` tokens: each output
       token is a learned function of N neighbouring input tokens (neighbours in the
       row-major order of the patch grid); then the Hadamard product with slot i's fixed
       Gaussian vector v_i (the buffer ``weight`` of :class:`GaussianHadamardMultiplexer`,
       same seed, same numbers).
    2. ``combine``: the N shortened sequences one after the other, ``N * L/N = L`` tokens,
       plus a learned position embedding over the L positions (``pos_embed``, ``(1, L, d)``,
       initialised as ViT's, std 0.02).

    The slot code v_i and the position embedding are this course's additions: the paper
    does not say how the backbone tells the N images apart after concatenation.
    Self-attention treats its input as a set, so with neither the backbone's CLS state would
    be the same function of the N images whatever their order, and no demultiplexer could say
    which image is the i-th. (The images' own position embeddings, added before the
    patchifier, tell where a token was in its image, not which image it came from.) A learned
    position embedding alone (ViT's answer for patches) does tell the slots apart, but
    mainly through the attention weights, which start uniform, and only weakly at
    initialisation (std 0.02): the CLS state starts close to a mean over tokens, nearly the
    same for any order of the images, and in our runs at N = 4 training sat at chance for
    most of its steps (a plateau at loss log 10; notebook 04, exercise 1). The fixed v_i, as in
    DataMUX, makes that mean ``sum_i v_i * (mean of image i's tokens)``, from which the
    demultiplexers can read image i from the first step; with it the plateau was gone.

    L must be a multiple of N: the convolution would otherwise drop the last L mod N tokens
    of every image, so such a length is refused rather than silently cut or padded.
    Images have no padding: ``mask`` must be None.
    """

    separable = False  # the mixture is a concatenation, not a sum of per-instance terms

    def __init__(self, n: int, d: int, length: int, seed: int = 0):
        super().__init__(n, d, seed)
        self.length = check_n(length, name="length (tokens per image)")
        if self.length % self.n:
            raise ValueError(
                f"the C-Multiplexer shortens each image's {self.length} tokens to L/N with a convolution of "
                f"kernel = stride = N={self.n}, so the token count must be a multiple of N; {self.length} is not. "
                "It refuses rather than drop or pad tokens: choose an image size, patch size and N with "
                "(image_size / patch_size)^2 divisible by N")
        self.conv = nn.Conv1d(self.d, self.d, kernel_size=self.n, stride=self.n)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.length, self.d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # as ViT's position embedding

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        super().check_input(x, mask)
        if x.dim() != 4 or x.shape[2] != self.length:
            raise ValueError(f"ConcatMultiplexer expects (B, N={self.n}, L={self.length}, d={self.d}) tokens, "
                             f"got shape {tuple(x.shape)}")
        if mask is not None:
            raise ValueError("ConcatMultiplexer concatenates image tokens, which have no padding: pass mask=None")

    def transform(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, length, d = x.shape
        short = self.conv(x.reshape(b * n, length, d).transpose(1, 2))  # (B*N, d, L/N)
        return self._transform_block(short.transpose(1, 2).reshape(b, n, length // n, d), 0)  # * v_i

    def combine(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, short, d = z.shape
        return z.reshape(b, n * short, d) + self.pos_embed.to(z.dtype)  # image 1's tokens, then image 2's, ...

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, length={self.length}, seed={self.seed}"


def tuple_mixup(x: Tensor, alpha: float) -> Tensor:
    """Mix the N instances of each tuple with each other: ``(B, N, ...) -> (B, N, ...)``.

    Slot i becomes ``alpha * x_i + (1 - alpha) / (N - 1) * sum_{n != i} x_n`` (ConcatPlexer,
    eq. 5): applied to the patchifier's tokens it gives the augmented input, applied to
    one-hot labels the matching soft labels. Needs N >= 2 and ``0 <= alpha <= 1``
    (``alpha = 1`` changes nothing, ``alpha = 1/N`` gives every slot the same mean).
    """
    if x.dim() < 2:
        raise ValueError(f"tuple_mixup expects grouped tensors (B, N, ...), got shape {tuple(x.shape)}")
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"tuple_mixup mixes the instances of a tuple with each other: it needs N >= 2, got N={n}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the weight an instance keeps of itself) must be a number in [0, 1], got {alpha!r}")
    off = (1 - alpha) / (n - 1)
    weights = torch.full((n, n), off, dtype=x.dtype, device=x.device)
    weights.fill_diagonal_(alpha)
    return torch.einsum("in,bn...->bi...", weights, x)


class TokenCutMixMultiplexer(Multiplexer):
    """MixViT's token CutMix (section 2.1, Fig. 2): at every position, the token of one source.

    ``(B, M, L, d)`` patch tokens of M images (embedded by one shared patch embedding) and a
    ``mask`` ``(B, M, L)`` that is one-hot across the M sources at every position (the
    masks M_i of the paper: exactly one 1 per position) -> ``(B, L, d)``,
    ``mixed[l] = sum_i M_i[l] * x_i[l]``.

    ``transform`` is the identity and ``combine`` a sum weighted by the mask, not a mean:
    nothing is added up, each position is taken whole from one image. The padding mask of
    the other multiplexers becomes a source mask here (a token that is not picked is absent
    from the mixture, like padding). The paper mixes pixel patches and then embeds them;
    a patch embedding is linear and acts on each patch alone, so picking embedded tokens
    gives the same numbers (``tests/test_mixvit.py`` checks it). Draw the masks with
    :func:`cutmix_sources`.
    """

    separable = False  # the mask couples the instances: each position belongs to exactly one

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        super().check_input(x, mask)
        if mask is None:
            raise ValueError(f"{type(self).__name__} needs a source mask (B, M={self.n}, L), one-hot across the M "
                             "sources at every position: draw one with mux.multiplexers.cutmix_sources")
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects tokens (B, M={self.n}, L, d={self.d}), "
                             f"got shape {tuple(x.shape)}")
        if bool((mask.to(torch.int64).sum(dim=1) != 1).any()):
            raise ValueError(f"{type(self).__name__}: the source mask must pick exactly one of the M={self.n} "
                             "sources at every position (one-hot across dimension 1)")

    def combine(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return (z * mask.unsqueeze(-1).to(z.dtype)).sum(dim=1)


class MIMOMultiplexer(Multiplexer):
    """MIMO and MixMo carried over to a ViT (MixViT's appendix C, Fig. 8): one learned input
    encoder per source, then a weighted sum.

    ``(B, M, L, p)`` flattened pixel patches (``p = C * patch_size^2``) -> ``(B, L, d)``:

    - ``transform``: source i's own patch embedding ``e_i`` (a Linear p -> d, learned; the
      stored weights ``weight`` ``(M, d, p)`` and ``bias`` ``(M, d)``);
    - ``combine``: ``sum_i w_i * e_i(x_i)`` with per-position weights ``w`` = ``mask``
      ``(B, M, L)``, or all ones when ``mask`` is None. All ones is MIMO's sum (Havasi et al.,
      2021); MixMo (Rame et al., 2021) uses either a binary CutMix mask on the token grid or
      the linear mix ``2 * lambda`` and ``2 * (1 - lambda)``. At inference every encoder reads
      the same image and the M encodings are summed.

    Unlike the other multiplexers, the weights need not be 0 or 1.
    """

    def __init__(self, n: int, d: int, patch_dim: int, seed: int = 0):
        super().__init__(n, d, seed)
        self.patch_dim = check_n(patch_dim, name="patch_dim (numbers per pixel patch)")
        self.weight = nn.Parameter(torch.empty(self.n, self.d, self.patch_dim))
        self.bias = nn.Parameter(torch.empty(self.n, self.d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i in range(self.n):  # each e_i as nn.Linear initialises its own weights
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
        bound = 1 / math.sqrt(self.patch_dim)
        nn.init.uniform_(self.bias, -bound, bound)

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        if x.dim() != 4 or x.shape[1] != self.n or x.shape[-1] != self.patch_dim:
            raise ValueError(f"{type(self).__name__} expects pixel patches (B, M={self.n}, L, p={self.patch_dim}), "
                             f"got shape {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"{type(self).__name__} expects weights (B, M, L) = {tuple(x.shape[:-1])}, "
                             f"got shape {tuple(mask.shape)}")

    def transform(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.einsum("bmlp,mdp->bmld", x, self.weight.to(x.dtype)) + self.bias[None, :, None].to(x.dtype)

    def combine(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return z.sum(dim=1) if mask is None else (z * mask.unsqueeze(-1).to(z.dtype)).sum(dim=1)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, patch_dim={self.patch_dim}"


def cutmix_sources(batch: int, m: int, image_size: int, patch_size: int, alpha: float,
                   one_source_prob: float = 0.0, device=None) -> Tensor:
    """MixViT's corrected CutMix masks (appendix H): ``(batch, m, L)``, one-hot across the m sources.

    For each mixed example: two of the m sources, in random order, a and b (for m = 2, both,
    so either may get the box); ``lambda ~ Beta(alpha, alpha)``; a CutMix box of area
    ``(1 - lambda)`` of the ``image_size`` x ``image_size`` pixels, centred uniformly at
    random and clipped to the image (Yun et al., 2019), whose pixels come from b, the rest from a.
    Then the **majority vote**: a patch of ``patch_size`` x ``patch_size`` pixels takes b's
    token when more than half its pixels lie in the box, a's when fewer; exact ties go to
    one source drawn once per example for all its tied patches. Other sources get no token
    (appendix B's scheme for m > 2). With probability ``one_source_prob`` an example instead
    takes every token from one source drawn uniformly (the schedule of the last twelfth of
    training). ``L = (image_size / patch_size)^2`` in row-major order of the patch grid.

    The fraction of tokens from each source (``mask.mean(-1)``) is the lambda of the loss;
    after the vote it differs from the lambda drawn for the box. Randomness comes from torch's
    global RNG, which :func:`mux.train` seeds, checkpoints and restores.
    """
    check_n(batch, name="batch")
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ValueError(f"CutMix mixes at least two inputs: need m >= 2 sources, got {m!r}")
    alpha = check_positive("alpha (of Beta(alpha, alpha))", alpha)
    check_n(image_size, name="image_size")
    check_n(patch_size, name="patch_size")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}: the masks are "
                         "voted per whole patch")
    if not 0 <= one_source_prob <= 1:
        raise ValueError(f"one_source_prob must lie in [0, 1], got {one_source_prob!r}")
    side, p, g = image_size, patch_size, image_size // patch_size
    lam = torch.distributions.Beta(alpha, alpha).sample((batch,))
    cut = torch.sqrt(1 - lam) * side  # box side, in pixels
    centre = torch.rand(batch, 2) * side
    low = (centre - cut[:, None] / 2).round().clamp(0, side)
    high = (centre + cut[:, None] / 2).round().clamp(0, side)
    pixels = torch.arange(side)
    rows = (pixels >= low[:, :1]) & (pixels < high[:, :1])  # (batch, side)
    cols = (pixels >= low[:, 1:]) & (pixels < high[:, 1:])
    box = rows[:, :, None] & cols[:, None, :]  # (batch, side, side): pixels from b
    votes = 2 * box.view(batch, g, p, g, p).sum(dim=(2, 4)).flatten(1)  # (batch, L), against p * p
    tie_to_b = torch.rand(batch, 1) < 0.5
    from_b = (votes > p * p) | ((votes == p * p) & tie_to_b)
    pair = torch.rand(batch, m).argsort(dim=1)[:, :2]  # (a, b) per example
    source = torch.where(from_b, pair[:, 1:], pair[:, :1])
    whole = torch.rand(batch) < one_source_prob
    source[whole] = torch.randint(m, (int(whole.sum()), 1)).expand(-1, g * g)
    return nn.functional.one_hot(source, m).transpose(1, 2).float().to(device)


MULTIPLEXERS: dict[str, type[Multiplexer]] = {
    "orthogonal": OrthogonalMultiplexer,
    "gaussian_hadamard": GaussianHadamardMultiplexer,
    "binary_hadamard": BinaryHadamardMultiplexer,
    "contextual": ContextualMultiplexer,
    "mlp_orthogonal": MLPOrthogonalMultiplexer,
}


def make_multiplexer(kind: str, n: int, d: int, seed: int = 0, **options) -> Multiplexer:
    """Build a multiplexer by name: one of ``MULTIPLEXERS`` (orthogonal, gaussian_hadamard,
    binary_hadamard, contextual, mlp_orthogonal). ``options`` go to the contextual multiplexer's
    layers (``num_heads``, ``intermediate_size``, ``dropout``); the others take none.
    (:class:`ConcatMultiplexer` is built by ConcatPlexer with its token count, not by name.)"""
    if kind not in MULTIPLEXERS:
        raise ValueError(f"unknown multiplexer {kind!r}; expected one of {sorted(MULTIPLEXERS)}")
    if kind != "contextual":
        return MULTIPLEXERS[kind](n, d, seed)
    return MULTIPLEXERS[kind](n, d, seed, **options)


def mix_in_blocks(multiplexer: Multiplexer, embed: Callable[[slice, slice], Tensor], mask: Tensor, d: int,
                  block_elements: int = 2**20) -> Tensor:
    """The multiplexer's mixture ``(B, L, d)`` of B x N instances of L positions, embedded a block at a time.

    ``embed(tuples, instances)``: the embeddings ``(b, k, L, d)`` of those tuples' instances (two slices of
    ``range(B)`` and ``range(N)``); ``mask`` ``(B, N, L)``. With a separable multiplexer (the fixed ones: the
    mixture is a masked mean of per-instance terms) the blocks' partial sums are added up, the same numbers,
    up to the order of the additions, as embedding all B x N instances at once, without the ``(B, N, L, d)``
    tensor that at large N (N = 40, L = 128, d = 768: 250 MB for 16 tuples) outgrows the caches and costs
    more than a tenth of the encoder's time on a CPU. A block holds about ``block_elements`` numbers. A
    multiplexer that mixes the instances with each other (the contextual one) gets all N at once.
    """
    b, n, length = mask.shape
    if not multiplexer.separable:
        return multiplexer(embed(slice(None), slice(None)), mask)
    per_block = max(1, min(n, block_elements // (length * d)))  # instances of a tuple per block
    tuples = max(1, block_elements // (per_block * length * d))  # tuples per block
    out = []
    for t in range(0, b, tuples):
        total = None
        for i in range(0, n, per_block):
            block = (slice(t, t + tuples), slice(i, i + per_block))
            part = multiplexer.partial_sum(embed(*block), mask[block], start=i)
            total = part if total is None else total + part
        out.append(total / n)
    return torch.cat(out) if len(out) > 1 else out[0]
