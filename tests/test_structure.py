"""The shape of the code, checked by parsing it (issue: the teaching library stays a library).

- no import cycle among the modules of ``mux/`` and ``data_utils/`` (imports inside functions
  count: a lazy import is still a dependency);
- no private name (``_name``) imported from another module of the project;
- the teaching modules of ``mux`` import nothing from the run machinery, ``mux.runner``;
- no function in ``mux/`` over 100 lines;
- every notebook's median code cell at most 10 non-blank lines, and none but ``parameters``
  over 25; each validation cell (the one after ``parameters``) is one line.
"""
from __future__ import annotations

import ast
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mux", "data_utils")
MAX_FUNCTION_LINES = 100
MAX_MEDIAN_CELL, MAX_CELL = 10, 25


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = project_modules()


def imports_of(name: str, path: Path):
    """``(module imported, names taken from it, line)`` for every import in the file, resolved to absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from . import plots` imports the module mux.plots
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            taken = [n for n in names if f"{target}.{n}" not in MODULES]
            if taken or not submodules:
                yield target, taken, node.lineno
            for sub in submodules:
                yield sub, [], node.lineno


def dependency_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` is the package's module)."""
    return {name: {target for target, _, _ in imports_of(name, path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_modules():
    assert cycles(dependency_graph()) == []


def test_no_private_name_is_imported_from_another_module():
    found = []
    for name, path in MODULES.items():
        for target, names, line in imports_of(name, path):
            if target in MODULES and target != name:
                found += [f"{path.relative_to(ROOT)}:{line} takes {n} from {target}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert found == []


# mux/course.py is the old command name, ``python -m mux.course``: it runs mux.runner.course only as a script
# (under ``if __name__ == "__main__":``), so importing the library never loads the run machinery
OLD_COMMAND_ALIAS = "mux.course"


def test_the_teaching_library_does_not_import_the_run_machinery():
    found = []
    for name, path in MODULES.items():
        if name == "mux.runner" or name.startswith("mux.runner.") or name == OLD_COMMAND_ALIAS:
            continue
        for target, _, line in imports_of(name, path):
            if target == "mux.runner" or target.startswith("mux.runner."):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert found == []


def test_no_function_in_mux_is_over_100_lines():
    long = []
    for name, path in MODULES.items():
        if not name.startswith("mux"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


def code_cells(path: Path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            lines = sum(1 for line in source.splitlines() if line.strip())
            yield lines, "parameters" in cell.get("metadata", {}).get("tags", []), source


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_notebook_cells_are_short(path):
    cells = list(code_cells(path))
    median = statistics.median(n for n, _, _ in cells)
    assert median <= MAX_MEDIAN_CELL, f"{path.name}: the median code cell has {median} non-blank lines"
    long = [(n, source.splitlines()[0]) for n, is_params, source in cells if n > MAX_CELL and not is_params]
    assert long == [], f"{path.name}: cells over {MAX_CELL} non-blank lines"
    after = [i + 1 for i, (_, is_params, _) in enumerate(cells) if is_params]
    if after and after[0] < len(cells):
        validation = cells[after[0]][2].strip()
        assert validation.count("\n") == 0 and "check_parameters" in validation, (path.name, validation)


def test_the_checks_find_what_they_look_for():
    # the checks themselves: a cycle, and a private import, are found when present
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    target, names, _ = next(imports_of("mux.training.loop", ROOT / "mux" / "training" / "loop.py"))
    assert target and isinstance(names, list)
    resolved = {t for t, _, _ in imports_of("mux.training.loop", ROOT / "mux" / "training" / "loop.py")}
    assert {"mux.grouping", "mux.training.checkpoints"} <= resolved
