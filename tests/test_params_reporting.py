import json
import os
import stat
from typing import Annotated, Literal

import pytest
from pydantic import Field

import mux
from mux.params import ParameterError


def ns(**values):
    """A namespace like a notebook's globals after the parameters cell."""
    annotations = {"n_values": list[int], "lr": float, "dataset": str, "device": Literal["auto", "cpu", "cuda"],
                   "ckpt": str | None, "quick": bool}
    defaults = dict(n_values=[1, 2], lr=1e-3, dataset="digits", device="auto", ckpt=None, quick=False)
    defaults.update(values)
    return {"__annotations__": annotations, "In": [""], "Out": {}, "mux": mux, **defaults}


def test_valid_parameters_are_returned():
    assert mux.check_parameters(ns(lr=3)) == dict(n_values=[1, 2], lr=3, dataset="digits", device="auto",
                                                  ckpt=None, quick=False)
    assert mux.check_parameters(ns(ckpt="runs/a", device="cuda"))["ckpt"] == "runs/a"


@pytest.mark.parametrize("override, message", [
    (dict(lr="fast"), "parameter 'lr' should be float, got 'fast'"),
    (dict(n_values=[1, "2"]), "parameter 'n_values' should be list\\[int\\]"),
    (dict(n_values="[1, 2]"), "papermill -y"),
    (dict(quick=1), "parameter 'quick' should be bool"),
    (dict(device="tpu"), "parameter 'device' should be"),
    (dict(n_valuse=[3]), "unknown parameter 'n_valuse' \\(did you mean 'n_values'\\?\\)"),
    (dict(batch=5), "unknown parameter 'batch'; this notebook's parameters are: n_values, lr"),
])
def test_bad_parameters_get_clear_errors(override, message):
    with pytest.raises(ParameterError, match=message):
        mux.check_parameters(ns(**override))


def test_no_declared_parameters_is_an_error():
    with pytest.raises(ParameterError, match="name: type = default"):
        mux.check_parameters({"x": 1})


def test_write_and_summarise_metrics(tmp_path):
    mux.write_metrics(tmp_path, "01_datamux", {"headline": {"mlp_acc_n1": 0.97, "runs": 8}, "curve": [1, 2]})
    mux.write_metrics(tmp_path, "00_start_here", {"torch": "2.4"})
    read = mux.read_metrics(tmp_path)
    assert read["01_datamux"]["headline"]["mlp_acc_n1"] == 0.97
    table = mux.summary_table(read)
    assert "01_datamux" in table and "mlp_acc_n1" in table and "0.9700" in table and "curve" not in table
    assert json.loads((tmp_path / "01_datamux.json").read_text())["curve"] == [1, 2]


@pytest.mark.parametrize("bad", [{"a": float("nan")}, {"a": object()}, {1: 2}])
def test_write_metrics_rejects_non_json(tmp_path, bad):
    with pytest.raises(ValueError):
        mux.write_metrics(tmp_path, "x", bad)


def test_paper_vs_ours_table():
    t = mux.paper_vs_ours([("MNIST MLP", "qualitative", "0.97")])
    assert t.splitlines()[0] == "| setting | paper | this run |" and "| MNIST MLP | qualitative | 0.97 |" in t


def test_pick_device_and_versions():
    assert mux.pick_device("cpu").type == "cpu"
    assert mux.pick_device("auto").type in ("cpu", "cuda", "mps")
    assert "torch" in mux.versions() and "python" in mux.versions()


def one(annotation, value):
    """A namespace that declares one parameter ``x``."""
    return {"__annotations__": {"x": annotation}, "x": value}


@pytest.mark.parametrize("annotation, value, message", [
    (Literal[0, 1], True, "parameter 'x' should be Literal\\[0, 1\\], got True \\(bool\\)"),
    (Literal[0, 1], 1.0, "should be Literal\\[0, 1\\], got 1.0"),
    (set[int], [1, 2], "parameter 'x' should be set\\[int\\], got \\[1, 2\\] \\(list\\)"),
    (set[int], {"a"}, "should be set\\[int\\]"),
    (float, float("inf"), "parameter 'x' should be float, got inf \\(float\\); Input should be a finite number"),
    (float, float("nan"), "got nan \\(float\\); Input should be a finite number"),
    (dict[str, list[float]], {"a": [1.0, float("nan")]}, "at x\\['a'\\]\\[1\\]: Input should be a finite number"),
    (list[int], [], "parameter 'x' should be a non-empty list\\[int\\], got \\[\\] \\(list parameters must not be empty"),
    (list[int] | None, [], "should be a non-empty list\\[int\\] \\| None"),
    (list[int], [1, "2"], "should be list\\[int\\], got \\[1, '2'\\] \\(list\\); at x\\[1\\]: Input should be a valid integer"),
    (list[int] | None, "[1]", "papermill -y"),
    (tuple[int, int], [1, 2, 3], "should be tuple\\[int, int\\]"),
    (int, True, "parameter 'x' should be int, got True \\(bool\\)"),
    (float, False, "parameter 'x' should be float, got False \\(bool\\)"),
    (int, 2.0, "parameter 'x' should be int, got 2.0 \\(float\\)"),
])
def test_strict_type_checks(annotation, value, message):
    with pytest.raises(ParameterError, match=message):
        mux.check_parameters(one(annotation, value))


@pytest.mark.parametrize("annotation, value", [
    (float, 3),
    (Literal[0, 1], 1),
    (set[int], {1, 2}),
    (tuple[int, int], [1, 2]),  # YAML has no tuples
    (tuple[float, ...], (1, 2.5)),
    (dict[str, float], {"a": 1, "b": 0.5}),
    (list[int] | None, None),
    (Annotated[list[int], Field(min_length=0)], []),
    ("list[int]", [1]),  # an annotation kept as text
])
def test_valid_values_are_returned_unconverted(annotation, value):
    assert mux.check_parameters(one(annotation, value))["x"] is value


