"""Full-scale configurations (``configs/*.yaml``) and their runner, ``mux.runner.runs``.

Every configuration is checked against its notebook here (it exists, and it sets only parameters
the notebook declares, of the declared types); the runner's bookkeeping (skip a finished run,
resume an interrupted one, refuse another run's folder) is tested on tiny notebooks written here.
The configurations' smoke runs on real notebooks are in ``test_smoke_runs.py``.
"""
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from mux.runner import runs
from mux.runner.course import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def a_usable_gpu(request, monkeypatch):
    """The runs here are of test notebooks on this CPU machine: the GPU check passes, except in its own tests."""
    if "gpu" not in request.node.name:
        monkeypatch.setattr(runs, "gpu_problem", lambda: None)


def test_there_is_a_configuration_for_every_chapter_with_full_scale_runs():
    books = {runs.load_config(p).notebook for p in CONFIG_FILES}
    assert books == {"01_datamux.ipynb", "03_mux_plms.ipynb", "04_vision_mux.ipynb", "05_mixvit.ipynb"}
    assert len(CONFIG_FILES) >= 18


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_configuration_names_a_notebook_and_only_its_parameters(path):
    config = runs.load_config(path)
    declared = runs.check_config(config)
    assert config.smoke, "every configuration has smoke overrides for CI"
    assert config.resources["gpu_hours"] > 0 and config.resources["estimate"]
    for value in (config.data["get"], config.data["name"]):
        assert isinstance(value, str) and value
    # a full run writes checkpoints often enough that a kill loses little, and never asserts the default run's claims
    if "check_claims" in declared:
        assert config.parameters.get("check_claims") is False
    assert config.parameters.get("checkpoint_every", 0) > 0
    for key, value in config.paper_figures.get("figures", {}).items():
        assert isinstance(value, (int, float)), (key, value)


def test_the_command_line_checks_every_configuration(capsys):
    assert main(["check-configs"]) == 0
    assert f"{len(CONFIG_FILES)} configurations checked" in capsys.readouterr().out


# ---------------------------------------------------------------- bad configurations

GOOD = {"notebook": "00_first.ipynb", "paper": "A paper", "reproduces": "Table 1",
        "data": {"name": "none", "get": "nothing to get"},
        "resources": {"gpu_hours": 0.1, "gpu_memory_gb": 1, "gpus": 1, "estimate": "a guess"},
        "parameters": {"seed": 3}, "smoke": {"steps": 1}}


def write_notebook(folder, name, parameters):
    """A notebook whose parameters cell declares ``parameters`` (name -> (type, default)) plus out_dir and
    checkpoint_dir; it writes its metrics, and a checkpoint file counting how often it ran."""
    lines = [f"{p}: {t} = {d!r}  # help: {p}" for p, (t, d) in parameters.items()]
    lines += ['out_dir: str = "outputs"  # help: metrics', 'checkpoint_dir: str = ""  # help: checkpoints']
    body = f"""
import json, pathlib
ck = pathlib.Path(checkpoint_dir); ck.mkdir(parents=True, exist_ok=True)
runs_so_far = len(list(ck.glob("ran-*")))
(ck / f"ran-{{runs_so_far}}").write_text("")
if {'fail' in parameters} and globals().get("fail"):
    raise RuntimeError("asked to fail")
pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
import os
seen = {{"checkpoint_dir": checkpoint_dir, "env": {{k: os.environ.get(k) for k in
        ("MUX_TRACKER", "MUX_TRACKER_DIR", "MUX_TF32", "MUX_COMPILE", "MUX_EVALUATE_ONLY")}}}}
pathlib.Path(out_dir, "{name}.json").write_text(json.dumps({{"headline": {{"acc_n2": 0.5, "speed_n2": 1.9, "seed": seed}},
                                                           "seen": seen}}))
"""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell(f"# {name}"),
        nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(folder / f"{name}.ipynb"))


