"""GLUE and CoNLL-2003 loaders and metrics (data_utils.glue), on small local fixture files, offline."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from data_utils.glue import (
    CONLL_LABELS,
    GLUE_TASKS,
    GlueTask,
    NerDataset,
    glue_metrics,
    load_conll_ner,
    load_glue_task,
    ner_f1,
)
from data_utils.images import DatasetUnavailableError
from data_utils.text import IGNORE_INDEX, train_wordpiece_tokenizer

CORPUS = ["The cat sat on the mat.", "A dog barked at the mailman.", "Peter Blackburn went to Brussels.",
          "EU rejects German call to boycott British lamb.", "It is not raining today.",
          "Is the sky blue?", "The sky is blue.", "Two men play chess."]


@pytest.fixture(scope="module")
def tok():
    # A tiny vocabulary, so that longer words are cut into several sub-tokens.
    return train_wordpiece_tokenizer(CORPUS * 3, vocab_size=80)


def write_rows(path, columns, rows):
    """Write ``rows`` (tuples in ``columns`` order) as a tsv, csv, json-lines or parquet file."""
    ext = path.suffix[1:]
    if ext == "tsv":  # literal, as GLUE's own TSVs: no quoting
        lines = ["\t".join(columns)] + ["\t".join(str(v) for v in r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif ext == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([columns, *rows])
    elif ext in ("json", "jsonl"):
        path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r[k] for r in rows] for k, c in enumerate(columns)}), path)
    return path


COLA_DEV = [("The cat sat.", 1, 0), ("Sat cat the.", 0, 1), ('He said "hi" to me.', 1, 2), ("NA", 1, 3),
            ("42", 0, 4), ("Dogs bark.", 1, 5), ("Bark dogs loud the.", 1, 6)]  # 7 rows, 5 of label 1


@pytest.fixture
def cola_dir(tmp_path):
    d = tmp_path / "cola"
    d.mkdir()
    write_rows(d / "train.tsv", ["sentence", "label", "idx"],
               [(f"Sentence number {i} is here.", i % 2, i) for i in range(10)])
    write_rows(d / "validation.tsv", ["sentence", "label", "idx"], COLA_DEV)
    return d


def load(name, tok, d, **kw):
    return load_glue_task(name, tok, data_dir=d, cache_dir=d.parent / "hf-cache", **kw)


# --- the task table ----------------------------------------------------------------------------

def test_table_of_the_nine_tasks():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert GLUE_TASKS["mnli"].text_columns == ("premise", "hypothesis")
    assert GLUE_TASKS["qnli"].text_columns == ("question", "sentence")
    assert GLUE_TASKS["sst2"].text_columns == ("sentence",)
    assert list(GLUE_TASKS["mnli"].eval_splits) == ["validation_matched", "validation_mismatched"]
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].task_type == "regression"
    assert GLUE_TASKS["mnli"].num_labels == 3
    for spec in GLUE_TASKS.values():
        assert spec.main_metric in spec.metrics


# --- loading from files ------------------------------------------------------------------------

def test_cola_single_sentence_tsv(tok, cola_dir):
    task = load("cola", tok, cola_dir)
    assert isinstance(task, GlueTask) and task.task_type == "sentence" and task.num_labels == 2
    assert task.sizes() == {"train": 10, "val": 7, "test": 7}  # every dev row kept
    assert task.val is task.test is task.eval_splits["validation"]
    assert task.eval_names == {"validation": "cola"}
    assert task.val.texts == [r[0] for r in COLA_DEV]  # "NA" and "42" stay text; the quotes stay
    assert task.val.labels == [r[1] for r in COLA_DEV]
    assert all(set(item["token_type_ids"]) == {0} for item in task.val)  # one sentence
    assert task.majority_baseline == pytest.approx(5 / 7)
    assert task.main_metric == "matthews_correlation"
    batch = task.collate_fn([task.val[i] for i in range(3)])
    assert batch["labels"].dtype == torch.int64 and batch["input_ids"].shape[0] == 3


def test_max_train_examples(tok, cola_dir):
    task = load("cola", tok, cola_dir, max_train_examples=3)
    assert len(task.train) == 3 and task.train.labels == [0, 1, 0]
    assert len(task.val) == 7  # the dev split is never cut
    with pytest.raises(ValueError, match="max_train_examples"):
        load("cola", tok, cola_dir, max_train_examples=0)


def test_stsb_regression_csv(tok, tmp_path):
    d = tmp_path / "stsb"
    d.mkdir()
    cols = ["sentence1", "sentence2", "label"]
    write_rows(d / "train.csv", cols, [("A cat sat.", "A cat sat down.", 4.5), ("A dog.", "Chess.", 0)])
    dev = [("A man plays.", "A man is playing.", 5), ("The sky.", "A dog, barking.", 0.25),
           ("It rains.", "It is raining.", 4.0), ("Cats.", "Dogs.", 1.5), ("Hi.", "Hello.", 3)]
    write_rows(d / "validation.csv", cols, dev)
    task = load("stsb", tok, d)
    assert task.task_type == "regression" and task.num_labels == 1 and task.label_names == ["similarity"]
    assert task.val.labels == [5.0, 0.25, 4.0, 1.5, 3.0]
    assert all(type(y) is float for y in task.val.labels + task.train.labels)
    assert task.val.texts[1] == ("The sky.", "A dog, barking.")  # csv quoting of the comma
    assert math.isnan(task.majority_baseline)
    batch = task.collate_fn([task.val[i] for i in range(len(task.val))])
    assert batch["labels"].dtype == torch.float32  # integer-looking scores stay floats
    assert batch["labels"].tolist() == [5.0, 0.25, 4.0, 1.5, 3.0]
    assert (batch["token_type_ids"] == 1).any()  # a pair


def test_mrpc_pairs_json_lines(tok, tmp_path):
    d = tmp_path / "mrpc"
    d.mkdir()
    cols = ["sentence1", "sentence2", "label", "idx"]
    write_rows(d / "train.jsonl", cols, [("A cat sat.", "The cat sat.", 1, 0), ("A dog.", "Chess.", 0, 1)])
    write_rows(d / "validation.json", cols, [("It rains.", "It is raining.", 1, 0), ("Cats.", "Dogs.", 0, 1),
                                             ("Hi.", "Hello.", 1, 2)])
    task = load("mrpc", tok, d)
    assert len(task.val) == 3 and task.val.labels == [1, 0, 1]
    for item, (a, b) in zip(task.val, task.val.texts):
        n_a = len(tok(a)["input_ids"])  # [CLS] a [SEP]
        assert item["token_type_ids"] == [0] * n_a + [1] * (len(item["input_ids"]) - n_a)
    assert task.majority_baseline == pytest.approx(2 / 3)
    assert task.metric_names == ("f1", "accuracy") and task.main_metric == "f1"


def test_mnli_two_dev_splits_mixed_formats(tok, tmp_path):
    d = tmp_path / "mnli"
    d.mkdir()
    cols = ["premise", "hypothesis", "label"]
    write_rows(d / "train.parquet", cols, [("A cat sat.", "A cat is sitting.", 0), ("A dog.", "No dog.", 2),
                                           ("Chess.", "Two men.", 1)])
    write_rows(d / "validation_matched.parquet", cols, [("It rains.", "It is wet.", 0), ("Cats.", "Dogs.", 2),
                                                        ("Hi.", "Hello.", 0), ("Sky.", "Blue.", 1)])
    write_rows(d / "validation_mismatched.tsv", cols, [("The sky is blue.", "Is the sky blue?", "neutral"),
                                                       ("Two men.", "Chess.", "contradiction")])  # label names
    task = load("mnli", tok, d)
    assert task.num_labels == 3 and task.label_names == ["entailment", "neutral", "contradiction"]
    assert task.eval_sizes() == {"validation_matched": 4, "validation_mismatched": 2}
    assert task.val is task.eval_splits["validation_matched"]
    assert task.eval_splits["validation_mismatched"].labels == [1, 2]
    assert task.eval_names == {"validation_matched": "mnli_m", "validation_mismatched": "mnli_mm"}
    assert task.majority_baselines == {"validation_matched": pytest.approx(2 / 4),
                                       "validation_mismatched": pytest.approx(1 / 2)}
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])
    assert task.compute_metrics(logits, task.val.labels) == {"accuracy": 0.75}  # 3 of 4 right


def test_qnli_csv_pair(tok, tmp_path):
    d = tmp_path / "qnli"
    d.mkdir()
    cols = ["question", "sentence", "label", "idx"]
    write_rows(d / "train.csv", cols, [("Is the sky blue?", "The sky is blue.", 0, 0)])
    write_rows(d / "validation.csv", cols, [("Is it raining?", "It is not raining today.", 1, 0),
                                            ("Who sat?", "The cat sat on the mat.", 0, 1)])
    task = load("qnli", tok, d)
    assert task.val.texts == [("Is it raining?", "It is not raining today."), ("Who sat?", "The cat sat on the mat.")]
    assert task.val.labels == [1, 0] and all(1 in item["token_type_ids"] for item in task.val)


def test_hub_path_is_used_when_no_data_dir(tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs.get("cache_dir")))
        rows = {"sentence": ["A cat sat.", "Sat cat."], "label": [1, 0], "idx": [0, 1]}
        test = {"sentence": ["Hidden."], "label": [-1], "idx": [0]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                     "validation": datasets.Dataset.from_dict(rows),
                                     "test": datasets.Dataset.from_dict(test)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_glue_task("sst2", tok, cache_dir="/somewhere")
    assert calls == [("nyu-mll/glue", "sst2", "/somewhere")]
    assert task.sizes() == {"train": 2, "val": 2, "test": 2}  # the hidden test split is not used


# --- bad input -------------------------------------------------------------------------------

def test_unknown_task(tok, cola_dir):
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'.*'cola'.*'wnli'"):
        load("sst-2", tok, cola_dir)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("imdb", [1], [1])


def test_missing_columns_are_named(tok, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    write_rows(d / "train.csv", ["text", "label"], [("A cat.", 1)])
    write_rows(d / "validation.csv", ["text", "label"], [("A cat.", 1)])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['sentence'\]; it has \['text', 'label'\]"):
        load("cola", tok, d)


def test_label_outside_the_set(tok, cola_dir, tmp_path):
    write_rows(cola_dir / "validation.tsv", ["sentence", "label"], [("A.", 0), ("B.", 1), ("C.", 1), ("D.", 2)])
    with pytest.raises(ValueError, match=r"label 2 in row 3 .*split 'validation'.*\['unacceptable', 'acceptable'\]"):
        load("cola", tok, cola_dir)
    d = tmp_path / "stsb"
    d.mkdir()
    cols = ["sentence1", "sentence2", "label"]
    write_rows(d / "train.csv", cols, [("A.", "B.", 5.5)])
    write_rows(d / "validation.csv", cols, [("A.", "B.", 1.0)])
    with pytest.raises(ValueError, match=r"label 5.5 in row 0 .*split 'train'.*a number in \[0, 5\]"):
        load("stsb", tok, d)
    write_rows(d / "train.csv", cols, [("A.", "B.", 1.0), ("A.", "B.", "abc")])
    with pytest.raises(ValueError, match=r"label 'abc' in row 1 .*\[0, 5\]"):
        load("stsb", tok, d)


def test_missing_files(tok, tmp_path):
    d = tmp_path / "only_train"
    d.mkdir()
    write_rows(d / "train.tsv", ["sentence", "label"], [("A cat.", 1)])
    with pytest.raises(FileNotFoundError, match=r"split 'validation'.*only_train/validation\.\*.*validation\.csv"):
        load("cola", tok, d)
    with pytest.raises(FileNotFoundError, match="validation_mismatched"):
        load("mnli", tok, d)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load("cola", tok, tmp_path / "nowhere")


def test_missing_file_message_states_both_layouts(tok, tmp_path):
    """The instructions name exactly the files the loader looks for, and their columns."""
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load("mrpc", tok, d)
    message = str(info.value)
    assert "train.tsv, dev.tsv as GLUE's download gives them" in message
    assert "validation.{csv|tsv|json|jsonl|parquet}" in message
    assert "['sentence1', 'sentence2', 'label'] (the Hub's)" in message
    assert "tried" in message and "dev.tsv" in message.split("tried")[1]
    with pytest.raises(FileNotFoundError, match=r"dev_matched\.tsv, dev_mismatched\.tsv"):
        load("mnli", tok, d)


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_glue_own_tsv_files_are_read(tok, tmp_path):
    """GLUE's download (train.tsv, dev.tsv) in its own columns, as its reference readers take them."""
    cola = tmp_path / "CoLA"
    cola.mkdir()  # no header: source, label, original mark, sentence
    _write_lines(cola / "train.tsv", ["gj04\t1\t\tThe cat sat on the mat.", "gj04\t0\t*\tCat the mat sat on."])
    _write_lines(cola / "dev.tsv", ["gj04\t0\t*\tSat mat the.", "gj04\t1\t\tThe dog barked."])
    task = load("cola", tok, cola)
    assert task.train.texts == ["The cat sat on the mat.", "Cat the mat sat on."] and task.train.labels == [1, 0]
    assert task.val.texts == ["Sat mat the.", "The dog barked."] and task.val.labels == [0, 1]

    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()  # the label first ("Quality"), the sentences in columns 4 and 5
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    _write_lines(mrpc / "train.tsv", [header, "1\t1\t2\tThe cat sat.\tA cat sat.",
                                      "0\t3\t4\tIt rains.\tThe sky is blue."])
    _write_lines(mrpc / "dev.tsv", [header, "0\t5\t6\tA dog.\tTwo men play chess."])
    task = load("mrpc", tok, mrpc)
    assert task.train.texts == [("The cat sat.", "A cat sat."), ("It rains.", "The sky is blue.")]
    assert task.train.labels == [1, 0] and task.val.labels == [0]

    mnli = tmp_path / "MNLI"
    mnli.mkdir()  # premise and hypothesis in columns 9 and 10, gold_label last
    cols = ["index", "promptID", "pairID", "genre", "s1_binary", "s2_binary", "s1_parse", "s2_parse",
            "sentence1", "sentence2", "label1", "gold_label"]
    row = lambda p, h, y: "\t".join(["0", "1", "2", "fiction", "(", "(", "(", "(", p, h, y, y])  # noqa: E731
    _write_lines(mnli / "train.tsv", ["\t".join(cols), row("The cat sat.", "A cat sat.", "entailment")])
    _write_lines(mnli / "dev_matched.tsv", ["\t".join(cols), row("It rains.", "It is dry.", "contradiction")])
    _write_lines(mnli / "dev_mismatched.tsv", ["\t".join(cols), row("A dog.", "An animal.", "neutral")])
    task = load("mnli", tok, mnli)
    assert task.train.texts == [("The cat sat.", "A cat sat.")] and task.train.labels == [0]
    assert task.eval_splits["validation_matched"].labels == [2]
    assert task.eval_splits["validation_mismatched"].labels == [1]

    _write_lines(mrpc / "dev.tsv", [header, "0\t5\tA dog."])  # a short row: named, with what was expected
    with pytest.raises(ValueError, match=r"dev\.tsv' line 2 has 3 tab-separated field\(s\).*Hub's columns.*"
                                         r"GLUE's own mrpc files.*column\(s\) \[4, 5\].*label in column 1"):
        load("mrpc", tok, mrpc)
    write_rows(mrpc / "validation.csv", ["sentence1", "sentence2", "label"], [("A.", "B.", 1)])
    with pytest.raises(ValueError, match=r"several files for split 'validation'.*validation\.csv.*dev\.tsv"):
        load("mrpc", tok, mrpc)


