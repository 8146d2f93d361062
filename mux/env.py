"""Environment helpers for the notebooks: device choice and a version report."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil

import torch

__all__ = ["device_of", "pick_device", "cuda_has_native_bf16", "gpu_problem", "nvidia_device_present", "versions",
           "return_freed_memory"]

COURSE_PACKAGES = (
    "torch", "torchvision", "timm", "transformers", "accelerate", "scikit-learn",
    "matplotlib", "ipywidgets", "tqdm", "papermill",
)


def return_freed_memory() -> None:
    """Give the memory of freed objects back to the operating system, where the C library allows it.

    On Linux, glibc keeps the pages of freed tensors for later allocations; after a training, a notebook
    that trains a dozen models in one kernel holds a growing pool of them (about 135 MB after chapter 02's
    three warm-ups). ``malloc_trim`` returns them (microseconds); elsewhere (macOS, musl) this does nothing.
    Objects kept alive by reference cycles are not freed yet: ``gc.collect()`` first.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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


def nvidia_device_present() -> bool:
    """Whether this machine has an NVIDIA GPU and driver, whatever torch makes of it: ``nvidia-smi`` on
    the PATH or the driver's ``/proc/driver/nvidia`` folder."""
    return shutil.which("nvidia-smi") is not None or os.path.isdir("/proc/driver/nvidia")


def gpu_problem() -> str | None:
    """Why training would not run on a GPU here (``None``: torch sees a usable CUDA GPU).

    A full-scale run asks for this before it starts, because ``device: auto`` silently falls back to the
    CPU (in fp32, for days) when torch cannot use the GPU: a CPU-only torch build, no GPU at all, or a
    driver too old for the CUDA version torch was built with."""
    cuda = torch.version.cuda
    if cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None): "
                "install a CUDA build of torch (see environment.yml)")
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    if nvidia_device_present():
        return (f"an NVIDIA driver is present (nvidia-smi or /proc/driver/nvidia) but torch cannot use it: "
                f"torch.cuda.is_available() is False. This torch was built for CUDA {cuda}; the driver is probably "
                f"too old for it (nvidia-smi shows the highest CUDA version the driver supports), or "
                f"CUDA_VISIBLE_DEVICES hides every GPU: update the driver or install a torch built for an older CUDA")
    return ("no GPU found: torch.cuda.device_count() is 0 and there is no NVIDIA device (no nvidia-smi, no "
            "/proc/driver/nvidia); run on a machine with a GPU")


def versions(packages=COURSE_PACKAGES) -> dict[str, str]:
    """Installed versions of the course's main packages (and Python), for the set-up cell."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
