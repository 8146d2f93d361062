"""DataMUX image classifiers with an MLP or a small CNN backbone (Murahari et al., 2022).

    N images -> shared front (per image) -> multiplexer (fixed phi_i, mean over N)
             -> backbone (one pass for all N) -> MLP demultiplexer -> shared head -> N logits

MLP backbone: the front flattens each image and embeds it in d dimensions; the
multiplexer mixes the N embeddings into one d-vector; the backbone is ``depth`` layers of
Linear(d, d) + GELU.

CNN backbone: the front is a 3x3 convolution to d channels; the multiplexer mixes the N
feature maps at every pixel over the channel dimension (for the orthogonal multiplexer that
is a fixed 1x1 convolution per instance); the backbone is ``depth`` blocks of 3x3
convolution + GELU (with 2x2 max-pooling while the map is at least 8 pixels wide) and a
global average pool (:class:`SpatialMean`, the mean over H and W). Demultiplexing happens
on the pooled d-vector.

Vanilla baseline (``vanilla=True``, needs N = 1): the same front, backbone and head with no
multiplexer and no demultiplexer (``model.mux`` and ``model.demux`` are None)::

    1 image -> front -> backbone -> head -> 1 logit vector

It takes and returns the same shapes as the DataMUX model with N = 1, ``(B, 1, C, H, W) ->
(B, 1, num_classes)``, so ``mux.train``, ``mux.evaluate`` and ``mux.multiplexed_forward``
run it with n=1. With the same seed, its front, backbone and head start from exactly the
weights of the DataMUX N = 1 model: the comparison then isolates what the multiplexer and
the demultiplexer change.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..demultiplexers import MLPDemultiplexer
from ..grouping import check_n
from ..multiplexers import MULTIPLEXERS, make_multiplexer
from .common import seeded

__all__ = ["DataMUXConfig", "DataMUXClassifier", "SpatialMean"]

BACKBONES = ("mlp", "cnn")


@dataclass
class DataMUXConfig:
    """Everything that defines a DataMUX classifier; saved with every checkpoint."""

    n_mux: int = 2  # N: instances per forward pass
    backbone: str = "mlp"  # "mlp" or "cnn"
    multiplexer: str = "orthogonal"  # a key of mux.MULTIPLEXERS
    in_shape: tuple[int, int, int] = (1, 8, 8)  # (C, H, W) of one image
    num_classes: int = 10
    width: int = 128  # d: embedding size (MLP) or channels (CNN)
    depth: int = 2  # backbone layers (MLP) or conv blocks (CNN)
    mux_seed: int = 0  # seed of the fixed multiplexing transforms
    vanilla: bool = False  # True: the non-multiplexed baseline, no mux/demux (needs n_mux=1)

    def __post_init__(self):
        check_n(self.n_mux)
        if not isinstance(self.vanilla, bool):
            raise ValueError(f"vanilla must be True or False, got {self.vanilla!r}")
        if self.vanilla and self.n_mux != 1:
            raise ValueError(
                f"vanilla=True is the non-multiplexed baseline (one instance per pass): it needs n_mux=1, "
                f"got n_mux={self.n_mux}; use vanilla=False to multiplex {self.n_mux} instances"
            )
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {list(BACKBONES)}")
        if self.multiplexer not in MULTIPLEXERS:
            raise ValueError(f"unknown multiplexer {self.multiplexer!r}; expected one of {sorted(MULTIPLEXERS)}")
        self.in_shape = tuple(int(s) for s in self.in_shape)
        if len(self.in_shape) != 3 or min(self.in_shape) < 1:
            raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {self.in_shape}")
        for name in ("num_classes", "width", "depth"):
            check_n(getattr(self, name), name=name)

    def to_dict(self) -> dict:
        return asdict(self)


class SpatialMean(nn.Module):
    """Global average pool: ``(B, C, H, W) -> (B, C)``, the mean over H and W.

    The same numbers as ``nn.AdaptiveAvgPool2d(1)`` followed by ``nn.Flatten()``, built from
    a plain mean, whose backward is deterministic on every device. PyTorch lists the CUDA
    backward of ``AdaptiveAvgPool2d`` as nondeterministic (``torch.use_deterministic_algorithms``);
    recent versions route output size 1 to this same mean, but exact resume on a GPU should
    not depend on that routing, so the model says what it computes.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SpatialMean expects (B, C, H, W), got shape {tuple(x.shape)}")
        return x.mean(dim=(2, 3))


