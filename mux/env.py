"""Environment helpers for the notebooks: device choice and a version report."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

__all__ = ["device_of", "pick_device", "cuda_has_native_bf16", "versions"]

COURSE_PACKAGES = (
    "torch", "torchvision", "timm", "transformers", "accelerate", "scikit-learn",
    "matplotlib", "ipywidgets", "tqdm", "papermill",
)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def pick_device(preference: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; any other value is used as given (and checked)."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={preference!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device


def cuda_has_native_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (Ampere and newer), not emulated (T4, V100)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3: no including_emulation argument
        return torch.cuda.get_device_capability() >= (8, 0)


def versions(packages=COURSE_PACKAGES) -> dict[str, str]:
    """Installed versions of the course's main packages (and Python), for the set-up cell."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
