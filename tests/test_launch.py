"""``mux.train`` with ``TrainConfig(num_processes=K)`` called from a single process (a notebook):
it trains in K worker processes under torchrun (two CPU processes here, gloo) and hands the
trained weights back into the caller's model.

The slow tests share one two-process run (module fixture) and copy its checkpoint folder.
"""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import mux
from data_utils import load_digits_splits

launch = importlib.import_module("mux.runner.launch")
ROOT = Path(__file__).resolve().parents[1]
N, STEPS = 3, 20


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def _model(data):
    return mux.DataMUXClassifier.for_data(data, N, width=32)


def _cfg(folder, **kw):
    base = dict(num_processes=2, cpu=True, checkpoint_dir=str(folder) if folder else None, max_steps=STEPS,
                batch_size=30, log_every=5, checkpoint_every=10, progress=False)
    base.update(kw)
    return mux.TrainConfig(**base)


def make_loss(scale):
    """A closure (a lambda over ``scale``): cloudpickle copies it by value into the workers."""
    return lambda model, batch, n: mux.classification_loss(model, batch, n) * scale


def make_eval(data):
    return lambda model: mux.evaluate(model, data.test, N)


def failing_loss(model, batch, n):
    """A module-level function: pickled by reference, imported by the workers (this module's folder
    is on their sys.path, as it is on the caller's)."""
    raise RuntimeError("boom from the loss in a worker")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"parameter {k} differs")


def _train(data, folder, **kw):
    return mux.train(_model(data), data.train, _cfg(folder, **kw), N, loss_fn=make_loss(2.0), eval_fn=make_eval(data))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("launch") / "ckpt"
    started = time.perf_counter()
    result = _train(digits, folder)
    return {"folder": folder, "result": result, "weights": _weights(result.model),
            "seconds": time.perf_counter() - started}