@pytest.fixture
def course(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    write_notebook(books, "00_first", {"seed": ("int", 0), "steps": ("int", 5), "fail": ("bool", False),
                                       "names": ("list[str]", ["a"]), "data_dir": ("str", "data")})
    configs = tmp_path / "configs"
    configs.mkdir()
    return books, configs


def write_config(configs, name, **changes):
    config = {**GOOD, **changes}
    path = configs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(notebook="00_frist.ipynb"), "notebook '00_frist.ipynb' does not exist in"),
    (dict(parameters={"sead": 1}), "parameters.sead: 00_first.ipynb has no parameter 'sead' (did you mean 'seed'?)"),
    (dict(parameters={"seed": "one"}), "parameters.seed: parameter 'seed' should be int, got 'one'"),
    (dict(parameters={"names": "a"}), "parameter 'names' should be list[str], got 'a'"),
    (dict(smoke={"steps": 1.5}), "smoke.steps: parameter 'steps' should be int, got 1.5"),
    (dict(parameters={"out_dir": "x"}), "parameters.out_dir: set by the runner"),
    (dict(resources={"gpu_hours": "a lot", "gpu_memory_gb": 1, "gpus": 1, "estimate": "?"}),
     "resources.gpu_hours should be int or float, got 'a lot'"),
    (dict(reproducess="typo"), "unknown key(s) 'reproducess'"),
    (dict(plot=[{"label": "x", "accuracy": "acc_n2"}]), "plot[0]: expected {label, accuracy, speed}"),
])
def test_a_bad_configuration_is_refused_with_a_message_naming_the_problem(course, changes, message):
    books, configs = course
    with pytest.raises(runs.ConfigError) as err:
        runs.check_config(runs.load_config(write_config(configs, "bad", **changes)), books)
    assert message in str(err.value)


def test_missing_keys_and_files_are_named(course, tmp_path):
    books, configs = course
    path = configs / "short.yaml"
    path.write_text("notebook: 00_first.ipynb\n")
    with pytest.raises(runs.ConfigError, match="missing key\\(s\\) paper, reproduces, data, resources, parameters"):
        runs.load_config(path)
    with pytest.raises(runs.ConfigError, match="does not exist"):
        runs.config_files(tmp_path / "nothing.yaml")
    with pytest.raises(runs.ConfigError, match="did you mean .*datamux_mnist.yaml"):
        runs.config_files("configs/datamux_mnsit.yaml")


def test_one_bad_configuration_in_a_folder_stops_the_run_before_any_starts(course, tmp_path):
    books, configs = course
    write_config(configs, "a_good")
    write_config(configs, "b_bad", parameters={"stepz": 1})
    with pytest.raises(runs.ConfigError, match="stepz"):
        runs.run_configs(configs, tmp_path / "runs", notebooks=books)
    assert not (tmp_path / "runs").exists()


def test_more_processes_than_devices_are_refused(course, tmp_path, monkeypatch):
    books, configs = course
    config = runs.load_config(write_config(configs, "big"))
    import os

    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(runs.ConfigError, match="big: num_processes=4 asks for 4 CPU processes, but this machine has "
                                               "2 CPU cores"):
        runs._check_processes(config, {"num_processes": 4})
    runs._check_processes(config, {"num_processes": 2})


# ---------------------------------------------------------------- runs: skip, resume, refuse

