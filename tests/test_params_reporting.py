import json
from typing import Literal

import pytest

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