def test_hub_unreachable_gives_a_clear_error(tok, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError, match=r"'nyu-mll/glue'.*unreachable.*data_dir") as info:
        load_glue_task("rte", tok)
    assert isinstance(info.value.__cause__, ConnectionError)


# --- metrics, against hand-computed values -----------------------------------------------------

def test_matthews_correlation_by_hand():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 1, 0, 0, 0, 1, 1, 0]
    tp, fn, tn, fp = 3, 1, 3, 1  # positions 0,1,6 / 2 / 3,4,7 / 5
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 8 / 16
    assert mcc == 0.5
    out = glue_metrics("cola", p, y)
    assert out == {"matthews_correlation": pytest.approx(mcc)} and type(out["matthews_correlation"]) is float
    logits = torch.tensor([[0.0, 1.0] if v else [1.0, 0.0] for v in p], dtype=torch.bfloat16)
    assert glue_metrics("cola", logits, torch.tensor(y))["matthews_correlation"] == pytest.approx(mcc)
    assert glue_metrics("cola", [1] * 8, y) == {"matthews_correlation": 0.0}  # constant predictions


def test_f1_and_accuracy_by_hand():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 1, 0, 0, 1, 1, 1, 0]
    tp, fn, fp, tn = 3, 1, 2, 2  # positions 0,1,6 / 2 / 4,5 / 3,7
    precision, recall = tp / (tp + fp), tp / (tp + fn)  # 3/5, 3/4
    f1 = 2 * precision * recall / (precision + recall)  # = 2 tp / (2 tp + fp + fn) = 6/9
    assert f1 == pytest.approx(2 / 3)
    for name in ("mrpc", "qqp"):
        out = glue_metrics(name, np.array(p), np.array(y))
        assert out == {"f1": pytest.approx(f1), "accuracy": (tp + tn) / 8}
    assert glue_metrics("qqp", [0] * 8, y)["f1"] == 0.0  # nothing predicted positive
    for name in ("sst2", "qnli", "rte", "wnli"):
        assert glue_metrics(name, p, y) == {"accuracy": 5 / 8}
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 0]) == {"accuracy": 0.75}


