"""Headline metrics: every notebook ends by writing ``<out_dir>/<notebook stem>.json``;
``make course`` reads them back into one summary table."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["write_metrics", "read_metrics", "summary_table", "paper_vs_ours"]


def _check_jsonable(value, path="metrics"):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}: headline metrics must be finite numbers")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-string key {k!r}")
            _check_jsonable(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_jsonable(v, f"{path}[{i}]")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise ValueError(f"{path} is a {type(value).__name__}; use plain numbers, strings, lists and dicts")


def write_metrics(out_dir: str | Path, stem: str, metrics: dict) -> Path:
    """Write ``metrics`` (plain JSON values) to ``<out_dir>/<stem>.json`` and return the path.

    The file is written whole or not at all: a temporary file is written, flushed and synced to
    disk, then renamed over the target, and the folder is synced so that the rename itself
    survives a crash (where the platform can sync a folder).
    """
    _check_jsonable(metrics)
    path = Path(out_dir) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode()))
    return path


def atomic_write(path: str | Path, write) -> None:
    """``write(file)`` into ``path`` whole or not at all: under a temporary name in the same folder, flushed
    and synced to disk, renamed over ``path``, and the folder synced so that the rename survives a crash.
    The file is opened in binary mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it is on disk; a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems and platforms refuse to sync a folder
        pass
    finally:
        os.close(fd)


def read_metrics(out_dir: str | Path) -> dict[str, dict]:
    """All ``*.json`` metric files in ``out_dir``, keyed by notebook stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            flat[key] = v
    return flat


def summary_table(metrics: dict[str, dict], headline_key: str = "headline") -> str:
    """A plain-text table: one row per notebook and headline metric.

    A notebook's JSON may hold a ``headline`` dict; otherwise every scalar is shown.
    """
    rows = []
    for stem, m in metrics.items():
        shown = m.get(headline_key, m) if isinstance(m, dict) else {}
        for k, v in _flatten(shown).items():
            rows.append((stem, k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    if not rows:
        return "(no metrics found)"
    widths = [max(len(r[i]) for r in rows + [("notebook", "metric", "value")]) for i in range(3)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [line.format("notebook", "metric", "value"), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)


def paper_vs_ours(rows: list[tuple[str, str, str]]) -> str:
    """A small markdown table ``| setting | paper | this run |`` for a notebook to display."""
    lines = ["| setting | paper | this run |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