@pytest.mark.notebook
def test_a_run_is_written_skipped_when_finished_and_resumed_when_interrupted(course, tmp_path):
    books, configs = course
    write_config(configs, "first", parameters={"seed": 3, "data_dir": "{data_root}/x"},
                 paper_figures={"source": "Table 1", "figures": {"acc_n2": 0.6}},
                 plot=[{"label": "N=2", "accuracy": "acc_n2", "speed": "speed_n2"}])
    write_config(configs, "second", parameters={"seed": 4, "fail": True})
    out = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="1 of 2 configuration\\(s\\) failed: second"):
        runs.run_configs(configs, out, data_root=tmp_path / "d", notebooks=books)
    folder = out / "first"
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "finished" and record["identity"]["parameters"]["data_dir"] == "{data_root}/x"
    assert str(tmp_path / "d" / "x") in (folder / "run.log").read_text()  # what the notebook got
    assert (folder / "00_first.ipynb").is_file() and (folder / "run.log").is_file()
    assert json.loads((folder / "metrics" / "00_first.json").read_text())["headline"]["seed"] == 3
    assert json.loads((out / "second" / "run.json").read_text())["status"] == "failed"
    assert "asked to fail" in (out / "second" / "run.log").read_text() or "asked to fail" in \
        json.loads((out / "second" / "run.json").read_text())["error"]

    # again: the finished one is skipped (its notebook does not run), the failed one runs again into its folder
    with pytest.raises(RuntimeError):
        runs.run_configs(configs, out, data_root=tmp_path / "d", notebooks=books)
    assert len(list((folder / "checkpoints").glob("ran-*"))) == 1
    assert len(list((out / "second" / "checkpoints").glob("ran-*"))) == 2
    assert json.loads((out / "second" / "run.json").read_text())["attempts"] == 2

    # the report: the paper's figure beside ours, the figure of accuracy against speed
    text = runs.report(out, configs)
    assert "| acc_n2 | 0.600 | 0.500 | -0.100 | - |" in text and "| `second` |" in text and "failed" in text
    assert "| speed_n2 | - | 1.900 | - | - |" in text
    assert (out / "report.md").read_text() == text and (out / "report.png").stat().st_size > 1000


