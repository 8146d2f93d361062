"""The training loop under several processes: two CPU processes with torchrun (gloo backend).

The same code path as several GPUs under ``accelerate launch`` or ``torchrun``: sharded
batches, gradient all-reduce, per-process RNG states in checkpoints, resume.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(out, script, *extra):
    # 2 processes x 30 instances per step; digits' 1257 training images make 21 steps an epoch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), "--cpu", "--n-mux", "3", "--steps", "30", "--batch-size", "30",
           "--width", "32", "--checkpoint-every", "10", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_exactly(tmp_path):
    # process 1 is slowed down while it writes each checkpoint: the folder must not be
    # renamed (made "complete") before it has finished
    full = torchrun(tmp_path / "a", ROOT / "tests" / "delayed_save_worker.py")
    assert full["processes"] == 2 and full["steps"] == 30 and full["test"]["n_examples"] == 360
    ckpts = sorted((tmp_path / "a" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["checkpoint-00000020", "checkpoint-00000030"]
    for ckpt in ckpts:
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    # interrupted after step 20: drop the final checkpoint and run the same command again; the
    # resumed run crosses the epoch boundary at step 21
    shutil.rmtree(ckpts[-1])
    resumed = torchrun(tmp_path / "a", ROOT / "scripts" / "train_datamux.py")
    assert resumed["resumed_from"] == 20 and resumed["steps"] == 30
    assert resumed["test"] == full["test"]

    # the two-process checkpoint loads into a model in this (single) process, with the same results
    import mux
    from data_utils import load_digits_splits

    data = load_digits_splits()
    model = mux.load_weights(mux.DataMUXClassifier.for_data(data, 3, width=32), tmp_path / "a" / "checkpoints")
    assert mux.evaluate(model, data.test, 3) == full["test"]


@pytest.mark.slow
def test_a_two_process_checkpoint_is_not_resumed_by_one_process(tmp_path):
    torchrun(tmp_path / "b", ROOT / "scripts" / "train_datamux.py", "--steps", "10")
    cmd = [sys.executable, str(ROOT / "scripts" / "train_datamux.py"), "--cpu", "--n-mux", "3", "--steps", "10",
           "--batch-size", "30", "--width", "32", "--checkpoint-every", "10", "--out", str(tmp_path / "b")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "num_processes: 2 there, 1 here" in done.stderr
