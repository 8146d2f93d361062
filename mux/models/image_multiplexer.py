"""Image Multiplexer: DataMUX on a ViT's patch tokens (ConcatPlexer paper, section 4.1, Fig. 1a).

    N images -> patchifier (per image) -> + position embedding
             -> multiplexer (shallow MLP_i, fixed orthogonal Q_i, mean over N)
             -> ViT blocks on CLS + the mixed tokens (one pass for all N)
             -> N MLP demultiplexers -> shared head on each CLS -> N logits
                                     -> retrieval head on each patch token -> N x L codes

Two patchifiers (``patchifier=``):

- ``"discrete"``: each patch becomes one code of a vocabulary (:class:`PatchCodebook`), and
  the token is that code's learned embedding, as a word's is in T-MUX. The paper used
  DALL-E's dVAE (8 x 8 pixels -> one of 8192 codes); offline the course fits a k-means
  codebook on training patches. Any module with ``encode(images) -> (B, L) codes`` and a
  ``vocab_size`` can take its place (``tokenizer=``), e.g. a wrapper around the dVAE
  encoder's argmax at full scale.
- ``"cnn"``: the ViT's own convolutional patch embedding (a linear map of the pixels).

Token retrieval (``return_retrieval=True``) asks the demultiplexed patch tokens for each
image's own codes, the vision analogue of T-MUX's warm-up; it needs a codebook (always
there for ``"discrete"``; optional for ``"cnn"``, where the codes are only targets).

With ``N = 1`` the model still applies its MLP and Q to the one image (the Image
Multiplexer at N = 1); the vanilla ViT is :class:`mux.models.vit.ViTClassifier`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..demultiplexers import MLPDemultiplexer
from ..grouping import IGNORE_INDEX, check_n
from ..multiplexers import MLPOrthogonalMultiplexer
from .vit import SavedByFolder, VisionConfig, build_vit, images_of, read_with_cls

__all__ = ["PatchCodebook", "ImageMultiplexerConfig", "ImageMultiplexerModel", "PATCHIFIERS"]

PATCHIFIERS = ("discrete", "cnn")


class PatchCodebook(nn.Module):
    """A discrete patchifier: every ``patch_size`` x ``patch_size`` patch -> the index of its nearest centroid.

    ``centroids`` (buffer, ``(K, C * p * p)``) are patches laid out as ``F.unfold`` lays them
    out (channel, then row, then column). ``encode`` gives ``(B, L)`` codes in row-major
    order of the patch grid, the order of a ViT's patch tokens; ``decode`` paints each code's
    centroid back. :meth:`fit` learns the centroids with scikit-learn's k-means.
    """

    def __init__(self, centroids: Tensor, patch_size: int, in_chans: int):
        super().__init__()
        self.patch_size = check_n(patch_size, name="patch_size")
        self.in_chans = check_n(in_chans, name="in_chans")
        if centroids.dim() != 2 or centroids.shape[1] != in_chans * patch_size**2:
            raise ValueError(f"centroids must be (K, in_chans * patch_size^2) = (K, {in_chans * patch_size ** 2}), "
                             f"got shape {tuple(centroids.shape)}")
        self.register_buffer("centroids", centroids.float().clone())

    @property
    def vocab_size(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def fit(cls, images: Tensor, num_codes: int, patch_size: int, seed: int = 0,
            max_patches: int = 200_000) -> "PatchCodebook":
        """K-means (scikit-learn) on the patches of ``images`` ``(M, C, H, W)``, a seeded sample of
        at most ``max_patches`` of them; ``MiniBatchKMeans`` above 256 codes (a DALL-E-sized 8192)."""
        from sklearn.cluster import KMeans, MiniBatchKMeans

        check_n(num_codes, name="num_codes")
        patches = cls._unfold(images, patch_size).reshape(-1, images.shape[1] * patch_size**2)
        rng = np.random.default_rng(seed)
        if patches.shape[0] > max_patches:
            patches = patches[torch.from_numpy(rng.choice(patches.shape[0], max_patches, replace=False))]
        distinct = torch.unique(patches, dim=0).shape[0]
        if distinct < num_codes:
            raise ValueError(f"only {distinct} distinct patches to fit {num_codes} codes: ask for fewer codes")
        kind = KMeans(num_codes, n_init=1, random_state=seed) if num_codes <= 256 else \
            MiniBatchKMeans(num_codes, random_state=seed, batch_size=4096, n_init=1)
        kind.fit(patches.double().numpy())
        return cls(torch.from_numpy(kind.cluster_centers_).float(), patch_size, images.shape[1])

    @staticmethod
    def _unfold(images: Tensor, patch_size: int) -> Tensor:
        if images.dim() != 4 or images.shape[-1] % patch_size or images.shape[-2] % patch_size:
            raise ValueError(f"expected images (B, C, H, W) with H and W multiples of patch_size {patch_size}, "
                             f"got shape {tuple(images.shape)}")
        return F.unfold(images.float(), patch_size, stride=patch_size).transpose(1, 2)  # (B, L, C*p*p)

    def encode(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, L)`` codes: the nearest centroid (Euclidean) of each patch."""
        if images.shape[1] != self.in_chans:
            raise ValueError(f"this codebook was fitted on {self.in_chans}-channel patches, got images "
                             f"of shape {tuple(images.shape)}")
        patches = self._unfold(images, self.patch_size)
        return torch.cdist(patches, self.centroids.unsqueeze(0).expand(patches.shape[0], -1, -1)).argmin(-1)

    def decode(self, codes: Tensor, grid: int) -> Tensor:
        """``(B, L)`` codes, ``L = grid^2`` -> ``(B, C, grid * p, grid * p)`` images made of the centroids."""
        self.check_codes(codes)
        if codes.dim() != 2 or codes.shape[1] != grid * grid:
            raise ValueError(f"expected codes (B, L={grid * grid}), got shape {tuple(codes.shape)}")
        patches = self.centroids[codes].transpose(1, 2)  # (B, C*p*p, L)
        side = grid * self.patch_size
        return F.fold(patches, (side, side), self.patch_size, stride=self.patch_size)

    def check_codes(self, codes: Tensor) -> None:
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and not codes.is_meta and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"codes must lie in 0 .. {self.vocab_size - 1} (this codebook has {self.vocab_size}); "
                             f"got values from {int(codes.min())} to {int(codes.max())}")

    def extra_repr(self) -> str:
        return f"codes={self.vocab_size}, patch_size={self.patch_size}, in_chans={self.in_chans}"


