"""What every course notebook shares beyond the teaching modules: one builder of its trainings'
configurations.

Each notebook declares the same scale-up parameters (see its ``parameters`` cell)::

    checkpoint_dir, checkpoint_every, num_processes, grad_accum_steps, num_workers, mixed_precision

and its own budget (``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``seed``, ...).
:func:`train_config` turns those into the :class:`~mux.TrainConfig` of one training, so that a
notebook says only what differs between its trainings (the steps of a stage, a learning-rate
warm-up, a tag).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .env import pick_device
from .training import TrainConfig

__all__ = ["SCALE_UP_PARAMETERS", "train_config"]

# notebook parameters passed to every training as they are (TrainConfig fields of the same name)
SCALE_UP_PARAMETERS = ("checkpoint_every", "num_processes", "grad_accum_steps", "num_workers", "mixed_precision")
# notebook parameters that are a training's defaults: (notebook name, TrainConfig field)
BUDGET_PARAMETERS = (("steps", "max_steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                     ("weight_decay", "weight_decay"), ("seed", "seed"))


def train_config(params: Mapping, tag: str, device: str | torch.device | None = None, **fields) -> TrainConfig:
    """The configuration of the training named ``tag`` in a notebook whose validated parameters are ``params``.

    - the scale-up parameters (:data:`SCALE_UP_PARAMETERS`) come from ``params``;
    - ``steps``, ``batch_size``, ``lr``, ``weight_decay`` and ``seed`` come from ``params`` when the
      notebook declares them, as ``max_steps``, ``batch_size``, ...;
    - checkpoints go to ``<checkpoint_dir>/<tag>`` when ``params["checkpoint_dir"]`` is set (none
      otherwise), so each training resumes from its own folder; the progress bar shows ``tag``;
    - ``device`` (default: ``params["device"]``) trains on the CPU when it is a CPU, even if a GPU
      is present;
    - ``fields`` (any :class:`~mux.TrainConfig` field) override all of these.
    """
    if not isinstance(tag, str) or not tag or "/" in tag:
        raise ValueError(f"tag names the training and its checkpoint folder: a non-empty string without '/', got {tag!r}")
    cfg = {name: params[name] for name in SCALE_UP_PARAMETERS if name in params}
    cfg.update({field: params[name] for name, field in BUDGET_PARAMETERS if name in params})
    where = device if device is not None else params.get("device", "auto")
    cfg["cpu"] = (where if isinstance(where, torch.device) else pick_device(str(where))).type == "cpu"
    root = params.get("checkpoint_dir") or ""
    cfg.update(description=tag, checkpoint_dir=f"{root}/{tag}" if root else None)
    unknown = sorted(set(fields) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"train_config got {unknown}, which are not TrainConfig fields "
                        f"(those are: {', '.join(TrainConfig.__dataclass_fields__)})")
    cfg.update(fields)
    return TrainConfig(**cfg)
