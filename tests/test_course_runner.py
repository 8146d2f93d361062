"""``mux.runner.course.run_course`` on tiny notebooks written here: parameters go where they are declared,
and a parameter that no notebook declares stops the run before anything executes."""
import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from mux.runner.course import run_course

WRITE_METRICS = """\
import json, pathlib
pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
pathlib.Path(out_dir, NAME + ".json").write_text(json.dumps({"headline": {"seed": seed}}))
"""


def write_notebook(folder, name, parameters):
    """A notebook ``name`` whose ``parameters`` cell declares ``parameters`` plus ``out_dir``."""
    lines = [f"{p}: int = 0  # help: a parameter called {p}" for p in parameters]
    lines.append('out_dir: str = "outputs"  # help: where the metrics JSON is written')
    cells = [nbformat.v4.new_markdown_cell(f"# {name}"),
             nbformat.v4.new_code_cell(f"NAME = {name!r}"),
             nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["parameters"]})]
    if "seed" in parameters:
        cells.append(nbformat.v4.new_code_cell(WRITE_METRICS))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def course(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder, "00_first", ["seed", "n_values"])
    write_notebook(folder, "01_second", ["seed", "mlp_steps"])
    return folder


@pytest.fixture
def executed(monkeypatch):
    """Record papermill runs instead of executing: ``[(notebook name, parameters), ...]``."""
    runs = []
    monkeypatch.setattr(pm, "execute_notebook", lambda path, out, parameters, **kw: runs.append(
        (Path(path).name, parameters)))
    return runs


def test_parameters_go_to_the_notebooks_that_declare_them(course, tmp_path, executed):
    timings = run_course(course, tmp_path / "out", {"seed": 1, "mlp_steps": 5})
    assert list(timings) == ["00_first", "01_second"]
    metrics = str((tmp_path / "out" / "metrics").resolve())
    assert executed == [("00_first.ipynb", {"out_dir": metrics, "seed": 1}),
                        ("01_second.ipynb", {"out_dir": metrics, "seed": 1, "mlp_steps": 5})]


def test_a_misspelt_parameter_stops_the_run_before_any_notebook(course, tmp_path, executed):
    with pytest.raises(SystemExit) as err:
        run_course(course, tmp_path / "out", {"seed": 1, "n_valuse": 3})
    message = str(err.value)
    assert "unknown parameter 'n_valuse' (did you mean 'n_values'?)" in message
    assert "00_first.ipynb, 01_second.ipynb" in message and "seed" not in message.splitlines()[0]
    assert executed == [] and not (tmp_path / "out").exists()


def test_every_unknown_parameter_is_named(course, tmp_path, executed):
    with pytest.raises(SystemExit) as err:
        run_course(course, tmp_path / "out", {"zzz": 1, "mlp_step": 2})
    message = str(err.value)
    assert "unknown parameter 'zzz'\n" in message and "unknown parameter 'mlp_step' (did you mean 'mlp_steps'?)" in message
    assert "their parameters are: mlp_steps, n_values, out_dir, seed" in message
    assert executed == []


def test_a_parameter_of_a_notebook_left_out_by_only_is_unknown(course, tmp_path, executed):
    with pytest.raises(SystemExit, match="unknown parameter 'mlp_steps'") as err:
        run_course(course, tmp_path / "out", {"mlp_steps": 5}, only=["00"])
    assert "notebooks considered: 00_first.ipynb\n" in str(err.value)
    assert executed == []


def test_a_good_run_executes_the_notebook(course, tmp_path):
    out = tmp_path / "out"
    timings = run_course(course, out, {"seed": 3}, only=["00"])
    assert list(timings) == ["00_first"]
    executed = nbformat.read(str(out / "executed" / "00_first.ipynb"), as_version=4)
    assert any("seed = 3" in c.source for c in executed.cells), "papermill injected the parameter"
    assert json.loads((out / "metrics" / "00_first.json").read_text()) == {"headline": {"seed": 3}}
