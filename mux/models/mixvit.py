"""MixViT: M subnetworks inside one ViT, separated only in its last blocks (multi-input multi-output).

Chapters 01 to 04 fed N inputs through one network for the price of one (throughput).
MixViT turns the same frame around, for accuracy: M = 2 subnetworks trained on mixed
inputs, whose M predictions for one image are averaged, an ensemble for about the cost of
one model.

Training, on M images at once (:class:`~mux.losses.MultiInputLoss`)::

    M images -> one patch embedding + position embedding             (B, M, L, d)
             -> token CutMix: each position from one image           (B, L, d)    multiplexer
             -> L self-attention blocks (CaiT) or GPSA blocks (ConViT)
             -> source attribution: t* = t + sum_i M_i * s_i(t)       (B, L, d)    demultiplexer
             -> CLS + class-attention blocks + LayerNorm -> CLS       (B, d)
             -> M dense heads d_i -> M predictions                   (B, M, C)
    loss = sum_i lambda_i * CE(y_i, p_i), lambda_i = share of tokens from image i (eq. 1)

Inference, on one image ("parallel inference", Fig. 2 and appendix I)::

    image -> embedding + blocks, once -> t
          -> t + s_i(t) for each i (SourceAttribution, tiled)          (B, M, L, d)
          -> class-attention once per subnetwork -> head d_i -> p_i   (B, M, C)
          -> mean of the M softmax probabilities: the ensemble        (B, 1, C)

The class-attention blocks (Touvron et al., 2021b) update only the CLS token, so running
them M times costs little beside the self-attention blocks: about ``(L + 0.5 M) / (L + 0.5)``
of the backbone by the paper's estimate (appendix A). ``mux.count_macs`` counts it.

Backbones come from ``timm``, never written here: ``backbone="cait"`` is timm's ``Cait``
(talking-heads self-attention with LayerScale, then class-attention blocks);
``backbone="convit"`` is timm's ``ConVit`` with every block a GPSA block, followed by timm's
CaiT class-attention blocks (``LayerScaleBlockClassAttn``). timm's ConViT ends with ordinary
self-attention blocks over CLS + patches, where CLS and patch tokens mix and no
per-subnetwork pass is cheap; the paper's ConViT (5 GPSA + 2 class-attention blocks, after
DyTox) is what this builds. With ``timm_name`` (``cait_*`` or ``convit_*``) the sizes are
timm's; a ``convit_*`` model keeps its GPSA blocks and its last (self-attention) blocks
are replaced by as many class-attention blocks.

With ``subnetworks=1`` (and ``source="none"``) the model is the backbone alone: the
single-input single-output baseline, one image in, one prediction out. :class:`SingleCutMix`
trains that baseline on MixViT's token CutMix with CutMix's lambda-weighted loss (one head,
no source attribution): the control that separates MixViT's multiple outputs from its mixing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..demultiplexers import SourceAttribution
from ..grouping import check_n
from ..multiplexers import TokenCutMixMultiplexer
from .vit import SavedByFolder, VisionConfig, images_of

__all__ = ["ClassAttentionConfig", "MixViTConfig", "MixViTModel", "ClassAttentionModel", "Subnetwork", "SingleCutMix",
           "build_class_attention_backbone", "ensemble_logits"]

BACKBONES = ("convit", "cait")


@dataclass
class ClassAttentionConfig(VisionConfig):
    """A ViT whose last blocks are class-attention blocks; ``depth`` counts the blocks before them."""

    backbone: str = "convit"  # convit (GPSA blocks) | cait (self-attention blocks with LayerScale)
    class_depth: int = 2  # class-attention blocks after the depth feature blocks
    subnetworks: int = 2  # M: dense heads, and inputs mixed per example at training
    init_values: float = 1e-4  # LayerScale initialisation (CaiT's blocks, every class-attention block)
    locality_strength: float = 1.0  # ConViT's initial locality of GPSA

    def __post_init__(self):
        super().__post_init__()
        name = self.timm_name or ""
        if name and not name.startswith(BACKBONES):
            raise ValueError(f"{name}: MixViT separates its subnetworks in class-attention blocks, which this timm "
                             "model has not; use a CaiT (cait_*) or a ConViT (convit_*, which gets class-attention "
                             "blocks in place of its last self-attention blocks)")
        if name and not name.startswith(self.backbone):
            raise ValueError(f"timm_name {name} is not a {self.backbone}: set backbone to match")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {list(BACKBONES)}")
        check_n(self.class_depth, name="class_depth (class-attention blocks; MixViT separates its subnetworks there)")
        check_n(self.subnetworks, name="subnetworks (M)")
        if not self.init_values > 0:
            raise ValueError(f"init_values must be > 0, got {self.init_values!r}")

    @classmethod
    def from_timm(cls, timm_name: str, **fields):
        """The sizes of timm's ``cait_*`` or ``convit_*`` model ``timm_name`` (built on the meta device)."""
        import timm

        if not timm_name.startswith(BACKBONES):
            cls(timm_name=timm_name)  # raises the error that names what MixViT needs
        with torch.device("meta"):
            net = timm.create_model(timm_name, pretrained=False, num_classes=0)
        backbone = "cait" if timm_name.startswith("cait") else "convit"
        depth = len(net.blocks) if backbone == "cait" else net.local_up_to_layer
        class_depth = len(net.blocks_token_only) if backbone == "cait" else len(net.blocks) - net.local_up_to_layer
        sizes = {"patch_size": net.patch_embed.patch_size[0], "embed_dim": net.embed_dim, "depth": depth,
                 "num_heads": net.blocks[0].attn.num_heads, "image_size": net.patch_embed.img_size[0],
                 "mlp_ratio": net.blocks[0].mlp.fc1.out_features / net.embed_dim,
                 "backbone": backbone, "class_depth": class_depth}
        return cls(**{**sizes, **fields, "timm_name": timm_name})