def test_pearson_and_spearman_by_hand():
    labels = [1.0, 2.0, 3.0, 4.0, 5.0]
    preds = [0.5, 0.2, 2.0, 1.0, 4.0]
    # Pearson: means 3 and 7.7/5 = 1.54; deviations
    dl = [-2, -1, 0, 1, 2]
    dp = [-1.04, -1.34, 0.46, -0.54, 2.46]
    cov = 2.08 + 1.34 + 0 - 0.54 + 4.92  # sum dl*dp = 7.8
    ss_p = 1.0816 + 1.7956 + 0.2116 + 0.2916 + 6.0516  # sum dp^2 = 9.432
    pearson = cov / math.sqrt(sum(d * d for d in dl) * ss_p)  # 7.8 / sqrt(10 * 9.432)
    assert cov == pytest.approx(sum(a * b for a, b in zip(dl, dp)))
    # Spearman: ranks of preds 2,1,4,3,5 against 1..5: d = -1,1,-1,1,0, sum d^2 = 4
    spearman = 1 - 6 * 4 / (5 * (5 ** 2 - 1))  # 0.8
    out = glue_metrics("stsb", preds, labels)
    assert out == {"pearson": pytest.approx(pearson), "spearman": pytest.approx(spearman)}
    assert all(type(v) is float for v in out.values())
    out2 = glue_metrics("stsb", torch.tensor(preds).unsqueeze(1), torch.tensor(labels))  # (M, 1) is squeezed
    assert out2 == {"pearson": pytest.approx(pearson), "spearman": pytest.approx(spearman)}
    assert math.isnan(glue_metrics("stsb", [2.0] * 5, labels)["pearson"])  # constant: undefined


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same length"):
        glue_metrics("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="3 columns"):
        glue_metrics("mnli", np.zeros((4, 2)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="hidden label"):
        glue_metrics("rte", [0, 1], [0, -1])
    with pytest.raises(ValueError, match="integer class ids"):
        glue_metrics("sst2", [0.3, 0.9], [0, 1])
    with pytest.raises(ValueError, match=r"regression.*\(M,\) or \(M, 1\)"):
        glue_metrics("stsb", np.zeros((3, 2)), [1.0, 2.0, 3.0])


# --- CoNLL-2003 NER ----------------------------------------------------------------------------

CONLL_TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


@pytest.fixture
def conll_dir(tmp_path):
    d = tmp_path / "conll"
    d.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (d / name).write_text(CONLL_TRAIN, encoding="utf-8")
    return d


def test_conll_reading_and_first_subtoken_labels(tok, conll_dir):
    task = load_conll_ner(conll_dir, tok)
    assert task.task_type == "token" and task.label_names == list(CONLL_LABELS) and task.num_labels == 9
    assert isinstance(task.test, NerDataset)
    assert task.train.texts == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                                ["BRUSSELS", "1996-08-22"]]  # -DOCSTART- lines skipped
    ids = {t: i for i, t in enumerate(CONLL_LABELS)}
    assert task.train.word_labels[1] == [ids["B-PER"], ids["I-PER"]]
    item = task.train[1]
    pieces = [tok.tokenize(w) for w in ["Peter", "Blackburn"]]
    assert len(pieces[1]) > 1  # "Blackburn" is cut into several sub-tokens
    expected = [IGNORE_INDEX]  # [CLS]
    for tag, p in zip(["B-PER", "I-PER"], pieces):
        expected += [ids[tag]] + [IGNORE_INDEX] * (len(p) - 1)
    expected += [IGNORE_INDEX]  # [SEP]
    assert item["labels"] == expected and len(item["input_ids"]) == len(expected)
    # 9 scored words in the test split (the same file), 4 of them "O": rejects, call, ".", 1996-08-22
    assert task.majority_baseline == pytest.approx(4 / 9)
    batch = task.collate_fn([task.train[i] for i in range(3)])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1, len(expected):] == IGNORE_INDEX).all()  # padding is not scored


