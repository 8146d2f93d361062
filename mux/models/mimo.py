"""MIMO and MixMo carried over to vision Transformers: the baselines of MixViT's Table 6.

MixViT's appendix C transposes the CNN multi-input multi-output frameworks to ViTs: each of
the M inputs gets its own patch embedding e_i, the M embedded token grids are mixed
position by position into one, the whole backbone (feature blocks and class-attention
blocks) reads the mixture, and M dense heads give M predictions::

    M images -> pixel patches -> e_i per image, weighted sum (MIMOMultiplexer)   (B, L, d)
             -> + position embedding -> feature blocks -> CLS + class attention
             -> M dense heads                                                  (B, M, C)

- **MIMO** (Havasi et al., 2021): the sum of the M embeddings, every loss weighted 1.
- **MixMo** (Rame et al., 2021): with probability 0.5 a CutMix of the embeddings (a box on the
  token grid, times 2), otherwise the linear mix ``2 lambda e_0 + 2 (1 - lambda) e_1``; losses weighted
  by lambda; over the last twelfth of training the CutMix probability falls to 0.

Both mixings are drawn by :class:`mux.losses.MultiInputLoss` (``mixing="sum"`` or
``"mixmo"``). At inference one image is embedded by all M encoders and the embeddings are
summed ("sum inference"): one pass, M predictions, averaged. Unlike MixViT, the
subnetworks are told apart at the input, by their encoders, and the network cannot run
them separately without M full passes.

:class:`MIMOCNNModel` is the same framework on a small CNN, the family MIMO and MixMo were made
for (the paper's Figure 5 contrasts MixViT with a CNN MixMo): M first convolutions (the input
encoders), their feature maps mixed pixel by pixel with the same weights, then chapter 01's CNN
trunk (:class:`mux.models.datamux.DataMUXClassifier`'s convolution blocks and global average
pool) and M dense heads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..multiplexers import MIMOMultiplexer
from ..grouping import check_n
from .datamux import DataMUXClassifier, DataMUXConfig
from .mixvit import ClassAttentionConfig, ClassAttentionModel, Subnetwork, ensemble_logits
from .vit import images_of

__all__ = ["MIMOViTConfig", "MIMOViTModel", "MIMOCNNConfig", "MIMOCNNModel"]


@dataclass
class MIMOViTConfig(ClassAttentionConfig):
    def __post_init__(self):
        super().__post_init__()
        if self.subnetworks < 2:
            raise ValueError(f"MIMO trains M >= 2 subnetworks on M mixed inputs, got subnetworks={self.subnetworks}; "
                             "the single-input baseline is MixViTModel with subnetworks=1")


class MIMOViTModel(ClassAttentionModel):
    """MIMO / MixMo on a class-attention ViT (see the module docstring).

    ``forward(x, sources=None, return_subnetworks=False)``: ``x`` ``(B, M, C, H, W)`` with
    per-position mixing weights ``sources`` ``(B, M, L)`` (training) -> ``(B, M, C)``; ``x``
    ``(B, 1, C, H, W)`` -> the ensemble ``(B, 1, C)`` from one summed pass, or the M logits with
    ``return_subnetworks=True``.
    """

    config_class = MIMOViTConfig

    def __init__(self, config: MIMOViTConfig | None = None, load_pretrained: bool = True, **kwargs):
        super().__init__(config, load_pretrained, **kwargs)
        c = self.config
        self.multiplexer = MIMOMultiplexer(c.subnetworks, c.embed_dim, c.in_chans * c.patch_size ** 2)
        self.backbone.patch_embed = nn.Identity()  # replaced by the M input encoders

    def patches(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, L, C * p * p)``: the pixel patches a patch embedding reads, row-major."""
        p = self.config.patch_size
        return F.unfold(images, p, stride=p).transpose(1, 2)

    def forward(self, x: Tensor, sources: Tensor | None = None, return_subnetworks: bool = False) -> Tensor:
        m, b = self.subnetworks, x.shape[0]
        if sources is not None:
            patches = self.patches(images_of(x, m, self.in_shape)).view(b, m, -1, self.multiplexer.patch_dim)
        else:  # inference: every encoder reads the same image, the encodings are summed
            patches = self.patches(images_of(x, 1, self.in_shape)).unsqueeze(1).expand(-1, m, -1, -1)
        t = self.extract(self.add_positions(self.multiplexer(patches, sources)))
        logits = self.predict_each(self.classify(t).unsqueeze(1).expand(-1, m, -1))
        return logits if sources is not None or return_subnetworks else ensemble_logits(logits)

    def subnetwork_features(self, x: Tensor) -> Tensor:
        """``(B, 1, C, H, W) -> (B, M, d)``: what each head reads, the one shared class token M times."""
        patches = self.patches(images_of(x, 1, self.in_shape)).unsqueeze(1).expand(-1, self.subnetworks, -1, -1)
        cls = self.classify(self.extract(self.add_positions(self.multiplexer(patches))))
        return cls.unsqueeze(1).expand(-1, self.subnetworks, -1)

    def extra_repr(self) -> str:
        c = self.config
        return f"backbone={c.backbone}, depth={c.depth}+{c.class_depth}, subnetworks={c.subnetworks}"