@dataclass
class MixViTConfig(ClassAttentionConfig):
    source: str = "embedding"  # source attribution: embedding (eq. 3) | encoding (eq. 2) | none

    def __post_init__(self):
        super().__post_init__()
        if self.source not in SourceAttribution.KINDS:
            raise ValueError(f"unknown source attribution {self.source!r}; expected one of "
                             f"{list(SourceAttribution.KINDS)}")
        if self.subnetworks == 1 and self.source != "none":
            raise ValueError("one subnetwork has no sources to tell apart: subnetworks=1 (the single-input "
                             "baseline) needs source='none'; MixViT needs subnetworks >= 2")


def build_class_attention_backbone(config: ClassAttentionConfig, load_pretrained: bool = True):
    """``(backbone, class_blocks)``: timm's ``Cait`` or ``ConVit`` without head, and its class-attention blocks.

    The backbone keeps patch embedding, position embedding, feature blocks, CLS token and
    final norm; the class-attention blocks are returned apart (moved out of a ``Cait``,
    built from timm's ``LayerScaleBlockClassAttn`` for a ``ConVit``)."""
    import timm
    from timm.models.cait import Cait, LayerScaleBlockClassAttn
    from timm.models.convit import ConVit

    c = config
    common = dict(img_size=c.image_size, in_chans=c.in_chans, num_classes=0, drop_path_rate=c.drop_path_rate)
    if c.backbone == "cait":
        if c.timm_name:
            net = timm.create_model(c.timm_name, pretrained=c.pretrained and load_pretrained, **common)
        else:
            net = Cait(patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                       mlp_ratio=c.mlp_ratio, init_values=c.init_values, depth_token_only=c.class_depth, **common)
        class_blocks, net.blocks_token_only = net.blocks_token_only, None
    else:
        if c.timm_name:
            net = timm.create_model(c.timm_name, pretrained=c.pretrained and load_pretrained, **common)
            net.blocks = net.blocks[:net.local_up_to_layer]  # its GPSA blocks; class attention follows
        else:
            # timm's ConVit takes the width per head (embed_dim * num_heads is its d)
            net = ConVit(patch_size=c.patch_size, embed_dim=c.embed_dim // c.num_heads, depth=c.depth, num_heads=c.num_heads,
                         mlp_ratio=c.mlp_ratio, local_up_to_layer=c.depth, locality_strength=c.locality_strength,
                         **common)
        class_blocks = nn.ModuleList([
            LayerScaleBlockClassAttn(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True,
                                     norm_layer=nn.LayerNorm, init_values=c.init_values)
            for _ in range(c.class_depth)])
        for block in class_blocks:
            block.apply(net._init_weights)
    built = (net.patch_embed.patch_size[0], net.embed_dim, len(net.blocks), len(class_blocks))
    wanted = (c.patch_size, c.embed_dim, c.depth, c.class_depth)
    if built != wanted:
        raise ValueError(f"timm's {c.timm_name} has (patch_size, embed_dim, depth, class_depth) = {built}, this "
                         f"configuration says {wanted}: build it with MixViTConfig.from_timm")
    return net, class_blocks


