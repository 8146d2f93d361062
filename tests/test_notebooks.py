"""Notebook-level tests: conventions, papermill runs on non-default parameters, bad parameters.

nbval (``make test`` passes ``--nbval-lax notebooks``) separately runs every notebook on its
defaults, where the notebooks' own ``assert`` cells check their claims; chapters 01 to 05 also
assert their targets for the default run there (``check_claims``, which the tiny runs turn off).
The tiny runs of chapters 01, 03, 04 and 05 on full-scale data paths (MNIST files, GLUE and
CoNLL files, image folders, a CLIP teacher, the MiniLM checkpoint, two processes), with resume,
are the smoke runs of their full-scale configurations: ``test_smoke_runs.py``.
"""
import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from mux.runner.course import clean_notebook, course_notebooks, main, run_course
from mux.params import declared_parameters
from mux.runner import execute_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = course_notebooks(ROOT / "notebooks")
DATAMUX = ROOT / "notebooks" / "01_datamux.ipynb"
TMUX = ROOT / "notebooks" / "02_tmux.ipynb"
PLMS = ROOT / "notebooks" / "03_mux_plms.ipynb"
VISION = ROOT / "notebooks" / "04_vision_mux.ipynb"
MIXVIT = ROOT / "notebooks" / "05_mixvit.ipynb"

# A few seconds of training: the code paths of a full-scale run, not its accuracy.
TINY = dict(n_values=[1, 3], multiplexers=["orthogonal", "binary_hadamard"], compare_n=3, seeds=[0, 1], width=8,
            steps=20, batch_size=48, throughput_trials=1, device="cpu", check_claims=False)


def run(notebook, tmp_path, **parameters):
    """Execute through the course's path (a lost kernel reply retries once; pytest-timeout bounds the rest)."""
    out = tmp_path / f"executed_{notebook.name}"
    execute_notebook(notebook, out, parameters, cwd=str(notebook.parent))
    return nbformat.read(str(out), as_version=4)


