"""Plotting helpers shared by the notebooks (small figures, modest resolution)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

__all__ = ["plot_accuracy_vs_n", "plot_loss_curves", "show_images"]


def plot_accuracy_vs_n(results: dict[str, dict[int, float]], ax=None, chance: float | None = None, title: str = ""):
    """One line per label: accuracy against N (log2 x-axis). ``results[label][N] = accuracy``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2), dpi=80)
    for label, by_n in results.items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n] for n in ns], marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    all_n = sorted({n for by_n in results.values() for n in by_n})
    ax.set_xticks(all_n, [str(n) for n in all_n])
    ax.set_xlabel("N (instances multiplexed)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_loss_curves(histories: dict[str, list[dict]], ax=None, title: str = "training loss"):
    """Training loss against step, one line per label; ``histories[label]`` from ``TrainResult.history``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2), dpi=80)
    for label, hist in histories.items():
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return ax


def show_images(images: torch.Tensor, titles: list[str] | None = None, ncols: int | None = None, size: float = 1.3):
    """Show a batch of images ``(K, C, H, W)`` (or ``(K, H, W)``) in one row of small panels."""
    images = images.detach().float().cpu()
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    k = images.shape[0]
    ncols = ncols or k
    nrows = (k + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), dpi=80, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            img = images[i]
            ax.imshow((img.permute(1, 2, 0) if img.dim() == 3 else img).numpy(), cmap="gray")
            if titles:
                ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
