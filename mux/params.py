"""Validation of notebook parameters (the cell after the ``parameters`` cell).

A course notebook declares every knob in its ``parameters`` cell with a type annotation::

    n_values: list[int] = [1, 2, 4, 8]  # help: ...

papermill injects overrides in a cell after it (plain assignments, no annotations). The
validation cell then calls ``check_parameters(globals())``, which

* checks every declared parameter against its annotation with pydantic's ``TypeAdapter`` in
  strict mode (``int``, ``float``, ``str``, ``bool``, ``list[...]``, ``tuple[...]``,
  ``dict[...]``, ``set[...]``, ``X | None``, ``Literal[...]``, ``Annotated[...]``);
* reports any other plain-data global (an int, a string, a list, ...) as an unknown
  parameter, with the closest known name, because that is what a misspelt ``-p`` becomes.

What strict means here, beyond pydantic's own strict mode:

* an ``int`` is accepted where a ``float`` is declared (``papermill -p lr 3`` passes an int),
  but a ``bool`` is never an ``int`` or a ``float``;
* a ``Literal[...]`` value must equal one of the choices *and* have its type, so ``True`` is
  not ``Literal[0, 1]`` and ``1.0`` is not ``Literal[1]``;
* floats must be finite, at any depth: ``inf`` and ``nan`` are rejected;
* a list is accepted for a ``tuple[...]``, since YAML (``papermill -y``) has no tuples;
* a parameter annotated ``list[...]`` (or ``list[...] | None``) must not be empty, because
  the notebooks index and iterate their list parameters and an empty one fails far from the
  cause. To allow an empty list, say so in the annotation: any ``Annotated[list[...], ...]``
  is taken as written, e.g. ``Annotated[list[int], Field(min_length=0)]`` (``from pydantic
  import Field``; ``annotated_types.MinLen(0)`` works too).

The values returned are the namespace's own objects (an int given for a float stays an int,
lists stay lists); validation never converts them.

Convention that makes the second check exact: cells before the parameters cell define no
plain-data globals in lower case (imports, UPPER_CASE constants, functions and objects such
as a ``torch.device`` are fine).

Re-running the validation cell (in Jupyter, after later cells have run) is supported. The
first call records, under ``_mux_checked_globals`` in the namespace, the names present at
that moment; papermill injects its overrides before that call, so a misspelt ``-p`` is
always among them. Later calls report as unknown only names that were already present at the
first call: names created afterwards are the notebook's own variables. The validated values
are kept under ``_mux_checked_parameters``; on a later call, a declared parameter whose value
is no longer plain data (``device`` replaced by a ``torch.device``, say) is not checked again
and its validated value is returned. A parameter that still holds plain data (for instance
after the parameters cell was edited and re-run) is checked again.
"""
from __future__ import annotations

import ast
import difflib
import io
import json
import tokenize
import types
import typing
from pathlib import Path

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["ParameterError", "check_parameters", "check_value", "declared_parameters"]

_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
_PLAIN = (bool, int, float, str, list, tuple, dict, set, type(None))
_CONTAINERS = (list, tuple, dict, set)
_CHECKED_GLOBALS = "_mux_checked_globals"
_CHECKED_VALUES = "_mux_checked_parameters"
_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
_CONTAINER_HINT = " (pass lists and dicts with papermill -y or a YAML file, not -p)"
_EMPTY_HINT = (" (list parameters must not be empty; declare it as"
               " Annotated[list[...], Field(min_length=0)] to allow an empty list)")


class ParameterError(ValueError):
    """A notebook parameter is unknown, missing or of the wrong type."""


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "of length >="),
           ("max_length", "of length <="))


def _type_name(tp) -> str:
    """``tp`` as a reader writes it: ``int >= 1``, ``list[int >= 1]``, ``Literal['a', 'b']``, ``str | None``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        bounds = [f"{sign} {getattr(c, key)}" for m in args[1:] for c in [m, *getattr(m, "metadata", [])]
                  for key, sign in _BOUNDS if getattr(c, key, None) is not None]
        return " and ".join([f"{_type_name(args[0])} {bounds[0]}", *bounds[1:]]) if bounds else _type_name(args[0])
    if _is_union(origin):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None and args:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if tp is None or tp is type(None):
        return "None"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _is_union(origin) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _members(tp) -> list:
    """``tp`` itself, or the members of a union, with ``Annotated`` metadata stripped."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if _is_union(origin):
        return [m for a in typing.get_args(tp) for m in _members(a)]
    return [tp]


def _expects_container(tp) -> bool:
    return any(typing.get_origin(m) in _CONTAINERS or m in _CONTAINERS for m in _members(tp))


def _exact_literal(choices: tuple):
    """A before-validator: the value must equal a choice and have that choice's type."""
    expected = " or ".join(repr(c) for c in choices)

    def check(value):
        if not any(type(value) is type(c) and value == c for c in choices):
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return value

    return check


