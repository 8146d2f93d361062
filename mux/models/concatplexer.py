"""ConcatPlexer: shorten each image's tokens, concatenate N images, run one ViT (section 3.2, Fig. 1b).

    N images -> TrE patchifier, per image: patch embedding + position embedding + the
                first k ViT blocks (k = the "concat point")          (B*N, L, d)
             -> C-Multiplexer: conv1d (kernel = stride = N), L -> L/N tokens per image,
                times a fixed code per slot, the N images concatenated into L tokens,
                + position embedding                                  (B, L, d)
             -> CLS + the remaining depth - k blocks (one pass for all N) + LayerNorm
             -> N MLP demultiplexers on CLS -> shared head -> N logits
                                            -> feature head -> N features (CLIP loss)

Where the cost goes: the first k blocks run once per image at L tokens, the other
depth - k once per N images at L + 1 tokens, so a pass costs about
``k + (depth - k) / N`` blocks per image against ``depth`` for the ViT.
ConcatPlexer (1)-(4) of the paper's Table 1 are ViT-B/16 (12 blocks, 196 tokens) with
(N, k) = (2, 1), (2, 3), (2, 6) and (4, 1).

``forward(x, return_features=False, smoothing_alpha=None)``: ``x`` images ``(B, N, C, H, W)``.
Returns logits ``(B, N, num_classes)``, or, when asked, a dict with ``logits`` and

- ``features`` ``(B, N, teacher_dim)``: each demultiplexed CLS through the feature head,
  for the CLIP loss (eq. 4); needs ``teacher_dim``;
- ``smooth_logits`` ``(B, N, num_classes)``: a second pass from the C-Multiplexer on,
  where slot i holds ``alpha * T_i + (1 - alpha) / (N - 1) * sum_{n != i} T_n`` of the
  patchifier's tokens T (eq. 5, :func:`mux.multiplexers.tuple_mixup`); the patchifier runs
  once for both passes.

The teacher of the CLIP loss is a :class:`FeatureTeacher`: a CLIP vision encoder from
``transformers`` at full scale (:meth:`FeatureTeacher.from_clip`), or offline a ViT the
notebook trained (:meth:`FeatureTeacher.from_vit`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..demultiplexers import MLPDemultiplexer
from ..grouping import check_n
from ..multiplexers import ConcatMultiplexer, tuple_mixup
from .vit import SavedByFolder, VisionConfig, ViTClassifier, build_vit, images_of, read_with_cls

__all__ = ["ConcatPlexerConfig", "ConcatPlexerModel", "FeatureTeacher", "TABLE1"]

#: ConcatPlexer (1)-(4) of the paper's Table 1 (ImageNet-1k): (N, concat point) on ViT-B/16.
TABLE1 = {1: (2, 1), 2: (2, 3), 3: (2, 6), 4: (4, 1)}


@dataclass
class ConcatPlexerConfig(VisionConfig):
    n_mux: int = 2  # N: images per forward pass
    concat_point: int = 1  # k: blocks run per image before the concatenation (0 = none: pixels patches)
    teacher_dim: int | None = None  # feature size of the CLIP loss's teacher; None: no feature head
    mux_seed: int = 0  # seed of the C-Multiplexer's fixed slot codes

    def __post_init__(self):
        super().__post_init__()
        check_n(self.n_mux)
        k = self.concat_point
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.depth:
            raise ValueError(f"concat_point must be an integer in 0 .. depth - 1 = {self.depth - 1}: k blocks run per "
                             f"image and depth - k after the concatenation, and the backbone needs at least one "
                             f"block to read the N images into CLS; got {k!r}")
        if self.num_patches % self.n_mux:
            raise ValueError(f"{self.num_patches} tokens per image ((image_size {self.image_size} / patch_size "
                             f"{self.patch_size})^2) are not a multiple of N={self.n_mux}: the C-Multiplexer's "
                             "convolution (kernel = stride = N) would drop tokens, so it refuses; change the sizes or N")
        if self.teacher_dim is not None:
            check_n(self.teacher_dim, name="teacher_dim")


class ConcatPlexerModel(SavedByFolder, nn.Module):
    """ConcatPlexer; see the module docstring."""

    config_class = ConcatPlexerConfig

    def __init__(self, config: ConcatPlexerConfig | None = None, load_pretrained: bool = True, **kwargs):
        super().__init__()
        c = self.config = config if config is not None else ConcatPlexerConfig(**kwargs)
        self.n_mux = c.n_mux
        self.vit = build_vit(c, load_pretrained)  # blocks[:k]: TrE patchifier; blocks[k:]: shared backbone
        self.multiplexer = ConcatMultiplexer(c.n_mux, c.embed_dim, c.num_patches, c.mux_seed)
        self.demultiplexer = MLPDemultiplexer(c.n_mux, c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        self.feature_head = nn.Linear(c.embed_dim, c.teacher_dim) if c.teacher_dim else None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.image_size, c.image_size)

    def patchify(self, x: Tensor) -> Tensor:
        """The TrE patchifier: images ``(B, N, C, H, W)`` -> tokens ``(B, N, L, d)``, each image on its own."""
        vit, b = self.vit, x.shape[0]
        tokens = vit.patch_embed(images_of(x, self.n_mux, self.in_shape)) + vit.pos_embed[:, 1:]
        tokens = vit.norm_pre(vit.pos_drop(tokens))
        for block in vit.blocks[:self.config.concat_point]:
            tokens = block(tokens)
        return tokens.view(b, self.n_mux, *tokens.shape[1:])

    def demultiplexed_cls(self, tokens: Tensor) -> Tensor:
        """C-Multiplexer, backbone and demultiplexers: tokens ``(B, N, L, d)`` -> one CLS state per image ``(B, N, d)``."""
        h = read_with_cls(self.vit, self.multiplexer(tokens), self.vit.blocks[self.config.concat_point:])
        return self.demultiplexer(h[:, 0])

    def forward(self, x: Tensor, return_features: bool = False, smoothing_alpha: float | None = None):
        tokens = self.patchify(x)
        per = self.demultiplexed_cls(tokens)
        logits = self.head(per)
        if not return_features and smoothing_alpha is None:
            return logits
        out = {"logits": logits}
        if return_features:
            if self.feature_head is None:
                raise ValueError("this ConcatPlexer has no feature head for the CLIP loss: build it with teacher_dim "
                                 "(the teacher's feature size)")
            out["features"] = self.feature_head(per)
        if smoothing_alpha is not None:
            out["smooth_logits"] = self.head(self.demultiplexed_cls(tuple_mixup(tokens, smoothing_alpha)))
        return out

    def extra_repr(self) -> str:
        c = self.config
        return f"n_mux={c.n_mux}, concat_point={c.concat_point} of depth {c.depth}"


class FeatureTeacher(nn.Module):
    """A frozen image encoder: images ``(B, C, H, W)`` -> features ``(B, dim)``, no gradient.

    Before the encoder, images are brought back to [0, 1] when they arrive normalised
    (``input_mean`` / ``input_std``: the normalisation the data pipeline applied, e.g. a
    pretrained timm model's, :func:`data_utils.images.timm_normalization`), resized to its
    ``image_size`` (bilinear, antialiased), grey images repeated to its number of channels,
    and normalised with its own ``mean`` / ``std``. The encoder stays in ``eval()`` mode
    whatever the model being trained does.

    Precision. The teacher is called from the loss, outside the autocast that Accelerate wraps
    around the student's ``forward`` only, so it would otherwise run in fp32 (for a CLIP
    ViT-B/16 that is several times the cost of the student's bf16 step). ``precision``:

    - ``"auto"`` (default): inside an autocast already active for the input's device, that one;
      else the mixed precision of the Accelerate state set up in this process (``mux.train``'s
      ``mixed_precision``: the training's autocast, "bf16", "fp16" or "no"); else, with no
      training set up, bf16 on a CUDA GPU with native bf16 and fp32 elsewhere.
    - ``"bf16"`` / ``"fp16"``: the encoder under ``torch.autocast`` of that dtype, on any device.
    - ``"no"``: fp32, even inside an outer autocast.

    The input's un-normalisation, resizing and normalisation run in fp32 before the autocast,
    and the features are returned in fp32 (the CLIP loss L2-normalises them in fp32).
    """

    PRECISIONS = ("auto", "bf16", "fp16", "no")

    def __init__(self, encoder: nn.Module, dim: int, kind: str, name: str, image_size: int | None = None,
                 in_chans: int | None = None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, input_mean: tuple[float, ...] | None = None,
                 input_std: tuple[float, ...] | None = None, precision: str = "auto"):
        super().__init__()
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {list(self.PRECISIONS)}, got {precision!r}")
        if (input_mean is None) != (input_std is None):
            raise ValueError("input_mean and input_std go together: give both (the data's normalisation) or neither")
        self.encoder = encoder.eval().requires_grad_(False)
        self.dim, self.kind, self.name = check_n(dim, name="dim"), kind, name
        self.image_size, self.in_chans, self.precision = image_size, in_chans, precision
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_mean", None if input_mean is None else
                             torch.tensor(input_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", None if input_std is None else
                             torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_vit(cls, model: ViTClassifier, name: str = "vit", precision: str = "auto") -> "FeatureTeacher":
        """A trained :class:`~mux.models.vit.ViTClassifier`: its final CLS state (d features). The
        teacher freezes a copy: the model given stays as it was (trainable, in its mode). It reads
        the images as the ViT was trained on them (no normalisation of its own)."""
        return cls(copy.deepcopy(model), model.config.embed_dim, "vit", name, precision=precision)

    @classmethod
    def from_clip(cls, name_or_path: str, projection: bool = True,
                  input_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                  precision: str = "auto") -> "FeatureTeacher":
        """A CLIP vision encoder from ``transformers`` (a Hub id such as ``openai/clip-vit-base-patch16``,
        or a folder). ``projection=True``: ``CLIPVisionModelWithProjection``'s ``image_embeds``, CLIP's
        joint image-text space (512 features for ViT-B/16); ``False``: ``CLIPVisionModel``'s
        ``pooler_output`` (its hidden size). ``input_normalization``: ``(mean, std)`` the images were
        normalised with before they reach the teacher (``DatasetSplits.normalization``), undone
        before CLIP's own; None: images in [0, 1]."""
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        loader = CLIPVisionModelWithProjection if projection else CLIPVisionModel
        encoder = loader.from_pretrained(name_or_path)
        cfg = encoder.config
        dim = cfg.projection_dim if projection else cfg.hidden_size
        in_mean, in_std = input_normalization if input_normalization is not None else (None, None)
        return cls(encoder, dim, "clip_projection" if projection else "clip", str(name_or_path), cfg.image_size,
                   cfg.num_channels, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD), in_mean, in_std, precision)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: dropout and norms never switch to training
        return self

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype the encoder runs in on ``device`` (None: fp32, or the caller's active autocast)."""
        if self.precision == "no" or (self.precision == "auto" and torch.is_autocast_enabled(device.type)):
            return None
        if self.precision in ("bf16", "fp16"):
            return torch.bfloat16 if self.precision == "bf16" else torch.float16
        training = _training_precision()
        if training is not None:  # mux.train set Accelerate up in this process: follow its mixed precision
            return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training)
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return None

    def _encoder_context(self, device: torch.device):
        if self.precision == "no":
            return torch.autocast(device.type, enabled=False)
        dtype = self.autocast_dtype(device)
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.input_mean is not None:  # back to [0, 1] from the data pipeline's normalisation
            x = x * self.input_std.to(x) + self.input_mean.to(x)
        if self.in_chans and x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ValueError(f"the teacher {self.name} reads {self.in_chans}-channel images, got {x.shape[1]}")
            x = x.expand(-1, self.in_chans, -1, -1)
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        x = x.to(next(self.encoder.parameters()).dtype)
        with self._encoder_context(x.device):
            if self.kind == "vit":
                out = self.encoder.features(x)
            else:
                found = self.encoder(pixel_values=x)
                out = found.image_embeds if self.kind == "clip_projection" else found.pooler_output
        return out.float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, kind={self.kind}"


def _training_precision() -> str | None:
    """The mixed precision of the Accelerate state set up in this process (by ``mux.train``), or None."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - Accelerate is a dependency
        return None
    state = AcceleratorState._shared_state  # read, never created here: an empty dict until a training sets it up
    value = state.get("_mixed_precision") if state else None
    return None if value is None else str(getattr(value, "value", value))
