"""Validation of notebook parameters (the cell after the ``parameters`` cell).

A course notebook declares every knob in its ``parameters`` cell with a type annotation::

    n_values: list[int] = [1, 2, 4, 8]  # help: ...

papermill injects overrides in a cell after it (plain assignments, no annotations). The
validation cell then calls ``check_parameters(globals())``, which

* checks every declared parameter against its annotation (``int``, ``float``, ``str``,
  ``bool``, ``list[...]``, ``tuple[...]``, ``dict[...]``, ``X | None``, ``Literal[...]``);
* reports any other plain-data global (an int, a string, a list, ...) as an unknown
  parameter, with the closest known name, because that is what a misspelt ``-p`` becomes.

Convention that makes the second check exact: cells before the parameters cell define no
plain-data globals in lower case (imports, UPPER_CASE constants, functions and objects such
as a ``torch.device`` are fine).
"""
from __future__ import annotations

import difflib
import types
import typing

__all__ = ["ParameterError", "check_parameters"]

_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
_PLAIN = (bool, int, float, str, list, tuple, dict, set, type(None))


class ParameterError(ValueError):
    """A notebook parameter is unknown, missing or of the wrong type."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _matches(value, tp) -> bool:
    if tp is typing.Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation we cannot check is not an error


def check_parameters(namespace: dict) -> dict:
    """Validate a notebook's parameters; return them as a dict, or raise ParameterError listing every problem."""
    declared = dict(namespace.get("__annotations__", {}))
    if not declared:
        raise ParameterError(
            "no declared parameters found: write each knob in the parameters cell as `name: type = default`"
        )
    problems = []
    for name, tp in declared.items():
        if name not in namespace:
            problems.append(f"parameter {name!r} is declared but has no value")
        elif not _matches(namespace[name], tp):
            value = namespace[name]
            container = typing.get_origin(tp) in (list, tuple, dict)
            hint = " (pass lists and dicts with papermill -y or a YAML file, not -p)" if container and isinstance(value, str) else ""
            problems.append(
                f"parameter {name!r} should be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}"
            )
    for name, value in namespace.items():
        if (name.startswith("_") or name.isupper() or name in declared or name in _IPYTHON_NAMES
                or not isinstance(value, _PLAIN)):
            continue
        close = difflib.get_close_matches(name, declared, n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown parameter {name!r}{suggestion}; this notebook's parameters are: {', '.join(declared)}")
    if problems:
        raise ParameterError("invalid notebook parameters:\n  - " + "\n  - ".join(problems))
    return {name: namespace[name] for name in declared}
