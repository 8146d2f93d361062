"""``python -m mux.runner.course preflight``: offline projections of every configuration, and the on-machine
measurement run on the CPU with a configuration's smoke parameters."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from mux.runner import preflight, runs
from mux.runner.course import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml"))


def test_offline_preflight_covers_every_configuration(tmp_path, capsys, monkeypatch):
    # counting every model's multiply-adds takes a minute on two cores; test_costs_count_the_work_done_once_per_instance
    # counts one configuration's for real, and this one checks that every configuration is covered
    monkeypatch.setattr(preflight, "macs_per_instance", lambda t: 1e9 * t.cost)
    monkeypatch.setattr(preflight, "_MACS", {})  # (and keeps those stand-in counts out of the shared cache)
    out = tmp_path / "preflight.json"
    assert main(["preflight", str(ROOT / "configs"), "--offline", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["configs"]) == {p.stem for p in CONFIG_FILES}
    for name, r in report["configs"].items():
        assert r["gpu_hours"] > 0 and r["disk_gb"] > 0, name
        assert all(t["parameters"] > 0 for t in r["trainings"]), name
    assert report["gpu_hours"] > 0 and report["disk_gb"] > 0 and "memory_gb" in report["formulas"]
    assert "total:" in capsys.readouterr().out


def test_the_assumed_rate_is_read_from_the_estimate():
    config = runs.load_config(ROOT / "configs" / "vision_imagenet.yaml")
    rate = preflight.assumed_rate(config)
    assert rate["instances_per_s"] == 3300 and rate["overhead"] == 0.10 and rate["source"].startswith("assumed")
    step = preflight.assumed_rate(runs.load_config(ROOT / "configs" / "datamux_mnist.yaml"))
    assert step["seconds_per_step"] == 0.0075


def test_measured_rates_override_the_assumed_ones(tmp_path):
    config = runs.load_config(ROOT / "configs" / "mixvit_convit_cifar100.yaml")
    params = runs.resolve_parameters(config, "data", "runs")
    rates = {config.name: {k: 6000.0 for k in ("single", "embedding", "encoding", "mimo", "mixmo")}}
    assumed = preflight.offline_report(config, params)
    measured = preflight.offline_report(config, params, rates)
    assert measured["rate_source"] == "measured" and assumed["rate"]["instances_per_s"] == 3000
    per_step = params["batch_size"] * params.get("grad_accum_steps", 1) * params.get("num_processes", 1)
    for a, m in zip(assumed["trainings"], measured["trainings"]):
        assert abs(m["gpu_hours"] - m["steps"] * per_step / 6000 / 3600) < 1e-6  # the measured rate, as it is
        assert abs(a["gpu_hours"] / (2 * m["gpu_hours"] * a["cost_per_instance"]) - 1) < 1e-3  # half the rate, x cost


def test_costs_count_the_work_done_once_per_instance():
    # MUX-BERT's MLM at N = 10 runs BERT-base's encoder once per 10 sentences, but its vocabulary head
    # (768 x 30,522 at every position) once per sentence: about 0.3 of BERT's MLM step, not 0.1
    config = runs.load_config(ROOT / "configs" / "mux_plms_base_pretrain_n10.yaml")
    rows = {r["model"]: r for r in preflight.offline_report(config, runs.resolve_parameters(config, "d", "r"))["trainings"]}
    assert 0.25 < rows["MUX-BERT mlm N=10"]["cost_per_instance"] < 0.35
    # a sentence task reads position 0 only: a tenth of the encoder, which is 0.79 of BERT's MLM step
    assert 0.07 < rows["MUX-BERT sentence N=10"]["cost_per_instance"] < 0.09
    assert rows["BERT mlm N=1"]["cost_per_instance"] == 1.0
    assert rows["MUX-BERT contextual mlm N=10"]["cost_per_instance"] > rows["MUX-BERT mlm N=10"]["cost_per_instance"]


def test_a_configuration_its_notebook_no_longer_matches_is_named(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "configs" / "vision_cifar100.yaml").read_text())
    raw["parameters"]["patch_sise"] = 16
    raw["parameters"]["steps"] = "many"
    path = tmp_path / "drifted.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["preflight", str(path), "--offline"]) == 2
    err = capsys.readouterr().err
    assert "patch_sise" in err and "did you mean 'patch_size'" in err and "parameters.steps" in err


def test_the_on_machine_preflight_runs_on_the_cpu_with_smoke_parameters(tmp_path):
    out = tmp_path / "online.json"
    assert main(["preflight", str(ROOT / "configs" / "mixvit_convit_cifar100.yaml"), "--smoke", "--steps", "2",
                 "--device", "cpu", "--skip-data", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["configs"]["mixvit_convit_cifar100"]
    assert set(report["measured"]) == {"single", "embedding", "encoding", "mimo", "mixmo"}
    for m in report["measured"].values():
        assert m["steps"] == 2 and m["instances_per_s"] > 0 and m["loader_instances_per_s"] > 0
    assert report["rate_source"] == "measured" and all(t["gpu_hours"] > 0 for t in report["trainings"])


def test_the_old_command_name_still_works(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mux.course", "preflight", "configs/datamux_mnist.yaml", "--offline"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "datamux_mnist" in done.stdout