@pytest.mark.notebook
def test_a_variant_and_an_evaluation_are_runs_of_their_own_beside_the_finished_run(course, tmp_path):
    books, configs = course
    config = runs.load_config(write_config(configs, "first"))
    out = tmp_path / "runs"
    where = out.resolve()
    with pytest.raises(runs.ConfigError, match="--evaluate reads the checkpoints of first's finished run"):
        runs.run_config(config, out, data_root=tmp_path, notebooks=books, options=runs.RunOptions(evaluate=True))
    runs.run_config(config, out, data_root=tmp_path, notebooks=books)
    options = runs.RunOptions(variant="seed7", tracker="tensorboard", tf32=True, compile="inductor")
    runs.run_config(config, out, data_root=tmp_path, notebooks=books, overrides={"seed": 7}, options=options)
    metrics = json.loads((out / "first@seed7" / "metrics" / "00_first.json").read_text())
    assert metrics["headline"]["seed"] == 7
    assert metrics["seen"] == {"checkpoint_dir": str(where / "first@seed7" / "checkpoints"),
                               "env": {"MUX_TRACKER": "tensorboard", "MUX_TRACKER_DIR": str(where / "first@seed7" / "tracker"),
                                       "MUX_TF32": "1", "MUX_COMPILE": "inductor", "MUX_EVALUATE_ONLY": None}}
    runs.run_config(config, out, data_root=tmp_path, notebooks=books, options=runs.RunOptions(evaluate=True))
    seen = json.loads((out / "first@evaluate" / "metrics" / "00_first.json").read_text())["seen"]
    assert seen["checkpoint_dir"] == str(where / "first" / "checkpoints")  # the finished run's, read not written
    assert seen["env"]["MUX_EVALUATE_ONLY"] == "1" and seen["env"]["MUX_TRACKER"] is None
    record = json.loads((out / "first" / "run.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 1 and "variant" not in record["identity"]
    assert json.loads((out / "first@evaluate" / "run.json").read_text())["identity"]["evaluate"] is True
    assert "Variants of `first` (`--variant`, `--evaluate`): `first@evaluate` (finished), `first@seed7` (finished)" \
        in runs.report(out, configs, plot=False)
    with pytest.raises(runs.ConfigError, match="--variant names a folder suffix"):
        runs.RunOptions(variant="../elsewhere")


def test_the_command_line_passes_the_run_options(monkeypatch):
    got = {}
    monkeypatch.setattr(runs, "run_configs", lambda *args, **kw: got.update(kw))
    assert main(["full", "configs/datamux_mnist.yaml", "--evaluate", "--tf32", "--tracker", "tensorboard",
                 "--compile", "inductor"]) == 0
    assert got["options"] == runs.RunOptions(variant="evaluate", evaluate=True, tracker="tensorboard", tf32=True,
                                             compile="inductor")


@pytest.mark.notebook
def test_a_folder_holding_another_run_is_refused(course, tmp_path):
    books, configs = course
    config = runs.load_config(write_config(configs, "first"))
    out = tmp_path / "runs"
    runs.run_config(config, out, data_root=tmp_path, notebooks=books)
    with pytest.raises(runs.ConfigError, match="holds another run: the same configuration with other parameters "
                                               "\\(seed: 3 there, 5 here\\)"):
        runs.run_config(config, out, data_root=tmp_path, overrides={"seed": 5}, notebooks=books)
    with pytest.raises(runs.ConfigError, match="holds another run: a full run, not a smoke run"):
        runs.run_config(config, out, data_root=tmp_path, smoke=True, notebooks=books)
    # a folder of that name that is not a run at all
    (out / "other").mkdir()
    (out / "other" / "notes.txt").write_text("mine")
    other = runs.load_config(write_config(configs, "other"))
    with pytest.raises(runs.ConfigError, match="holds no run.json"):
        runs.run_config(other, out, data_root=tmp_path, notebooks=books)


def test_a_run_still_going_is_not_started_twice(course, tmp_path):
    import os
    import socket
    import subprocess

    books, configs = course
    config = runs.load_config(write_config(configs, "first"))
    folder = tmp_path / "runs" / "first"
    folder.mkdir(parents=True)
    identity = {"config": "first", "notebook": "00_first.ipynb", "smoke": False, "parameters": config.parameters}
    other = subprocess.Popen(["sleep", "60"])  # the process that wrote the record, still alive
    try:
        record = {"identity": identity, "status": "running", "pid": other.pid, "host": socket.gethostname(), "attempts": 1}
        (folder / "run.json").write_text(json.dumps(record))
        with pytest.raises(runs.ConfigError, match=f"already running .*process {other.pid}"):
            runs.run_config(config, tmp_path / "runs", data_root=tmp_path, notebooks=books)
        # a record left by this very process (a restart that reused its number) is not a run still going
        (folder / "run.json").write_text(json.dumps(dict(record, pid=os.getpid())))
        assert not runs._alive(os.getpid(), socket.gethostname())
    finally:
        other.kill()


@pytest.mark.notebook
def test_a_folder_of_configurations_runs_in_order_and_one_problem_stops_only_its_own(course, tmp_path, monkeypatch):
    books, configs = course
    # "a_second" starts from "b_first"'s output, so it runs after it although it sorts before it
    write_config(configs, "a_second", parameters={"seed": 1, "data_dir": "{runs}/b_first/checkpoints"})
    write_config(configs, "b_first", parameters={"seed": 2})
    write_config(configs, "c_big", parameters={"seed": 3})
    assert runs.needs(runs.load_config(configs / "a_second.yaml")) == ["b_first"]
    assert runs.needs(runs.load_config(ROOT / "configs" / "mux_plms_base_glue_mid_n5.yaml")) == ["mux_plms_base_pretrain_n5"]
    assert runs.needs(runs.load_config(ROOT / "configs" / "mux_plms_base_pretrain_n5.yaml")) == []  # its own stages
    assert runs.needs(runs.load_config(ROOT / "configs" / "tmux_mnli_n5.yaml")) == []  # {runs}/shared/: no run
    monkeypatch.setattr(runs, "_check_processes", lambda config, params: (_ for _ in ()).throw(
        runs.ConfigError("too many processes")) if config.name == "c_big" else None)
    lines = []
    with pytest.raises(RuntimeError, match="1 of 3 configuration\\(s\\) failed: c_big"):
        runs.run_configs(configs, tmp_path / "runs", data_root=tmp_path, notebooks=books, log=lines.append)
    started = [line.split(":")[0] for line in lines if line.startswith("==> ")]
    assert started == ["==> b_first", "==> a_second"] and "c_big FAILED: too many processes" in "\n".join(lines)
    # a run that starts from one not finished is refused
    (tmp_path / "runs" / "b_first" / "run.json").unlink()
    (tmp_path / "runs" / "b_first" / "notes").write_text("")
    with pytest.raises(runs.ConfigError, match="starts from the output of b_first, which has not finished"):
        runs.run_config(runs.load_config(configs / "a_second.yaml"), tmp_path / "other", data_root=tmp_path,
                        notebooks=books)


def test_paper_figures_name_the_metrics_the_notebooks_write_for_glue():
    import re

    from data_utils.glue import GLUE_TASKS

    main = {t: "acc" if spec.main_metric == "accuracy" else spec.main_metric for t, spec in GLUE_TASKS.items()}
    main["conll"] = "f1"
    checked = 0
    for path in CONFIG_FILES:
        for key in runs.load_config(path).paper_figures.get("figures", {}):
            m = re.fullmatch(r"(?:bert|mux_bert|mux_electra|mux_bert_contextual|tmux)_([a-z0-9]+)_(\w+)_n\d+", key)
            if m and m.group(1) in main:
                assert m.group(2) == main[m.group(1)], (path.name, key, main[m.group(1)])
                checked += 1
    assert checked > 50


def test_a_torchvision_dataset_is_exported_as_an_image_folder(tmp_path, monkeypatch):
    import sys

    import torchvision
    from PIL import Image

    sys.path.insert(0, str(ROOT / "scripts"))
    import export_image_folder

    class FakeCIFAR:  # torchvision's CIFAR100 interface: classes, targets, (PIL image, label) items
        def __init__(self, root, train, download):
            self.classes = ["apple", "aquarium_fish"]
            self.targets = [0, 1, 1] if train else [1, 0]

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32), (40 * i, 0, 0)), self.targets[i]

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR)
    assert export_image_folder.export("cifar100", tmp_path / "c100", tmp_path) == {"train": 3, "val": 2}
    from data_utils import image_folder

    splits = image_folder(tmp_path / "c100", image_size=32)
    assert splits.class_names == ["apple", "aquarium_fish"] and splits.sizes() == {"train": 3, "val": 0, "test": 2}


