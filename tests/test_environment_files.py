"""pyproject.toml, environment.yml and binder/ must install the same dependencies."""
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


def pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return runtime, dev


def as_map(reqs):
    return {r.name.lower(): str(r.specifier) for r in reqs}


def test_conda_environment_matches_pyproject():
    runtime, dev = pyproject()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_part = [d for d in env["dependencies"] if isinstance(d, dict)]
    conda_map = as_map(Requirement(d) for d in conda)
    for req in runtime + dev:
        name = CONDA_NAMES.get(req.name.lower(), req.name.lower())
        assert name in conda_map, f"environment.yml lacks {name} (pyproject.toml needs {req})"
        assert conda_map[name] == str(req.specifier), f"{name}: environment.yml {conda_map[name]} vs pyproject {req.specifier}"
    assert pip_part and "-e ." in pip_part[0]["pip"], "environment.yml must install the course package with pip"
    python = conda_map["python"]
    assert python == ">=" + tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"][2:]


def test_binder_matches_pyproject():
    runtime, _ = pyproject()
    lines = [l.strip() for l in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    binder = as_map(Requirement(l) for l in lines if l and not l.startswith(("#", "-")))
    assert binder == as_map(runtime)
    assert any("whl/cpu" in l for l in lines), "binder must use a CPU build of torch to stay small"
    post = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install --no-deps -e ." in post