def test_rerunning_the_validation_cell_after_the_notebook_ran():
    g = ns(lr=3)  # papermill's injected cell has run: this is the first check
    params = mux.check_parameters(g)
    # the rest of the validation cell, and later cells, define the notebook's own variables
    g.update(params=params, device=mux.pick_device("cpu"), started=12.5, n=8, name="orthogonal",
             results={"mlp": [0.9, 0.8]}, curve=[1.0, 0.5])
    assert mux.check_parameters(g) == params
    assert mux.check_parameters(g)["device"] == "auto"
    # a parameter that holds plain data again (the parameters cell re-run with an edit) is checked again
    g["lr"] = "fast"
    with pytest.raises(ParameterError, match="parameter 'lr' should be float, got 'fast'") as err:
        mux.check_parameters(g)
    assert "unknown" not in str(err.value)


def test_a_misspelt_override_is_still_reported_when_the_cell_is_rerun():
    g = ns(n_valuse=[3])  # papermill injected a misspelt name before the first check
    for _ in range(2):
        with pytest.raises(ParameterError, match="unknown parameter 'n_valuse' \\(did you mean 'n_values'\\?\\)"):
            mux.check_parameters(g)
    g.update(device=mux.pick_device("cpu"))  # never validated: still checked against its annotation
    with pytest.raises(ParameterError, match="parameter 'device' should be"):
        mux.check_parameters(g)


def test_write_metrics_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    synced = []

    def fake_fsync(fd):
        info = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(info.st_mode) else (info.st_size, (tmp_path / "m.json").exists()))
        if stat.S_ISDIR(info.st_mode):
            raise OSError("directories cannot be synced here")  # as on some platforms: ignored

    monkeypatch.setattr(os, "fsync", fake_fsync)
    path = mux.write_metrics(tmp_path, "m", {"acc": 0.5})
    size = len(path.read_bytes())
    assert synced == [(size, False), "dir"], "the whole file is synced before the rename, then its folder"
    assert json.loads(path.read_text()) == {"acc": 0.5} and not list(tmp_path.glob("*.tmp"))


def test_train_config_takes_the_notebook_budget_and_scale_up_knobs():
    params = {"steps": 30, "lr": 1e-3, "batch_size": 64, "seed": 4, "device": "cpu", "checkpoint_dir": "ck",
              "checkpoint_every": 5, "num_processes": 1, "grad_accum_steps": 2, "num_workers": 0,
              "mixed_precision": "no", "unrelated": "x"}
    cfg = mux.train_config(params, "vit_n2", warmup_steps=3, seed=7)
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.seed, cfg.warmup_steps) == (30, 1e-3, 64, 7, 3)
    assert (cfg.checkpoint_dir, cfg.checkpoint_every, cfg.grad_accum_steps, cfg.description) == ("ck/vit_n2", 5, 2, "vit_n2")
    assert cfg.cpu and cfg.mixed_precision == "no"
    assert mux.train_config({**params, "checkpoint_dir": ""}, "a").checkpoint_dir is None
    with pytest.raises(TypeError, match="not TrainConfig fields"):
        mux.train_config(params, "a", steps=3)
    with pytest.raises(ValueError, match="tag"):
        mux.train_config(params, "a/b")


def test_declared_parameters_keep_every_annotated_line(tmp_path):
    import nbformat

    from mux.params import declared_parameters

    cell = nbformat.v4.new_code_cell('mode: Literal["a", "b"] = "a"  # which mode\n'
                                     "steps: Annotated[int, Field(ge=1)] = 5  # training steps (x = 1 is fine)\n"
                                     "names: list[str] = ['x']  # names")
    cell.metadata["tags"] = ["parameters"]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(path))
    found = declared_parameters(path)
    assert list(found) == ["mode", "steps", "names"]
    assert found["steps"] == {"name": "steps", "inferred_type_name": "Annotated[int, Field(ge=1)]", "default": "5",
                              "help": "training steps (x = 1 is fine)"}
    assert found["mode"]["inferred_type_name"] == 'Literal["a", "b"]' and found["mode"]["help"] == "which mode"


def test_parameter_errors_name_the_type_as_a_reader_writes_it():
    namespace = {"__annotations__": {"steps": Annotated[int, Field(ge=1)], "ns": list[Annotated[int, Field(ge=1)]],
                                     "w": Annotated[float, Field(ge=0, le=1)]},
                 "steps": 0, "ns": [0], "w": 2.0}
    with pytest.raises(ParameterError) as err:
        mux.check_parameters(namespace)
    text = str(err.value)
    assert "parameter 'steps' should be int >= 1, got 0 (int)" in text
    assert "parameter 'ns' should be list[int >= 1], got [0] (list)" in text
    assert "parameter 'w' should be float >= 0 and <= 1, got 2.0 (float)" in text
    assert "FieldInfo" not in text


def test_a_notebook_without_a_parameters_cell_declares_none_and_two_are_refused(tmp_path):
    import nbformat

    from mux.params import declared_parameters

    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), str(path))
    assert declared_parameters(path) == {}
    cells = [nbformat.v4.new_code_cell("a: int = 1"), nbformat.v4.new_code_cell("b: int = 2")]
    for cell in cells:
        cell.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), str(path))
    with pytest.raises(ParameterError, match="2 cells tagged 'parameters', expected at most one"):
        declared_parameters(path)