def _list_to_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _strict_schema(tp, top: bool = False):
    """``tp`` rewritten for validation: exact literals, lists accepted for tuples, and (at the top
    level, or in a top-level union) ``list[...]`` made non-empty."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:  # the author's constraints are taken as written
        return typing.Annotated[(_strict_schema(args[0]), *args[1:])]
    if _is_union(origin):
        return typing.Union[tuple(_strict_schema(a, top) for a in args)]
    if origin is typing.Literal:
        return typing.Annotated[tp, BeforeValidator(_exact_literal(args))]
    if tp is tuple or origin is tuple:
        inner = tuple[tuple(a if a is Ellipsis else _strict_schema(a) for a in args)] if args else tp
        return typing.Annotated[inner, BeforeValidator(_list_to_tuple)]
    if origin in (list, set, frozenset, dict) and args:
        tp = origin[tuple(_strict_schema(a) for a in args)]
    if top and (tp is list or origin is list):
        return typing.Annotated[tp, Field(min_length=1)]
    return tp


def _location(name: str, loc: tuple) -> str:
    return name + "".join(p if isinstance(p, str) and p.startswith("[") else f"[{p!r}]" for p in loc)


def _problem(namespace: dict, name: str, tp) -> str | None:
    """What is wrong with parameter ``name`` (``None`` when it is valid)."""
    if isinstance(tp, str):  # an annotation kept as text, e.g. under `from __future__ import annotations`
        try:
            tp = eval(tp, dict(namespace))  # the notebook's own annotation, in the notebook's globals
        except Exception as err:
            return f"parameter {name!r} has an annotation that cannot be evaluated: {tp!r} ({err})"
    try:
        adapter = TypeAdapter(_strict_schema(tp, top=True), config=_CONFIG)
    except Exception as err:
        return f"parameter {name!r} has an annotation that cannot be checked: {_type_name(tp)} ({err})"
    value = namespace[name]
    try:
        adapter.validate_python(value)
    except ValidationError as err:
        errors = err.errors()
        detail = hint = ""
        if len(errors) == 1 and (errors[0]["loc"] or not errors[0]["type"].endswith("_type")):
            where = f"at {_location(name, errors[0]['loc'])}: " if errors[0]["loc"] else ""
            detail = f"; {where}{errors[0]['msg']}"
        if isinstance(value, str) and _expects_container(tp):
            hint = _CONTAINER_HINT
        elif isinstance(value, list) and not value and any(e["type"] == "too_short" for e in errors):
            return f"parameter {name!r} should be a non-empty {_type_name(tp)}, got []{_EMPTY_HINT}"
        return f"parameter {name!r} should be {_type_name(tp)}, got {value!r} ({type(value).__name__}){detail}{hint}"
    return None


def check_value(name: str, value, annotation: str, namespace: dict | None = None) -> str | None:
    """What is wrong with ``value`` for a parameter ``name`` annotated ``annotation`` (a type or its
    text, such as ``"list[int]"``), by the same strict rules as :func:`check_parameters`; ``None``
    when it is valid. Used to check a run configuration against a notebook before it executes."""
    scope = {"typing": typing, "Literal": typing.Literal, "Annotated": typing.Annotated, "Field": Field,
             "Optional": typing.Optional, "Union": typing.Union}
    scope.update(namespace or {})
    scope[name] = value
    return _problem(scope, name, annotation)


def check_parameters(namespace: dict) -> dict:
    """Validate a notebook's parameters; return them as a dict, or raise ParameterError listing every problem.

    ``namespace`` is the notebook's ``globals()``: the declared parameters are its
    ``__annotations__``. The first call records which names exist in it (see the module
    docstring), so that re-running the validation cell later reports no false unknowns.
    """
    declared = dict(namespace.get("__annotations__", {}))
    if not declared:
        raise ParameterError(
            "no declared parameters found: write each knob in the parameters cell as `name: type = default`"
        )
    rerun = _CHECKED_GLOBALS in namespace
    if not rerun:
        namespace[_CHECKED_GLOBALS] = set(namespace)
    first_names = namespace[_CHECKED_GLOBALS]
    checked = namespace.get(_CHECKED_VALUES, {})

    problems, values = [], {}
    for name, tp in declared.items():
        if name not in namespace:
            problems.append(f"parameter {name!r} is declared but has no value")
        elif rerun and name in checked and not isinstance(namespace[name], _PLAIN):
            values[name] = checked[name]  # replaced by the notebook since it was validated
        else:
            problem = _problem(namespace, name, tp)
            if problem:
                problems.append(problem)
            values[name] = namespace[name]
    for name, value in namespace.items():
        if (name.startswith("_") or name.isupper() or name in declared or name in _IPYTHON_NAMES
                or name not in first_names or not isinstance(value, _PLAIN)):
            continue
        close = difflib.get_close_matches(name, declared, n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown parameter {name!r}{suggestion}; this notebook's parameters are: {', '.join(declared)}")
    if problems:
        raise ParameterError("invalid notebook parameters:\n  - " + "\n  - ".join(problems))
    namespace[_CHECKED_VALUES] = dict(values)
    return values


def declared_parameters(notebook) -> dict[str, dict]:
    """The parameters a notebook's ``parameters`` cell declares, in papermill's
    ``inspect_notebook`` shape: ``{name: {"name", "inferred_type_name", "default", "help"}}``.

    Read with Python's own parser, so any annotation (``Literal["a", "b"]``,
    ``Annotated[int, Field(ge=1)]``) is kept whole; papermill's line pattern drops those.
    A notebook with no ``parameters`` cell declares none (``{}``, as papermill says); one with
    several is refused.
    """
    cells = json.loads(Path(notebook).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        return {}
    if len(tagged) > 1:
        raise ParameterError(f"{notebook} has {len(tagged)} cells tagged 'parameters', expected at most one")
    source = "".join(tagged[0]["source"])
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            found[name] = {"name": name, "inferred_type_name": ast.get_source_segment(source, node.annotation),
                           "default": ast.get_source_segment(source, node.value) if node.value else None,
                           "help": comments.get(node.end_lineno, comments.get(node.lineno, ""))}
    return found