def test_conll_bad_files(tok, conll_dir, tmp_path):
    (conll_dir / "valid.txt").write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP B-FOO\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"valid.txt' line 2: NER tag 'B-FOO'.*'I-MISC'"):
        load_conll_ner(conll_dir, tok)
    custom = load_conll_ner(conll_dir, tok, label_names=list(CONLL_LABELS) + ["B-FOO"])
    assert custom.num_labels == 10
    (conll_dir / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split 'val'.*valid\.txt.*dev\.txt"):
        load_conll_ner(conll_dir, tok)
    with pytest.raises(ValueError, match="exactly the splits"):
        load_conll_ner({"train": conll_dir / "train.txt"}, tok)


def _subtoken_rows(word_rows, n_cols=12, junk=CONLL_LABELS.index("B-LOC")):
    """(labels, predictions) at sub-token level: [CLS], then each word as its first piece and one
    more piece (-100, predicted as junk that must be ignored), then padding."""
    labels = np.full((len(word_rows), n_cols), IGNORE_INDEX)
    preds = np.full((len(word_rows), n_cols), junk)
    for i, (gold, guess) in enumerate(word_rows):
        for k, (g, p) in enumerate(zip(gold, guess)):
            labels[i, 1 + 2 * k], preds[i, 1 + 2 * k] = g, p
    return preds, labels


def test_ner_f1_by_hand():
    t = {n: i for i, n in enumerate(CONLL_LABELS)}
    # PER right, LOC missed, ORG wrong:
    gold1, pred1 = ["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-ORG"]
    gold2, pred2 = ["B-ORG", "O", "B-MISC"], ["B-ORG", "O", "O"]                       # ORG right, MISC missed
    rows = [([t[x] for x in g], [t[x] for x in p]) for g, p in ((gold1, pred1), (gold2, pred2))]
    preds, labels = _subtoken_rows(rows)
    # 3 predicted entities, 2 correct; 4 gold entities
    p, r = 2 / 3, 2 / 4
    f1 = 2 * p * r / (p + r)
    assert f1 == pytest.approx(4 / 7)
    out = ner_f1(preds, labels, CONLL_LABELS)
    assert out == {"precision": pytest.approx(p), "recall": pytest.approx(r), "f1": pytest.approx(f1)}
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 9).float()  # (M, L, C)
    assert ner_f1(logits, torch.tensor(labels), CONLL_LABELS) == out

    # Truncation: a third sentence "O B-PER I-PER" of which only the first word fit.
    gold3 = [t["O"], t["B-PER"], t["I-PER"]]
    preds3, labels3 = _subtoken_rows(rows + [(gold3[:1], gold3[:1])])
    word_labels = [r[0] for r in rows] + [gold3]
    assert ner_f1(preds3, labels3, CONLL_LABELS) == out  # without word_labels: the lost PER is unseen
    out3 = ner_f1(preds3, labels3, CONLL_LABELS, word_labels=word_labels)
    p3, r3 = 2 / 3, 2 / 5  # the truncated PER counts as a gold entity predicted "O"
    assert out3 == {"precision": pytest.approx(p3), "recall": pytest.approx(r3),
                    "f1": pytest.approx(2 * p3 * r3 / (p3 + r3))}
    assert out3["f1"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="dataset order"):
        ner_f1(preds3, labels3, CONLL_LABELS, word_labels=word_labels[::-1])