def _copy(run, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(run["folder"], folder)
    return folder


def _no_launch(*args, **kwargs):
    raise AssertionError("no worker process should have been started")


# ------------------------------------------------------------------ two processes from this one


@pytest.mark.slow
def test_two_processes_from_this_process_return_the_final_checkpoint(two_process_run, digits):
    result, folder = two_process_run["result"], two_process_run["folder"]
    assert result.num_processes == 2 and result.steps == STEPS and result.resumed_from is None
    assert result.is_main_process and result.device == "cpu:0"
    assert [h["step"] for h in result.history] == [5, 10, 15, 20]
    assert result.history[0]["loss"] > 4  # the closure's scale 2 reached the workers: 2 x ~ln(10) at the start
    # the model returned is the one passed in, on this process's device, holding the final checkpoint
    assert isinstance(result.model, mux.DataMUXClassifier) and result.model.training
    assert mux.device_of(result.model).type == "cpu"
    assert [p.name for p in mux.list_checkpoints(folder)] == ["checkpoint-00000010", "checkpoint-00000020"]
    saved = mux.load_weights(_model(digits), folder / "checkpoint-00000020")
    _assert_same_weights(two_process_run["weights"], _weights(saved))
    # the run records its two processes, and loading its weights here (one process) is fine
    state = json.loads((folder / "checkpoint-00000020" / "trainer_state.json").read_text())
    assert state["run"]["num_processes"] == 2 and state["train_config"]["num_processes"] == 2
    # eval_fn ran in the workers; its evaluation of the end is what this process measures
    assert [e["step"] for e in result.evaluations] == [STEPS]
    here = mux.evaluate(result.model, digits.test, N)
    there = result.evaluations[-1]
    assert there["accuracy"] == here["accuracy"] and there["n_examples"] == here["n_examples"] == 360
    assert there["loss"] == pytest.approx(here["loss"], rel=1e-5)
    assert not (folder / launch.JOB_FOLDER).exists()  # the job and the result file are removed


@pytest.mark.slow
def test_the_same_call_again_returns_the_finished_run_at_once(two_process_run, digits, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_workers", _no_launch)
    again = _train(digits, _copy(two_process_run, tmp_path))
    first = two_process_run["result"]
    _assert_same_weights(two_process_run["weights"], _weights(again.model))
    assert again.resumed_from == again.steps == STEPS and again.num_processes == 2 and again.device == first.device
    assert again.history == first.history and again.evaluations == first.evaluations
    # another run in that folder is not returned: a different learning rate starts the workers (who refuse it)
    with pytest.raises(AssertionError, match="no worker process"):
        _train(digits, tmp_path / "ckpt", lr=1e-3)


@pytest.mark.slow
def test_an_interrupted_run_resumes_in_two_processes_to_the_same_weights(two_process_run, digits, tmp_path):
    folder = _copy(two_process_run, tmp_path)
    shutil.rmtree(folder / "checkpoint-00000020")  # interrupted after the checkpoint of step 10
    resumed = _train(digits, folder)
    first = two_process_run["result"]
    assert resumed.resumed_from == 10 and resumed.steps == STEPS and resumed.num_processes == 2
    _assert_same_weights(two_process_run["weights"], _weights(resumed.model))  # bit for bit on a CPU
    assert resumed.history == first.history and resumed.evaluations == first.evaluations


@pytest.mark.slow
def test_one_process_does_not_resume_a_two_process_run(two_process_run, digits, tmp_path):
    with pytest.raises(ValueError, match="num_processes: 2 there, 1 here"):
        _train(digits, _copy(two_process_run, tmp_path), num_processes=1)


@pytest.mark.slow
def test_a_failing_worker_raises_with_the_end_of_its_output(digits, tmp_path):
    model = _model(digits)
    with pytest.raises(RuntimeError, match=r"(?s)2 worker processes failed \(exit code 1\):\nworkers? [0-9, ]+: "
                                           r"RuntimeError: boom from the loss in a worker\n.*--nproc_per_node 2"):
        mux.train(model, digits.train, _cfg(tmp_path / "ckpt", max_steps=3), N, loss_fn=failing_loss)
    assert (tmp_path / "ckpt" / launch.JOB_FOLDER / launch.JOB_FILE).is_file()  # kept, to rerun by hand


INTERRUPTED_SCRIPT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever disposition the test runner left
import mux
from data_utils import load_digits_splits

data = load_digits_splits()
model = mux.DataMUXClassifier.for_data(data, 3, width=32)
cfg = mux.TrainConfig(num_processes=2, cpu=True, checkpoint_dir=sys.argv[1], max_steps=5000, batch_size=30,
                      checkpoint_every=20, progress=False)
try:
    mux.train(model, data.train, cfg, 3)
except KeyboardInterrupt as err:
    step = mux.latest_checkpoint(sys.argv[1]).name
    same = mux.load_weights(mux.DataMUXClassifier.for_data(data, 3, width=32), sys.argv[1]).state_dict()
    held = all(v.equal(same[k]) for k, v in model.state_dict().items())
    print(f"caught: {err} | {step} | model holds it: {held}", flush=True)
"""


@pytest.mark.slow
def test_interrupting_the_caller_stops_the_workers_after_a_checkpoint(tmp_path):
    # the caller stands for a notebook's kernel: SIGINT to it (the stop button) must reach the workers
    # once, and they save a checkpoint at the step they are in and stop
    script, folder = tmp_path / "caller.py", tmp_path / "ckpt"
    script.write_text(textwrap.dedent(INTERRUPTED_SCRIPT))
    caller = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = []
    reader = threading.Thread(target=lambda: out.extend(caller.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while mux.latest_checkpoint(folder) is None and caller.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert caller.poll() is None, "".join(out)[-3000:]
    caller.send_signal(signal.SIGINT)
    try:
        caller.wait(timeout=120)
    finally:
        if caller.poll() is None:
            caller.kill()
    reader.join(timeout=10)
    text = "".join(out)
    assert caller.returncode == 0, text[-3000:]
    assert "caught: training interrupted after step" in text and "holds it: True" in text
    assert "the model holds the newest checkpoint" in text
    step = int(mux.latest_checkpoint(folder).name.split("-")[1])
    assert 20 <= step < 5000
    assert "Traceback" not in text  # the workers' and the agent's reports of the interrupt are not relayed


# ------------------------------------------------------------------ what is checked before starting anything


def test_num_processes_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_processes"):
            mux.TrainConfig(num_processes=bad)


def test_more_processes_than_cpu_cores_is_refused(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_workers", _no_launch)
    cores = os.cpu_count()
    with pytest.raises(ValueError, match=rf"num_processes={cores + 1} asks for {cores + 1} CPU processes, but this "
                                         rf"machine has {cores} CPU core"):
        mux.train(_model(digits), digits.train, _cfg(tmp_path, num_processes=cores + 1), N)


def test_more_processes_than_gpus_is_refused(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_workers", _no_launch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"num_processes=2 asks for 2 GPUs .* but 1 is present.*cpu=True"):
        mux.train(_model(digits), digits.train, _cfg(tmp_path, cpu=False), N)


def test_several_processes_need_a_checkpoint_dir(digits):
    with pytest.raises(ValueError, match="num_processes=2.* needs a checkpoint_dir"):
        mux.train(_model(digits), digits.train, _cfg(None), N)


def test_inside_a_distributed_run_num_processes_must_match_it(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"num_processes=2.*one of 3 started by torchrun"):
        mux.train(_model(digits), digits.train, _cfg(tmp_path), N)


def test_an_accelerator_cannot_be_handed_to_worker_processes(digits, tmp_path):
    with pytest.raises(ValueError, match="leave accelerator=None"):
        mux.train(_model(digits), digits.train, _cfg(tmp_path), N, accelerator=object())


def test_what_cannot_be_pickled_is_named_before_starting_workers(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_workers", _no_launch)
    lock = threading.Lock()

    def loss(model, batch, n):
        with lock:
            return mux.classification_loss(model, batch, n)

    with pytest.raises(TypeError, match=r"cannot be pickled: TypeError: .*lock"):
        mux.train(_model(digits), digits.train, _cfg(tmp_path / "ckpt"), N, loss_fn=loss)
    assert not list((tmp_path / "ckpt" / launch.JOB_FOLDER).iterdir())  # no half-written job left


def test_resume_false_refuses_a_folder_with_checkpoints_before_starting_workers(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_workers", _no_launch)
    (tmp_path / "checkpoint-00000010").mkdir()
    (tmp_path / "checkpoint-00000010" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="resume=False"):
        mux.train(_model(digits), digits.train, _cfg(tmp_path, resume=False), N)
