"""What every model file shares: construction from a seed, one way to save and load a model,
and copying the weights two models share (a warm-up or an earlier stage into the next).

A model saves to a folder: ``config.json`` (format, class, configuration) and
``model.safetensors`` (weights and buffers, so fixed random transforms travel with the model).
Loading refuses a folder written by another kind of model or class and, with ``expect``, one of
another configuration, naming each field that differs.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

__all__ = ["seeded", "SavedByFolder", "copy_shared_weights"]


@contextmanager
def seeded(seed: int):
    """Within the block torch's CPU generator is seeded with ``seed``; the global RNG is put back
    afterwards, so building a model changes nothing outside it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class SavedByFolder:
    """``save(folder)``, ``load(folder, expect=None)`` and ``empty(config)`` for a model whose
    configuration is the dataclass ``config_class`` (with ``to_dict()``).

    ``empty`` builds a model of ``config`` to load saved weights into (a subclass overrides it
    when building would download or fit something); ``saved_format`` names the family of models
    whose folders are told apart by class, ``saved_what`` how error messages call them."""

    config_class: type
    saved_format = "mux-model"
    saved_what = "course model"

    @classmethod
    def empty(cls, config):
        return cls(config)

    def saved_notes(self) -> dict:
        """Entries of ``config.json`` beside the configuration, for a reader of the folder (not read back)."""
        return {}

    def save(self, folder) -> Path:
        """Write this model to ``folder`` (created if needed) and return it."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / "model.safetensors"))
        meta = {"format": self.saved_format, "class": type(self).__name__, **self.saved_notes(),
                "config": self.config.to_dict()}
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def read_config(cls, folder, expect=None):
        """The configuration saved in ``folder``, checked to be one of this class (and ``expect``'s)."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a folder written by {cls.__name__}.save "
                                    "(config.json and model.safetensors)")
        meta = json.loads(path.read_text())
        if meta.get("format") != cls.saved_format:
            raise ValueError(f"{path} is not a {cls.saved_what} checkpoint (format {meta.get('format')!r}, "
                             f"expected {cls.saved_format!r})")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{folder} holds a {meta.get('class')!r} ({meta.get('format')!r}), not a {cls.__name__}")
        if expect is not None and type(expect) is not cls.config_class:
            raise ValueError(f"expect must be a {cls.config_class.__name__} (the configuration of a {cls.__name__}), "
                             f"got a {type(expect).__name__}")
        names = {f.name for f in fields(cls.config_class)}
        config = cls.config_class(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in meta["config"].items() if k in names})
        if expect is not None and config != expect:
            diff = [f"{f.name} ({getattr(config, f.name)!r} there, {getattr(expect, f.name)!r} here)"
                    for f in fields(expect) if getattr(config, f.name) != getattr(expect, f.name)]
            raise ValueError(f"{folder} holds a {cls.__name__} of another configuration: {', '.join(diff)}")
        return config

    @classmethod
    def load(cls, folder, expect=None):
        """The model :meth:`save` wrote to ``folder``, as it was."""
        from safetensors.torch import load_model

        model = cls.empty(cls.read_config(folder, expect))
        load_model(model, str(Path(folder) / "model.safetensors"))
        return model


def copy_shared_weights(model: nn.Module, source: nn.Module, *, fresh: tuple[str, ...], free: tuple[str, ...],
                        source_name: str) -> nn.Module:
    """Copy into ``model`` every weight of ``source`` outside the modules named in ``fresh`` (prefixes
    of state-dict keys: the heads that start anew); return ``model``.

    The two configurations must agree on every field but those in ``free``; else a ValueError
    names each difference (``source_name`` says where the source came from)."""
    mine, theirs = model.config.to_dict(), source.config.to_dict()
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if k not in free and v != theirs.get(k)}
    if diff:
        raise ValueError(f"{source_name} differs from this model in " + ", ".join(
            f"{k} ({a!r} there, {b!r} here)" for k, (a, b) in diff.items()))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(fresh)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise RuntimeError(f"the weights of {source_name} do not fit: missing {missing}, unexpected {unexpected}")
    return model