def ensemble_logits(logits: Tensor) -> Tensor:
    """The M subnetworks' mean probability, as logits: ``(B, M, C) -> (B, 1, C)``,
    ``log(mean_i softmax(p_i))`` (its argmax is the ensemble's class, its cross-entropy the
    ensemble's loss)."""
    return (torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=1, keepdim=True)
            - math.log(logits.shape[1])).to(logits.dtype)


class ClassAttentionModel(SavedByFolder, nn.Module):
    """What MixViT and the MIMO baselines share: a class-attention backbone and M dense heads.

    ``extract(tokens)``: the feature blocks; ``classify(tokens)``: CLS through the
    class-attention blocks and the final norm, ``(B, L, d) -> (B, d)``; ``heads[i]``: subnetwork
    i's dense layer d_i. ``subnetwork(i)`` is subnetwork i alone as a model that
    :func:`mux.evaluate` runs with n = 1.
    """

    config_class = ClassAttentionConfig
    n_mux = 1  # mux.evaluate feeds one image per example; training mixes M (MultiInputLoss)

    def __init__(self, config: ClassAttentionConfig | None = None, load_pretrained: bool = True, **kwargs):
        super().__init__()
        c = self.config = config if config is not None else self.config_class(**kwargs)
        self.subnetworks = c.subnetworks
        self.backbone, self.class_blocks = build_class_attention_backbone(c, load_pretrained)
        self.heads = nn.ModuleList([nn.Linear(c.embed_dim, c.num_classes) for _ in range(c.subnetworks)])

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.image_size, c.image_size)

    def add_positions(self, tokens: Tensor) -> Tensor:
        net = self.backbone
        if getattr(net, "pos_embed", None) is not None:
            tokens = tokens + net.pos_embed.to(tokens.dtype)
        return net.pos_drop(tokens)

    def extract(self, tokens: Tensor) -> Tensor:
        for block in self.backbone.blocks:
            tokens = block(tokens)
        return tokens

    def classify(self, tokens: Tensor) -> Tensor:
        # a copy, not an expanded view: a view of a parameter made under no_grad passes for a tensor that needs
        # a gradient but has none, which trips the module hooks of torch's FlopCounterMode (mux.count_macs)
        cls = self.backbone.cls_token.to(tokens.dtype).repeat(tokens.shape[0], 1, 1)
        for block in self.class_blocks:
            cls = block(tokens, cls)
        return self.backbone.norm(cls)[:, 0]

    def predict_each(self, cls: Tensor) -> Tensor:
        """Subnetwork i's head on ``cls[:, i]``: ``(B, M, d) -> (B, M, C)``."""
        return torch.stack([head(cls[:, i]) for i, head in enumerate(self.heads)], dim=1)

    def subnetwork_features(self, x: Tensor) -> Tensor:
        """What each subnetwork's dense head reads for one image: ``(B, 1, C, H, W) -> (B, M, d)``
        (the M class tokens after class attention and the final norm)."""
        raise NotImplementedError

    def subnetwork(self, index: int) -> "Subnetwork":
        if not 0 <= index < self.subnetworks:
            raise ValueError(f"subnetwork index {index} out of range: this model has {self.subnetworks}")
        return Subnetwork(self, index)

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token"}


class Subnetwork(nn.Module):
    """One subnetwork of a multi-output model, as a model with one output: ``(B, 1, C, H, W) -> (B, 1, C)``."""

    n_mux = 1

    def __init__(self, model: ClassAttentionModel, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, return_subnetworks=True)[:, self.index:self.index + 1]


