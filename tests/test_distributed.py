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


def torchrun(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "scripts" / "train_datamux.py"), "--cpu", "--n-mux", "3", "--steps", "24", "--batch-size", "30",
           "--width", "32", "--checkpoint-every", "10", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_exactly(tmp_path):
    full = torchrun(tmp_path / "a")
    assert full["processes"] == 2 and full["steps"] == 24 and full["test"]["n_examples"] == 360
    ckpts = sorted((tmp_path / "a" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["checkpoint-00000020", "checkpoint-00000024"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpts[0].iterdir()}
    # interrupted after step 20: drop the final checkpoint and run the same command again
    shutil.rmtree(ckpts[-1])
    resumed = torchrun(tmp_path / "a")
    assert resumed["resumed_from"] == 20 and resumed["steps"] == 24
    assert resumed["test"] == full["test"]