def test_ner_truncation_end_to_end(tok, conll_dir):
    task = load_conll_ner(conll_dir, tok, max_length=8)
    first = task.test[0]
    scored = [y for y in first["labels"] if y != IGNORE_INDEX]
    assert len(first["input_ids"]) == 8 and len(scored) < len(task.test.word_labels[0]) == 5
    batch = task.collate_fn([task.test[i] for i in range(len(task.test))])
    labels = batch["labels"]
    perfect = labels.clamp(min=0)  # right wherever scored
    assert ner_f1(perfect, labels, task.label_names)["recall"] == 1.0
    out = ner_f1(perfect, labels, task.label_names, word_labels=task.test.word_labels)
    assert out["precision"] == 1.0 and out["recall"] < 1.0  # the entities cut off are missed


def test_a_word_without_tokens_keeps_its_position(tok, conll_dir):
    # A zero-width space is removed by the BERT normaliser: the word would have no token at all.
    text = "EU NNP B-NP B-ORG\n\u200b NN I-NP O\nGerman JJ B-NP B-MISC\n"
    (conll_dir / "test.txt").write_text(text, encoding="utf-8")
    task = load_conll_ner(conll_dir, tok)
    scored = [y for y in task.test[0]["labels"] if y != IGNORE_INDEX]
    assert scored == task.test.word_labels[0] == [CONLL_LABELS.index(t) for t in ("B-ORG", "O", "B-MISC")]