class MixViTModel(ClassAttentionModel):
    """MixViT (see the module docstring); with ``subnetworks=1`` the single-input backbone.

    ``forward(x, sources=None, return_subnetworks=False)``:

    - training pass: ``x`` ``(B, M, C, H, W)`` (M images per example) and ``sources``
      ``(B, M, L)``, the CutMix source mask (:func:`mux.multiplexers.cutmix_sources`) ->
      ``(B, M, num_classes)``, subnetwork i's prediction for image i;
    - inference: ``x`` ``(B, 1, C, H, W)`` -> the ensemble ``(B, 1, num_classes)``
      (:func:`ensemble_logits`), or with ``return_subnetworks=True`` the M subnetworks'
      logits ``(B, M, num_classes)``.
    """

    config_class = MixViTConfig

    def __init__(self, config: MixViTConfig | None = None, load_pretrained: bool = True, **kwargs):
        super().__init__(config, load_pretrained, **kwargs)
        c = self.config
        self.multiplexer = TokenCutMixMultiplexer(c.subnetworks, c.embed_dim) if c.subnetworks > 1 else None
        self.attribution = SourceAttribution(c.subnetworks, c.embed_dim, c.source) if c.subnetworks > 1 else None

    def forward(self, x: Tensor, sources: Tensor | None = None, return_subnetworks: bool = False) -> Tensor:
        m, b = self.subnetworks, x.shape[0]
        if sources is not None:  # training: M images mixed into one pass
            images = images_of(x, m, self.in_shape)
            if m < 2:
                raise ValueError("a source mask mixes M >= 2 inputs; this model has one subnetwork")
            tokens = self.add_positions(self.backbone.patch_embed(images)).view(b, m, -1, self.config.embed_dim)
            t = self.extract(self.multiplexer(tokens, sources))
            cls = self.classify(self.attribution(t, sources=sources))
            return self.predict_each(cls.unsqueeze(1).expand(-1, m, -1))
        t = self.extract(self.add_positions(self.backbone.patch_embed(images_of(x, 1, self.in_shape))))
        if m == 1:
            return self.heads[0](self.classify(t)).view(b, 1, -1)
        tiled = self.attribution(t)  # (B, M, L, d): features once, attributed M times
        cls = self.classify(tiled.flatten(0, 1)).view(b, m, -1)  # class attention once per subnetwork
        logits = self.predict_each(cls)
        return logits if return_subnetworks else ensemble_logits(logits)

    def subnetwork_features(self, x: Tensor) -> Tensor:
        """Parallel inference up to the heads: ``(B, 1, C, H, W) -> (B, M, d)``, subnetwork i's class
        token (what ``heads[i]`` reads); M = 1 for the single-input model."""
        b = x.shape[0]
        t = self.extract(self.add_positions(self.backbone.patch_embed(images_of(x, 1, self.in_shape))))
        if self.subnetworks == 1:
            return self.classify(t).view(b, 1, -1)
        return self.classify(self.attribution(t).flatten(0, 1)).view(b, self.subnetworks, -1)

    def extra_repr(self) -> str:
        c = self.config
        return f"backbone={c.backbone}, depth={c.depth}+{c.class_depth}, subnetworks={c.subnetworks}, source={c.source}"


class SingleCutMix(nn.Module):
    """The single-input model trained on MixViT's token CutMix: a control the paper does not run.

    Wraps a single-input :class:`MixViTModel` (``subnetworks=1``). Training, with
    :class:`mux.losses.MultiInputLoss` ``("token_cutmix")``: ``x`` ``(B, M, C, H, W)`` and the source
    mask ``sources`` ``(B, M, L)`` -> the M images' tokens cut-mixed exactly as MixViT mixes them ->
    the backbone and its ONE head -> one prediction ``(B, C)``, returned M times ``(B, M, C)`` so that
    the loss is ``sum_i lambda_i CE(y_i, p)``: CutMix's lambda-weighted cross-entropy on tokens.
    Inference (``sources=None``): the wrapped model on one image, ``(B, 1, C, H, W) -> (B, 1, C)``.

    Everything MixViT adds beyond the mixing (source attribution, M heads, M class-attention
    passes) is absent, so a comparison with MixViT isolates the multiple outputs from the mixing.
    ``model`` holds the trained single-input model.
    """

    n_mux = 1

    def __init__(self, model: MixViTModel, inputs: int = 2):
        super().__init__()
        if not isinstance(model, MixViTModel) or model.subnetworks != 1:
            raise ValueError("SingleCutMix wraps the single-input MixViTModel (subnetworks=1, source='none'), got "
                             f"{type(model).__name__} with {getattr(model, 'subnetworks', '?')} subnetworks")
        self.model = model
        self.subnetworks = check_n(inputs, name="inputs (images cut-mixed per example)")
        if self.subnetworks < 2:
            raise ValueError(f"CutMix mixes M >= 2 images, got inputs={inputs}")
        self.multiplexer = TokenCutMixMultiplexer(self.subnetworks, model.config.embed_dim)

    @property
    def config(self) -> MixViTConfig:  # what MultiInputLoss reads to draw masks: image_size, patch_size
        return self.model.config

    def forward(self, x: Tensor, sources: Tensor | None = None) -> Tensor:
        if sources is None:
            return self.model(x)
        net, m, b = self.model, self.subnetworks, x.shape[0]
        tokens = net.add_positions(net.backbone.patch_embed(images_of(x, m, net.in_shape)))
        mixed = self.multiplexer(tokens.view(b, m, -1, net.config.embed_dim), sources)
        logits = net.heads[0](net.classify(net.extract(mixed)))  # (B, C): one prediction for the mixture
        return logits.unsqueeze(1).expand(-1, m, -1)

    def extra_repr(self) -> str:
        return f"token CutMix of {self.subnetworks} inputs, one head"