@dataclass
class ImageMultiplexerConfig(VisionConfig):
    n_mux: int = 2  # N: images per forward pass
    patchifier: str = "discrete"  # "discrete" (codes -> embeddings) or "cnn" (patch embedding of pixels)
    num_codes: int | None = 64  # size of the codebook (the patch vocabulary); None: no codebook (cnn only)
    mux_seed: int = 0  # seed of the fixed orthogonal transforms

    def __post_init__(self):
        if self.patchifier == "cnn" and isinstance(self.image_size, int) and isinstance(self.patch_size, int) \
                and self.patch_size > 0 and self.image_size % self.patch_size:
            raise ValueError(f"the cnn patchifier is a convolution with kernel = stride = patch_size {self.patch_size}: "
                             f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}, so its "
                             f"last {self.image_size % self.patch_size} pixel row(s) and column(s) would be dropped; "
                             "resize the images or choose a patch size that divides them")
        super().__post_init__()
        check_n(self.n_mux)
        if self.patchifier not in PATCHIFIERS:
            raise ValueError(f"unknown patchifier {self.patchifier!r}; expected one of {list(PATCHIFIERS)}")
        if self.num_codes is not None:
            check_n(self.num_codes, name="num_codes")
        elif self.patchifier == "discrete":
            raise ValueError("the discrete patchifier needs num_codes, the size of its codebook")


