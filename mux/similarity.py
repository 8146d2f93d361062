"""Do two subnetworks of one multi-output model use the same features? Two measurements.

Chapter 05 asks whether MixViT's subnetworks share features more than a MIMO CNN's do (the
MixViT paper's Figure 5). Each subnetwork i of such a model ends with a dense head
``logits_i = W_i f_i + b_i`` on a feature vector ``f_i`` of d numbers (MixViT: its own class
token; MIMO: one vector that every head reads).

- :func:`influence`: how much a head relies on each feature, the L1 norm of its column of ``W_i``
  (the paper's Figure 5 measure).
- :func:`ablation_scores`: remove the ``k`` features subnetwork ``source`` relies on most (each
  replaced by its mean over the items, so the heads see no value they never saw) and score
  every subnetwork again, item by item (and, as a control, ``k`` features drawn at random). If
  the other subnetworks lose as much as ``source`` does, they rely on the same features; if they
  lose no more than under a random ablation, they do not. The per-item 0/1 results go to
  :func:`mux.paired_difference` for an interval on each drop.
- :func:`linear_cka`: linear centred kernel alignment (Kornblith et al., 2019) of two feature sets
  on the same items, ``(n, d1), (n, d2) -> [0, 1]``: 1 when one is a rotation and scaling of the
  other, near 0 for unrelated features.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cka", "influence", "ablation_scores"]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of features ``x`` ``(n, d1)`` and ``y`` ``(n, d2)`` of the same n items, in [0, 1].

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` after centring each feature over the items;
    invariant to rotations and to scaling of either set, not to other linear maps."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka expects features (n, d1) and (n, d2) of the same n items, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 items")
    x, y = x - x.mean(0), y - y.mean(0)
    denominator = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    if denominator == 0:
        raise ValueError("linear_cka: one of the feature sets is constant over the items")
    return float(torch.linalg.norm(y.T @ x) ** 2 / denominator)


def influence(weight: Tensor) -> Tensor:
    """How much a dense head relies on each of its d input features: ``(classes, d) -> (d,)``, the L1
    norm of each column (the MixViT paper's Figure 5)."""
    if weight.dim() != 2:
        raise ValueError(f"influence expects a head's weight (classes, d), got shape {tuple(weight.shape)}")
    return weight.detach().abs().sum(0)


def ablation_scores(features: Tensor, weights: Tensor, biases: Tensor, labels: Tensor, k: int, source: int = 0,
                    random_draws: int = 20, seed: int = 0) -> dict[str, Tensor]:
    """Per-item 0/1 scores of every subnetwork with and without the features ``source`` relies on most.

    ``features`` ``(n, M, d)``: what each of the M heads reads on n test items; ``weights``
    ``(M, classes, d)`` and ``biases`` ``(M, classes)``: the heads; ``labels`` ``(n,)``. The ``k``
    features with the largest :func:`influence` on head ``source`` are removed for every head: each is
    replaced by its mean over the n items (mean ablation; setting a feature that is not centred to 0
    would move the logits far from anything the heads were trained on, and measure that shift).
    Returns ``{"before", "top", "random"}``, each ``(n, M)``: right (1) or wrong (0) per item and
    subnetwork, unablated, with the top-k features of ``source`` removed, and (the control) with k
    features drawn at random, averaged over ``random_draws`` seeded draws (so a fraction per item).
    """
    features, weights, biases = features.detach().float(), weights.detach().float(), biases.detach().float()
    n, m, d = features.shape
    if weights.shape[0] != m or weights.shape[2] != d or biases.shape != weights.shape[:2] or labels.shape != (n,):
        raise ValueError(f"ablation_scores: features (n, M, d) = {tuple(features.shape)}, weights (M, classes, d) = "
                         f"{tuple(weights.shape)}, biases (M, classes) = {tuple(biases.shape)} and labels (n,) = "
                         f"{tuple(labels.shape)} do not fit together")
    if not 0 <= source < m:
        raise ValueError(f"source {source} is not a subnetwork: this model has M = {m}")
    if not 1 <= k < d:
        raise ValueError(f"k = {k} features to remove: expected 1 <= k < d = {d}")

    mean = features.mean(0, keepdim=True)  # (1, M, d): what a removed feature is replaced by

    def scores(keep: Tensor) -> Tensor:  # keep (d,) of 0/1 -> (n, M) right or wrong
        logits = torch.einsum("nmd,mcd->nmc", features * keep + mean * (1 - keep), weights) + biases
        return (logits.argmax(-1) == labels[:, None]).float()

    top = torch.ones(d)
    top[influence(weights[source]).argsort(descending=True)[:k]] = 0
    generator = torch.Generator().manual_seed(seed)
    random = torch.stack([scores(torch.ones(d).index_fill(0, torch.randperm(d, generator=generator)[:k], 0))
                          for _ in range(random_draws)]).mean(0)
    return {"before": scores(torch.ones(d)), "top": scores(top), "random": random}
