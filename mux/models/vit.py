"""Vision Transformers from ``timm``, and the vanilla ViT classifier (the N = 1 baseline of chapter 04).

Every vision model of the course holds one ``timm`` ``VisionTransformer`` (patch embedding,
position embedding, CLS token, blocks, final LayerNorm), built by :func:`build_vit` from a
:class:`VisionConfig`, and uses its parts in its own order:

- :class:`ViTClassifier` (here): the plain ViT, one image per pass, classified from CLS.
- ``ImageMultiplexerModel`` (``image_multiplexer.py``): DataMUX on patch tokens.
- ``ConcatPlexerModel`` (``concatplexer.py``): the first blocks per image, the rest shared.

Small models for the CPU come from explicit sizes (``embed_dim``, ``depth``, ...); at full
scale ``VisionConfig.from_timm("vit_base_patch16_224", pretrained=True, ...)`` takes the
sizes of a ``timm`` model by name, and :func:`build_vit` then builds that model with
``timm.create_model`` (downloading its weights from the Hugging Face Hub when
``pretrained=True``).

Models save to a folder (``config.json`` + ``model.safetensors``) with ``model.save(folder)``;
``Class.load(folder, expect=None)`` refuses a folder written by another class or configuration
(:mod:`mux.models.common`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..grouping import check_n
from . import common

__all__ = ["VisionConfig", "build_vit", "ViTClassifier", "SavedByFolder",
           "images_of", "read_with_cls"]

@dataclass
class VisionConfig:
    """The ViT shared by every vision model of the course; saved with every checkpoint."""

    num_classes: int = 10
    image_size: int = 8  # pixels, square images
    patch_size: int = 2  # pixels per patch side: (image_size / patch_size)^2 tokens per image
    in_chans: int = 1
    embed_dim: int = 64  # d
    depth: int = 4  # Transformer blocks in all
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    timm_name: str | None = None  # a timm model name (e.g. "vit_base_patch16_224"); None: the sizes above
    pretrained: bool = False  # with timm_name: start from timm's pretrained weights (downloads them)

    def __post_init__(self):
        for name in ("num_classes", "image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            check_n(getattr(self, name), name=name)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: "
                             "a ViT cuts the image into whole patches; choose sizes such that "
                             "image_size % patch_size == 0 (or resize the images)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}")
        if not self.mlp_ratio > 0 or not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"need mlp_ratio > 0 and 0 <= drop_path_rate < 1, got {self.mlp_ratio}, "
                             f"{self.drop_path_rate}")
        if self.pretrained and not self.timm_name:
            raise ValueError("pretrained=True needs timm_name, the timm model whose weights to load")

    @property
    def num_patches(self) -> int:
        """L: tokens per image (without CLS)."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_timm(cls, timm_name: str, **fields):
        """A configuration with the sizes of ``timm``'s model ``timm_name`` (patch size, width,
        depth, heads, MLP ratio, image size unless given): the model is built on the meta
        device, so nothing is allocated or downloaded here."""
        import timm

        with torch.device("meta"):
            vit = timm.create_model(timm_name, pretrained=False, num_classes=0)
        sizes = {"patch_size": vit.patch_embed.patch_size[0], "embed_dim": vit.embed_dim,
                 "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
                 "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
                 "image_size": vit.patch_embed.img_size[0]}
        return cls(**{**sizes, **fields, "timm_name": timm_name})


def build_vit(config: VisionConfig, load_pretrained: bool = True) -> nn.Module:
    """The ``timm`` ``VisionTransformer`` of ``config``, without a classifier head (``num_classes=0``),
    with a CLS token and a learned position embedding for CLS + L patches. ``load_pretrained=False``
    skips the download of ``config.pretrained`` weights (a saved model brings its own)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    common = dict(img_size=config.image_size, in_chans=config.in_chans, num_classes=0,
                  drop_path_rate=config.drop_path_rate)
    if config.timm_name:
        vit = timm.create_model(config.timm_name, pretrained=config.pretrained and load_pretrained, **common)
        built = (vit.patch_embed.patch_size[0], vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads)
        wanted = (config.patch_size, config.embed_dim, config.depth, config.num_heads)
        if built != wanted:
            raise ValueError(f"timm's {config.timm_name} has (patch_size, embed_dim, depth, num_heads) = {built}, "
                             f"this configuration says {wanted}: build it with VisionConfig.from_timm")
    else:
        vit = VisionTransformer(patch_size=config.patch_size, embed_dim=config.embed_dim, depth=config.depth,
                                num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, class_token=True,
                                global_pool="token", **common)
    if vit.cls_token is None or vit.pos_embed is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
        raise ValueError(f"{config.timm_name}: the course's vision models need a ViT with one CLS token and a "
                         "learned position embedding that covers it (timm's vit_* models)")
    return vit


def images_of(x: Tensor, n: int, in_shape: tuple[int, int, int]) -> Tensor:
    """Check a grouped image batch ``(B, N, C, H, W)`` and return it flattened to ``(B * N, C, H, W)``."""
    if x.dim() != 5 or x.shape[1] != n or tuple(x.shape[2:]) != tuple(in_shape):
        raise ValueError(f"expected images (B, N={n}, C, H, W) = (B, {n}, {', '.join(map(str, in_shape))}), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point pixels, got {x.dtype}")
    return x.reshape(-1, *x.shape[2:])


def read_with_cls(vit: nn.Module, tokens: Tensor, blocks) -> Tensor:
    """A ViT's CLS token (with its position embedding) in front of ``tokens`` ``(B, L, d)``, through
    ``blocks`` (some or all of ``vit.blocks``) and the final LayerNorm: ``(B, 1 + L, d)``. How the
    multiplexed models read a mixture or a concatenation with the ViT's own CLS."""
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    h = torch.cat([cls, tokens], dim=1)
    for block in blocks:
        h = block(h)
    return vit.norm(h)


class SavedByFolder(common.SavedByFolder):
    """Saving for the vision models (:class:`mux.models.common.SavedByFolder`); ``empty`` downloads
    no pretrained weights."""

    config_class = VisionConfig
    saved_format = "mux-vision"
    saved_what = "vision model"

    @classmethod
    def empty(cls, config: VisionConfig):
        return cls(config, load_pretrained=False)


class ViTClassifier(SavedByFolder, nn.Module):
    """The vanilla ViT: one image per pass, ``head(norm(blocks(CLS + patches))[CLS])``.

    Takes and returns the shapes of the multiplexed models with N = 1, ``(B, 1, C, H, W) ->
    (B, 1, num_classes)``, so ``mux.train`` and ``mux.evaluate`` run it with n=1.
    :meth:`features` gives the final CLS state (B, d), what a teacher provides.
    """

    n_mux = 1

    def __init__(self, config: VisionConfig | None = None, load_pretrained: bool = True, **kwargs):
        super().__init__()
        self.config = config if config is not None else VisionConfig(**kwargs)
        self.vit = build_vit(self.config, load_pretrained)
        self.head = nn.Linear(self.config.embed_dim, self.config.num_classes)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.image_size, c.image_size)

    def features(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` images -> their final CLS states ``(B, d)``."""
        return self.vit.forward_features(images)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        images = images_of(x, 1, self.in_shape)
        return self.head(self.features(images)).view(x.shape[0], 1, -1)