class DataMUXClassifier(nn.Module):
    """DataMUX classifier: ``(B, N, C, H, W) -> (B, N, num_classes)`` logits.

    Use :func:`mux.multiplexed_forward` to run it on a flat batch ``(M, C, H, W)`` of any size.

    With ``vanilla=True`` (and N = 1) it is the non-multiplexed baseline: ``mux`` and
    ``demux`` are None (no such modules, no such parameters, nothing of them in ``print(model)``),
    and the forward is front -> backbone -> head, ``(B, 1, C, H, W) -> (B, 1, num_classes)``.
    """

    def __init__(self, config: DataMUXConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else DataMUXConfig(**kwargs)
        c = self.config
        d, (ch, h, w) = c.width, c.in_shape
        if c.backbone == "mlp":
            self.front = nn.Sequential(nn.Flatten(), nn.Linear(ch * h * w, d))
            self.backbone = nn.Sequential(*[m for _ in range(c.depth) for m in (nn.Linear(d, d), nn.GELU())])
        else:
            self.front = nn.Sequential(nn.Conv2d(ch, d, 3, padding=1), nn.GELU())
            layers, size = [], min(h, w)
            for _ in range(c.depth):
                layers += [nn.Conv2d(d, d, 3, padding=1), nn.GELU()]
                if size >= 8:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            self.backbone = nn.Sequential(*layers, SpatialMean())  # (B, d)
        # Built in this order for both models: the multiplexer draws its fixed transforms from
        # its own generator (seeded by mux_seed), the demultiplexer its initial weights from the
        # global RNG, which the head draws from next. The vanilla model builds both and throws
        # them away, so the global RNG advances exactly as in the DataMUX model and, with the
        # same seed, its head (like its front and backbone) starts from the same weights.
        multiplexer = make_multiplexer(c.multiplexer, c.n_mux, d, seed=c.mux_seed)
        demultiplexer = MLPDemultiplexer(c.n_mux, d)
        self.mux = None if c.vanilla else multiplexer
        self.demux = None if c.vanilla else demultiplexer
        self.head = nn.Linear(d, c.num_classes)

    @classmethod
    def for_data(cls, data, n_mux: int, seed: int = 0, **config) -> "DataMUXClassifier":
        """A classifier sized for ``data`` (anything with ``in_shape`` and ``num_classes``, e.g.
        ``data_utils.DatasetSplits``). ``seed`` seeds the fixed transforms and, through
        torch's generator (:func:`mux.models.common.seeded`), the initialisation of the learned parts. ``config``: other
        fields of :class:`DataMUXConfig`, e.g. ``for_data(data, 1, seed=0, vanilla=True)`` for
        the baseline whose front, backbone and head start where those of
        ``for_data(data, 1, seed=0)`` do."""
        with seeded(seed):
            return cls(DataMUXConfig(n_mux=n_mux, in_shape=data.in_shape, num_classes=data.num_classes,
                                     mux_seed=seed, **config))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, N, C, H, W)`` floating-point images -> ``(B, N, num_classes)`` logits.

        A floating-point ``x`` in another dtype than the parameters (say float64 images for a
        float32 model) is cast to the parameters' dtype; an integer ``x`` (e.g. uint8 pixels)
        is rejected: convert and scale it first, as the data loaders of ``data_utils`` do.
        """
        c = self.config
        if x.dim() != 5 or x.shape[1] != c.n_mux or tuple(x.shape[2:]) != c.in_shape:
            raise ValueError(
                f"DataMUXClassifier expects (B, N={c.n_mux}, C, H, W) with (C, H, W)={c.in_shape}, "
                f"got shape {tuple(x.shape)}; group a flat batch with mux.group or mux.multiplexed_forward"
            )
        if not torch.is_floating_point(x):
            raise TypeError(
                f"DataMUXClassifier expects floating-point images, got dtype {x.dtype}; "
                "convert them first, e.g. x.float() / 255 for uint8 pixels"
            )
        dtype = self.head.weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)  # e.g. float64 images into a float32 model
        if c.vanilla:  # N = 1: one image per pass, nothing to mix or to separate
            z = self.front(x[:, 0])  # (B, d) or (B, d, H, W), channels first
            if c.backbone == "cnn":  # the memory layout the multiplexed CNN's backbone gets (its mixing runs
                z = z.contiguous(memory_format=torch.channels_last)  # channels last): timings compare work, not layout
            return self.head(self.backbone(z)).unsqueeze(1)  # (B, d) -> (B, 1, num_classes)
        b, n = x.shape[:2]
        z = self.front(x.flatten(0, 1))  # (B*N, d) or (B*N, d, H, W)
        if c.backbone == "cnn":
            z = z.permute(0, 2, 3, 1)  # channels last: mix over d at every pixel
        mixed = self.mux(z.reshape(b, n, *z.shape[1:]))  # (B, d) or (B, H, W, d)
        if c.backbone == "cnn":
            mixed = mixed.permute(0, 3, 1, 2)
        h = self.backbone(mixed)  # (B, d)
        return self.head(self.demux(h))  # (B, N, num_classes)

    def extra_repr(self) -> str:
        return "vanilla: no multiplexer, no demultiplexer" if self.config.vanilla else ""