@dataclass
class MIMOCNNConfig:
    """A MIMO / MixMo CNN. ``patch_size`` is 1: :class:`mux.losses.MultiInputLoss` draws its mixing
    weights on a grid of ``image_size / patch_size`` positions, here every pixel of the feature map."""

    in_chans: int = 1
    image_size: int = 8
    num_classes: int = 10
    width: int = 32  # channels of every convolution (d, what each head reads)
    depth: int = 2  # convolution blocks of the trunk (chapter 01's CNN)
    subnetworks: int = 2  # M: input encoders and dense heads
    patch_size: int = 1

    def __post_init__(self):
        for name in ("in_chans", "image_size", "num_classes", "width", "depth"):
            check_n(getattr(self, name), name=name)
        check_n(self.subnetworks, name="subnetworks (M)")
        if self.subnetworks < 2:
            raise ValueError(f"MIMO trains M >= 2 subnetworks, got subnetworks={self.subnetworks}")
        if self.patch_size != 1:
            raise ValueError(f"a MIMO CNN mixes pixel by pixel: patch_size must be 1, got {self.patch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class MIMOCNNModel(nn.Module):
    """MIMO / MixMo on a small CNN: ``(B, M, C, H, W)`` and mixing weights ``sources`` ``(B, M, H * W)``
    (training) -> ``(B, M, num_classes)``; ``(B, 1, C, H, W)`` -> the ensemble ``(B, 1, num_classes)``
    (the M encoders read the same image and their maps are summed), or the M logits with
    ``return_subnetworks=True``.

    ``encoders[i]``: input i's 3x3 convolution to ``width`` channels (Rame et al., 2021: the
    encoders are the first layer); the mixture ``sum_i w_i * encoders[i](x_i)`` goes through a GELU
    and the trunk of chapter 01's CNN (``depth`` blocks of 3x3 convolution + GELU, then the mean over
    H and W) to a ``(B, width)`` vector that every head reads: the subnetworks share the whole trunk
    and are told apart only by their encoders.
    """

    n_mux = 1

    def __init__(self, config: MIMOCNNConfig | None = None, **kwargs):
        super().__init__()
        c = self.config = config if config is not None else MIMOCNNConfig(**kwargs)
        self.subnetworks = c.subnetworks
        self.encoders = nn.ModuleList([nn.Conv2d(c.in_chans, c.width, 3, padding=1) for _ in range(c.subnetworks)])
        cnn = DataMUXClassifier(DataMUXConfig(n_mux=1, backbone="cnn", vanilla=True, width=c.width, depth=c.depth,
                                              in_shape=self.in_shape, num_classes=c.num_classes))
        self.trunk = nn.Sequential(nn.GELU(), cnn.backbone)  # chapter 01's CNN after its front
        self.heads = nn.ModuleList([nn.Linear(c.width, c.num_classes) for _ in range(c.subnetworks)])

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.config.in_chans, self.config.image_size, self.config.image_size)

    def subnetwork_features(self, x: Tensor, sources: Tensor | None = None) -> Tensor:
        """What each head reads: ``(B, M or 1, C, H, W) -> (B, M, width)`` (one shared vector, M times)."""
        m, b, (_, h, w) = self.subnetworks, x.shape[0], self.in_shape
        if sources is not None:
            images = images_of(x, m, self.in_shape).view(b, m, *self.in_shape)
            weights = sources.view(b, m, 1, h, w).to(x.dtype)
        else:
            images = images_of(x, 1, self.in_shape).view(b, 1, *self.in_shape).expand(-1, m, -1, -1, -1)
            weights = torch.ones(b, m, 1, h, w, dtype=x.dtype, device=x.device)
        mixed = sum(weights[:, i] * enc(images[:, i]) for i, enc in enumerate(self.encoders))
        return self.trunk(mixed).unsqueeze(1).expand(-1, m, -1)

    def forward(self, x: Tensor, sources: Tensor | None = None, return_subnetworks: bool = False) -> Tensor:
        feats = self.subnetwork_features(x, sources)
        logits = torch.stack([head(feats[:, i]) for i, head in enumerate(self.heads)], dim=1)
        return logits if sources is not None or return_subnetworks else ensemble_logits(logits)

    def subnetwork(self, index: int) -> Subnetwork:
        if not 0 <= index < self.subnetworks:
            raise ValueError(f"subnetwork index {index} out of range: this model has {self.subnetworks}")
        return Subnetwork(self, index)

    def extra_repr(self) -> str:
        return f"width={self.config.width}, depth={self.config.depth}, subnetworks={self.subnetworks}"