def test_there_are_course_notebooks():
    assert [p.name for p in NOTEBOOKS][:6] == ["00_start_here.ipynb", "01_datamux.ipynb", "02_tmux.ipynb",
                                               "03_mux_plms.ipynb", "04_vision_mux.ipynb", "05_mixvit.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_anatomy(path):
    nb = nbformat.read(str(path), as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    after = nb.cells[tagged[0] + 1]
    assert after.cell_type == "code" and "check_parameters(globals())" in after.source, "validation cell follows"
    assert "write_metrics(out_dir" in nb.cells[-1].source, "last cell writes the headline metrics"
    assert "You will" in nb.cells[0].source
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and i != tagged[0]:  # the parameters cell is a list of knobs, not code to read
            assert len(cell.source.splitlines()) <= 40, cell.source[:80]
            assert not any(o.get("output_type") == "error" for o in cell.outputs), "stored error output"
    params = declared_parameters(path)
    assert "out_dir" in params and all(p["help"] for p in params.values()), "every parameter has a # help comment"


@pytest.mark.notebook
@pytest.mark.parametrize("bad, message", [
    (dict(n_valuse=[1, 2]), "unknown parameter 'n_valuse' (did you mean 'n_values'?)"),
    (dict(steps="many"), "parameter 'steps' should be int >= 1, got 'many' (str)"),
    (dict(n_values=[0, 2]), "at n_values[0]: Input should be greater than or equal to 1"),
    (dict(dataset="imagenet21k"), "parameter 'dataset' should be Literal['digits', 'mnist'"),
    (dict(multiplexers=["fourier"]), "at multiplexers[0]: Input should be 'orthogonal' or"),
])
def test_bad_parameters_stop_the_notebook_with_a_clear_message(tmp_path, bad, message):
    with pytest.raises(pm.PapermillExecutionError) as err:
        run(DATAMUX, tmp_path, out_dir=str(tmp_path), **bad)
    assert message in str(err.value)


@pytest.mark.notebook
def test_missing_data_folder_names_the_offline_alternative(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as err:
        run(DATAMUX, tmp_path, out_dir=str(tmp_path), dataset="imagefolder", data_dir=str(tmp_path / "no_such"))
    assert "DatasetUnavailableError" in str(err.value) and "lacks train/, val/" in str(err.value)


@pytest.mark.notebook
def test_course_runner_executes_and_summarises(tmp_path, capsys):
    timings = run_course(ROOT / "notebooks", tmp_path, {"seed": 1}, only=["00"])
    assert list(timings) == ["00_start_here"]
    assert (tmp_path / "executed" / "00_start_here.ipynb").is_file()
    main(["summary", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "00_start_here" in table and "digits_examples" in table and "1797" in table


def test_clean_notebook_drops_progress_bars_and_timings():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.metadata["papermill"] = {"duration": 1.0}
    nb.cells[0].metadata["papermill"] = {"duration": 1.0}
    bar = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "a"}, "text/plain": "100%|##| 5/5 [00:01<00:00, 4.2it/s]"})
    text = nbformat.v4.new_output("stream", name="stdout", text="kept\n")
    nb.cells[0].outputs = [bar, text]
    clean_notebook(nb)
    assert "papermill" not in nb.metadata and "papermill" not in nb.cells[0].metadata
    assert nb.cells[0].outputs == [text]


# A few seconds of training for chapter 02: every code path (warm-up, fine-tuning, no warm-up,
# throughput, checkpoints and resume), not its accuracy.
TMUX_TINY = dict(vocab_size=120, max_length=16, hidden_size=16, num_layers=1, num_heads=2, warmup_n=[2, 3],
                 warmup_steps=4, tasks=["negation", "casing"], finetune_n=[1, 3], finetune_steps=3, no_warmup_n=2,
                 batch_size=12, finetune_batch_size=12, throughput_n=[2, 3], throughput_length=16,
                 throughput_hidden_size=16, throughput_layers=1, throughput_heads=2, throughput_sequences=1,
                 throughput_trials=1, device="cpu", check_claims=False)


@pytest.mark.notebook
def test_tmux_runs_on_other_parameters_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    params = dict(TMUX_TINY, out_dir=str(tmp_path / "m1"), checkpoint_dir=str(ckpt))
    run(TMUX, tmp_path, **params)
    first = json.loads((tmp_path / "m1" / "02_tmux.json").read_text())
    assert set(first["headline"]) == {
        "retrieval_acc_n2", "retrieval_acc_n3", "negation_acc_n1", "negation_acc_n3", "negation_acc_vanilla",
        "negation_acc_no_warmup_n2", "casing_acc_n1", "casing_acc_n3", "casing_acc_vanilla",
        "casing_acc_no_warmup_n2", "throughput_ratio_n2", "throughput_ratio_n3", "negation_acc_logreg",
        "casing_acc_first_word_rule", "tmux_gap_n1", "tmux_gap_n1_ci95", "tmux_gap_n3", "tmux_gap_n3_ci95",
        "tmux_no_warmup_gap_n2", "tmux_no_warmup_gap_n2_ci95", "tmux_casing_gap_n1", "tmux_casing_gap_n1_ci95",
        "tmux_casing_gap_n3", "tmux_casing_gap_n3_ci95", "tmux_casing_no_warmup_gap_n2",
        "tmux_casing_no_warmup_gap_n2_ci95"}
    assert first["vocabulary"] == 120 and first["parameters"]["warmup_n"] == [2, 3]
    assert all(0 <= v <= 1 for k, v in first["headline"].items() if "acc" in k)
    assert (ckpt / "warmup_n3_d16_seed0" / "checkpoint-00000004").is_dir()
    # the same command again resumes every model from its final checkpoint: same results
    run(TMUX, tmp_path, **dict(params, out_dir=str(tmp_path / "m2")))
    second = json.loads((tmp_path / "m2" / "02_tmux.json").read_text())
    accuracy = [k for k in first["headline"] if "throughput" not in k]
    assert {k: second["headline"][k] for k in accuracy} == {k: first["headline"][k] for k in accuracy}


@pytest.mark.notebook
@pytest.mark.parametrize("bad, message", [
    (dict(warmup_n=[0, 2]), "at warmup_n[0]: Input should be greater than or equal to 1"),
    (dict(tasks=["sentiment"]), "at tasks[0]: Input should be 'negation' or"),
    (dict(multiplexer="fourier"), "parameter 'multiplexer' should be Literal['orthogonal'"),
    (dict(hidden_size="big"), "parameter 'hidden_size' should be int >= 1, got 'big' (str)"),
    (dict(retrieval_weight=1.5), "Input should be less than or equal to 1"),
])
def test_tmux_bad_parameters_stop_with_a_clear_message(tmp_path, bad, message):
    with pytest.raises(pm.PapermillExecutionError) as err:
        run(TMUX, tmp_path, **dict(TMUX_TINY, out_dir=str(tmp_path), **bad))
    assert message in str(err.value)


# Chapter 03 at a tiny size, for the bad parameters below.
PLMS_TINY = dict(vocab_size=120, max_length=16, hidden_size=16, num_layers=1, num_heads=2, mux_n=[2, 3], compare_n=2,
                 prime_steps=3, pretrain_steps=3, finetune_steps=2, batch_size=12, throughput_n=[1, 2],
                 throughput_length=16, throughput_hidden_size=16, throughput_layers=1, throughput_heads=2,
                 throughput_sequences=1, throughput_trials=1, device="cpu", check_claims=False)


@pytest.mark.notebook
@pytest.mark.parametrize("bad, message", [
    (dict(tasks=["sentiment"]), "unknown task 'sentiment'"),
    (dict(tasks=["glue:squad"]), "unknown task 'glue:squad'"),
    (dict(tasks=["conll"]), "task 'conll' needs ner_data_dir"),
    (dict(compare_n=1), "parameter 'compare_n' should be int >= 2, got 1 (int); "
                        "Input should be greater than or equal to 2"),
    (dict(mux_n=[0]), "at mux_n[0]: Input should be greater than or equal to 1"),
    (dict(pretrained_dir="/nonexistent/stages"), "pretrained_dir '/nonexistent/stages' is not a folder"),
])
def test_mux_plms_bad_parameters_stop_with_a_clear_message(tmp_path, bad, message):
    with pytest.raises(pm.PapermillExecutionError) as err:
        run(PLMS, tmp_path, **dict(PLMS_TINY, out_dir=str(tmp_path), **bad))
    assert message in str(err.value)


# Chapter 04 at a tiny size, for the bad parameters below.
VISION_TINY = dict(dataset="imagefolder", image_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2, mux_n=[2, 4],
                   compare_n=2, concat_point=1, concat_points=[0, 2], num_codes=8, codebook_images=20, steps=3,
                   batch_size=8, seeds=[0, 1], throughput_trials=1, device="cpu", check_claims=False)


@pytest.mark.notebook
@pytest.mark.parametrize("bad, message", [
    (dict(concat_points=[0, 5]), "concat point 5 is outside the model: k must lie in 0 .. depth - 1 = 2"),
    (dict(mux_n=[3]), "16 tokens per image are not a multiple of N=3"),
    (dict(patch_size=3), "digits images are 8 pixels wide, not a multiple of patch_size 3"),
    (dict(seeds=[]), "parameter 'seeds' should be a non-empty list[int], got []"),
    (dict(seeds=[0.5, 1]), "at seeds[0]: Input should be a valid integer"),
    (dict(seeds=[1, 1]), "seeds [1, 1] repeat a seed"),
    (dict(test_images=5000), "test_images=5000: there are 1617 images to test on (1797 digits less 180 validation "
                             "images)"),
    (dict(val_images=5), "val_images: a split of 5 images would empty a class (there are 10 classes in 1797 digits)"),
    (dict(test_images=1610), "training: a split of 7 images would empty a class (there are 10 classes in 1797 digits)"),
])
def test_vision_bad_parameters_stop_with_a_clear_message(tmp_path, bad, message):
    params = dict(VISION_TINY, dataset="digits", patch_size=2, out_dir=str(tmp_path))
    with pytest.raises(pm.PapermillExecutionError) as err:
        run(VISION, tmp_path, **dict(params, **bad))
    assert message in str(err.value)


# Chapter 05 at a tiny size, for the bad parameters below.
MIXVIT_TINY = dict(dataset="imagefolder", image_size=16, patch_size=4, backbone="convit", embed_dim=16, depth=2,
                   class_depth=1, num_heads=2, subnetworks=3, steps=3, batch_size=8, seeds=[0, 1], speed_trials=1,
                   train_images=0, cnn_width=8, ablate=2, curve_points=2, device="cpu", check_claims=False)


@pytest.mark.notebook
@pytest.mark.parametrize("bad, message", [
    (dict(subnetworks=1), "parameter 'subnetworks' should be int >= 2, got 1 (int); Input should be greater than or equal to 2"),
    (dict(alpha=0.0), "parameter 'alpha' should be float > 0, got 0.0 (float); Input should be greater than 0"),
    (dict(patch_size=3), "digits images are 8 pixels wide, not a multiple of patch_size 3"),
    (dict(timm_name="vit_small_patch16_224"), "which this timm model has not"),
    (dict(seeds=[]), "parameter 'seeds' should be a non-empty list[int], got []"),
    (dict(seeds=[0.5, 1]), "parameter 'seeds' should be list[int], got [0.5, 1] (list); at seeds[0]: Input should be a valid integer"),
    (dict(seeds=[1, 1]), "seeds [1, 1] repeat a seed"),
    (dict(train_images=400, test_images=5000), "test_images=5000 is more than the 1197 test images there are: 1797 digits "
                                               "less 400 training and 200 validation images"),
    (dict(train_images=400, val_images=5), "val_images: a split of 5 images would empty a class (there are 10)"),
    (dict(train_images=1500, val_images=290), "test_images: a split of 7 images would empty a class (there are 10)"),
    (dict(ablate=8), "ablate=8 features to remove: a head reads only embed_dim=16 (ViT) and cnn_width=8 (CNN) features"),
])
def test_mixvit_bad_parameters_stop_with_a_clear_message(tmp_path, bad, message):
    params = dict(MIXVIT_TINY, dataset="digits", patch_size=2, out_dir=str(tmp_path))
    with pytest.raises(pm.PapermillExecutionError) as err:
        run(MIXVIT, tmp_path, **dict(params, **bad))
    assert message in str(err.value)
