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
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from ..multiplexers import MIMOMultiplexer
from .mixvit import ClassAttentionConfig, ClassAttentionModel, ensemble_logits
from .vit import images_of

__all__ = ["MIMOViTConfig", "MIMOViTModel"]


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

    def extra_repr(self) -> str:
        c = self.config
        return f"backbone={c.backbone}, depth={c.depth}+{c.class_depth}, subnetworks={c.subnetworks}"