class ImageMultiplexerModel(SavedByFolder, nn.Module):
    """The Image Multiplexer; ``forward(x, return_retrieval=False)``.

    ``x``: images ``(B, N, C, H, W)``, or codes ``(B, N, L)`` (integers) for the discrete
    patchifier. Returns logits ``(B, N, num_classes)``; with ``return_retrieval=True`` a dict
    with ``logits``, ``retrieval_logits`` ``(B, N, L, K)`` and ``retrieval_labels`` ``(B, N, L)``
    (each image's own codes).

    ``tokenizer``: the codebook (a :class:`PatchCodebook` fitted on training images, or any
    module with ``encode`` and ``vocab_size``); its size must be ``config.num_codes``. It is
    part of the model (its buffers are saved with it) and never trained.
    """

    config_class = ImageMultiplexerConfig

    def __init__(self, config: ImageMultiplexerConfig | None = None, tokenizer: nn.Module | None = None,
                 load_pretrained: bool = True, **kwargs):
        super().__init__()
        c = self.config = config if config is not None else ImageMultiplexerConfig(**kwargs)
        self.n_mux = c.n_mux
        if tokenizer is None and c.num_codes is not None:
            raise ValueError(f"num_codes={c.num_codes} needs the tokenizer that makes the codes: e.g. "
                             "tokenizer=PatchCodebook.fit(train_images, num_codes, patch_size)")
        if tokenizer is not None:
            if getattr(tokenizer, "vocab_size", None) != c.num_codes:
                raise ValueError(f"the tokenizer has {getattr(tokenizer, 'vocab_size', None)} codes, the "
                                 f"configuration num_codes={c.num_codes}")
            for name in ("patch_size", "in_chans"):
                if getattr(tokenizer, name, getattr(c, name)) != getattr(c, name):
                    raise ValueError(f"the tokenizer's {name} is {getattr(tokenizer, name)}, the model's "
                                     f"{getattr(c, name)}: one code per ViT patch needs the same")
        self.tokenizer = tokenizer.requires_grad_(False) if tokenizer is not None else None
        self.vit = build_vit(c, load_pretrained)
        self.code_embed = nn.Embedding(c.num_codes, c.embed_dim) if c.patchifier == "discrete" else None
        self.multiplexer = MLPOrthogonalMultiplexer(c.n_mux, c.embed_dim, c.mux_seed)
        self.demultiplexer = MLPDemultiplexer(c.n_mux, c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        self.retrieval_head = nn.Linear(c.embed_dim, c.num_codes) if c.num_codes is not None else None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.image_size, c.image_size)

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Patch tokens ``(B, N, L, d)`` (with position embeddings) and codes ``(B, N, L)`` (or None)."""
        c, b, L = self.config, x.shape[0], self.config.num_patches
        if not x.is_floating_point():
            if self.code_embed is None:
                raise ValueError("the cnn patchifier reads pixels: pass images (B, N, C, H, W), not codes")
            if x.dim() != 3 or tuple(x.shape[1:]) != (c.n_mux, L):
                raise ValueError(f"expected codes (B, N={c.n_mux}, L={L}), got shape {tuple(x.shape)}")
            if hasattr(self.tokenizer, "check_codes"):
                self.tokenizer.check_codes(x)
            codes, images = x, None
        else:
            images = images_of(x, c.n_mux, self.in_shape)
            codes = self.tokenizer.encode(images).view(b, c.n_mux, L) if self.tokenizer is not None else None
        if self.code_embed is not None:
            tokens = self.code_embed(codes)
        else:
            tokens = self.vit.patch_embed(images).view(b, c.n_mux, L, -1)
        return self.vit.norm_pre(self.vit.pos_drop(tokens + self.vit.pos_embed[:, 1:].unsqueeze(1))), codes

    def forward(self, x: Tensor, return_retrieval: bool = False):
        tokens, codes = self._tokens(x)
        h = read_with_cls(self.vit, self.multiplexer(tokens), self.vit.blocks)  # (B, 1 + L, d)
        if not return_retrieval:
            return self.head(self.demultiplexer(h[:, 0]))  # (B, N, C)
        if self.retrieval_head is None:
            raise ValueError("token retrieval needs a codebook: build the model with num_codes and a tokenizer")
        per = self.demultiplexer(h)  # (B, N, 1 + L, d)
        labels = codes if codes is not None else torch.full(per.shape[:2] + (per.shape[2] - 1,), IGNORE_INDEX)
        return {"logits": self.head(per[:, :, 0]), "retrieval_logits": self.retrieval_head(per[:, :, 1:]),
                "retrieval_labels": labels}

    @classmethod
    def empty(cls, config: ImageMultiplexerConfig) -> "ImageMultiplexerModel":
        """A model of ``config`` to load saved weights into: its codebook's centroids are zeros
        until then (downloads nothing)."""
        placeholder = None
        if config.num_codes is not None:
            placeholder = PatchCodebook(torch.zeros(config.num_codes, config.in_chans * config.patch_size**2),
                                        config.patch_size, config.in_chans)
        return cls(config, tokenizer=placeholder, load_pretrained=False)

    def extra_repr(self) -> str:
        return f"n_mux={self.config.n_mux}, patchifier={self.config.patchifier}"