# ---------------------------------------------------------------- a missing or unusable GPU

def fake_cuda(monkeypatch, *, build="12.4", available=False, count=0, nvidia=False):
    import os
    import shutil

    import torch

    from mux import env

    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if nvidia else None)
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: nvidia if p == "/proc/driver/nvidia" else real_isdir(p))
    return env


@pytest.mark.parametrize("fake, expected", [
    (dict(build=None), "CPU-only build (torch.version.cuda is None)"),
    (dict(build="12.4"), "no GPU found: torch.cuda.device_count() is 0 and there is no NVIDIA device"),
    (dict(build="12.8", nvidia=True), "torch.cuda.is_available() is False. This torch was built for CUDA 12.8; "
                                      "the driver is probably too old"),
])
def test_gpu_problem_names_each_reason(monkeypatch, fake, expected):
    env = fake_cuda(monkeypatch, **fake)
    assert expected in env.gpu_problem()


def test_a_usable_gpu_is_no_problem(monkeypatch):
    env = fake_cuda(monkeypatch, available=True, count=1, nvidia=True)
    assert env.gpu_problem() is None


def test_a_configuration_that_needs_a_gpu_is_refused_without_one_unless_the_cpu_is_asked_for(course, tmp_path,
                                                                                            monkeypatch):
    books, configs = course
    write_config(configs, "needs_gpu")
    fake_cuda(monkeypatch, build="12.8", nvidia=True)
    with pytest.raises(runs.ConfigError, match=r"needs_gpu: resources.gpus is 1 and device is 'auto', but an NVIDIA "
                                               r"driver is present .* CUDA 12.8.*pass -p device cpu"):
        runs.run_configs(configs, tmp_path / "runs", notebooks=books)
    assert not (tmp_path / "runs").exists()  # refused before anything ran
    config = runs.load_config(configs / "needs_gpu.yaml")
    runs.check_gpu(config, {"device": "cpu"})  # on purpose: not refused
    fake_cuda(monkeypatch, build=None)
    with pytest.raises(runs.ConfigError, match="CPU-only build"):
        runs.check_gpu(config, {"device": "cuda"})


def test_the_command_line_refuses_without_a_gpu(tmp_path, monkeypatch, capsys):
    fake_cuda(monkeypatch, build="12.4")
    target = str(ROOT / "configs" / "datamux_mnist.yaml")
    assert main(["full", target, "--runs", str(tmp_path / "runs")]) == 2
    assert "datamux_mnist: resources.gpus is 1 and device is 'auto', but no GPU found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
