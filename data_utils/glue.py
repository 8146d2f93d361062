"""GLUE (the nine tasks) and CoNLL-2003 NER as :class:`~data_utils.text.TextTask` objects, with their metrics.

GLUE (Wang et al., 2018) is the benchmark the multiplexing papers (DataMUX, MUX-PLMs) report on.
:data:`GLUE_TASKS` describes its nine tasks as the Hugging Face dataset ``nyu-mll/glue`` stores
them: text columns, label names, evaluation splits, metrics.

* :func:`load_glue_task` builds one task, from the Hub (``data_dir=None``, needs the internet or a
  filled cache) or from local files (``data_dir``: GLUE's own ``train.tsv`` and ``dev.tsv``
  (MNLI: ``dev_matched.tsv``, ``dev_mismatched.tsv``) as its download gives them, or
  ``train.csv``, ``validation.csv``, ... in the Hub's columns). The items are dicts with ``labels``, padded by
  ``transformers.DataCollatorWithPadding``, exactly like the offline tasks of
  :func:`data_utils.text.load_text_task`.
* :func:`glue_metrics` computes a task's metrics (scikit-learn and scipy only: Matthews
  correlation, Pearson / Spearman, F1, accuracy) from class ids or logits.
* **Validation = test = GLUE dev.** GLUE's test labels are hidden (the Hub stores ``-1``; scores
  come from the GLUE server), so papers report the dev sets. A :class:`GlueTask` therefore has
  ``val`` and ``test`` both set to the (first) dev split, the same object: choose
  hyper-parameters on it knowing that the number you report comes from the same examples.
* :func:`load_conll_ner` reads CoNLL-2003-format files (the data are licensed: bring your own
  copy; nothing is downloaded) into a token task labelled on the first sub-token of each word,
  and :func:`ner_f1` scores it at entity level with ``seqeval``.
"""
from __future__ import annotations

import csv
import math
import numbers
import warnings
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .hub import check_hub_dataset
from .images import DatasetUnavailableError
from .text import IGNORE_INDEX, EncodedDataset, TextTask, encode_texts

__all__ = [
    "GLUE_HUB_PATH",
    "GLUE_TASKS",
    "GLUE_FILE_EXTENSIONS",
    "GLUE_DEV_FILES",
    "GLUE_TSV_LAYOUT",
    "CONLL_LABELS",
    "GlueSpec",
    "GlueTask",
    "NerDataset",
    "glue_metrics",
    "load_glue_task",
    "load_conll_ner",
    "ner_f1",
]

GLUE_HUB_PATH = "nyu-mll/glue"

# Local file formats, in the order a split's file is looked for.
GLUE_FILE_EXTENSIONS = ("csv", "tsv", "json", "jsonl", "parquet")

# GLUE's own distribution (the files of its download script) names the dev splits differently.
GLUE_DEV_FILES = {"validation": "dev.tsv", "validation_matched": "dev_matched.tsv",
                  "validation_mismatched": "dev_mismatched.tsv"}

# The columns of GLUE's own TSV files, which are not the Hub's: (header line?, 0-based columns of
# the text(s), column of the label; -1 the last), as GLUE's reference readers take them. CoLA's
# files have no header; MRPC's label is its first column ("Quality"); MNLI's is "gold_label".
GLUE_TSV_LAYOUT = {
    "cola": (False, (3,), 1),
    "sst2": (True, (0,), 1),
    "mrpc": (True, (3, 4), 0),
    "qqp": (True, (3, 4), 5),
    "stsb": (True, (7, 8), -1),
    "mnli": (True, (8, 9), -1),
    "qnli": (True, (1, 2), -1),
    "rte": (True, (1, 2), -1),
    "wnli": (True, (1, 2), -1),
}

STSB_RANGE = (0.0, 5.0)


# ---------------------------------------------------------------------------------------------
# The nine tasks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class GlueSpec:
    """What one GLUE task looks like in ``nyu-mll/glue`` and how it is scored.

    ``text_columns``: one column (single-sentence task) or two (sentence-pair task); the label
    column is always ``label``. ``label_names``: the class names in id order (``stsb``: a single
    name, ``"similarity"``: it is a regression on a 0-5 score). ``eval_splits``: dev split name ->
    the name results on it are reported under (``mnli``: ``validation_matched`` -> ``"mnli_m"``,
    ``validation_mismatched`` -> ``"mnli_mm"``). ``metrics``: the keys :func:`glue_metrics`
    returns; ``main_metric``: the one to quote when you quote one (see :data:`GLUE_TASKS`).
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    eval_splits: dict[str, str]
    metrics: tuple[str, ...]
    main_metric: str
    task_type: str  # "sentence" (classification) or "regression"

    @property
    def is_regression(self) -> bool:
        return self.task_type == "regression"

    @property
    def num_labels(self) -> int:
        """Outputs of the model head: 1 for ``stsb`` (regression), else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits :func:`load_glue_task` reads: ``train`` and the dev split(s)."""
        return ("train", *self.eval_splits)


def _spec(name, text_columns, label_names, metrics, main_metric, eval_splits=None, task_type="sentence"):
    return GlueSpec(name, tuple(text_columns), tuple(label_names), eval_splits or {"validation": name},
                    tuple(metrics), main_metric, task_type)


GLUE_TASKS: dict[str, GlueSpec] = {s.name: s for s in (
    _spec("cola", ["sentence"], ["unacceptable", "acceptable"], ["matthews_correlation"], "matthews_correlation"),
    _spec("sst2", ["sentence"], ["negative", "positive"], ["accuracy"], "accuracy"),
    _spec("mrpc", ["sentence1", "sentence2"], ["not_equivalent", "equivalent"], ["f1", "accuracy"], "f1"),
    _spec("qqp", ["question1", "question2"], ["not_duplicate", "duplicate"], ["f1", "accuracy"], "f1"),
    _spec("stsb", ["sentence1", "sentence2"], ["similarity"], ["pearson", "spearman"], "pearson",
          task_type="regression"),
    _spec("mnli", ["premise", "hypothesis"], ["entailment", "neutral", "contradiction"], ["accuracy"], "accuracy",
          eval_splits={"validation_matched": "mnli_m", "validation_mismatched": "mnli_mm"}),
    _spec("qnli", ["question", "sentence"], ["entailment", "not_entailment"], ["accuracy"], "accuracy"),
    _spec("rte", ["sentence1", "sentence2"], ["entailment", "not_entailment"], ["accuracy"], "accuracy"),
    _spec("wnli", ["sentence1", "sentence2"], ["not_entailment", "entailment"], ["accuracy"], "accuracy"),
)}
"""The nine GLUE tasks, in the benchmark's order, as :class:`GlueSpec` objects.

====  ====================  ==================================  =====================  ====================
task  text columns          labels (id order)                   dev split(s)           metrics (main first)
====  ====================  ==================================  =====================  ====================
cola  sentence              unacceptable, acceptable            validation             matthews_correlation
sst2  sentence              negative, positive                  validation             accuracy
mrpc  sentence1, sentence2  not_equivalent, equivalent          validation             f1, accuracy
qqp   question1, question2  not_duplicate, duplicate            validation             f1, accuracy
stsb  sentence1, sentence2  a float score in [0, 5] (regress.)  validation             pearson, spearman
mnli  premise, hypothesis   entailment, neutral, contradiction  validation_matched,    accuracy
                                                                validation_mismatched
qnli  question, sentence    entailment, not_entailment          validation             accuracy
rte   sentence1, sentence2  entailment, not_entailment          validation             accuracy
wnli  sentence1, sentence2  not_entailment, entailment          validation             accuracy
====  ====================  ==================================  =====================  ====================

Main metrics: the GLUE leaderboard shows two numbers for MRPC and QQP (F1 / accuracy) and for
STS-B (Pearson / Spearman) and averages the two in the GLUE score. ``main_metric`` picks one:
F1 for MRPC and QQP (the number BERT's paper quotes for them) and Pearson for STS-B (the first of
the pair on the leaderboard). F1 is that of class 1 (``equivalent`` / ``duplicate``).
"""


def _check_task_name(name) -> GlueSpec:
    if not isinstance(name, str) or name.lower() not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of {list(GLUE_TASKS)}")
    return GLUE_TASKS[name.lower()]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _as_numpy(x, what: str) -> np.ndarray:
    """A numpy array of a tensor (any device / dtype), an array or a (nested) list."""
    if hasattr(x, "detach"):  # a torch tensor: to the CPU, and out of bfloat16 which numpy lacks
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{what} must be numbers (a tensor, an array or a list), got an array of {arr.dtype}")
    return arr


def _class_ids(arr: np.ndarray, what: str, num_classes: int, name: str) -> np.ndarray:
    if arr.dtype == bool or (np.issubdtype(arr.dtype, np.floating)
                             and not np.all(np.isfinite(arr) & (arr == np.round(arr)))):
        raise ValueError(f"{what} for {name} must be integer class ids, got values such as "
                         f"{arr.ravel()[:3].tolist()} ({arr.dtype})")
    ids = arr.astype(np.int64)
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        hint = " (-1 marks a hidden label: GLUE's test split cannot be scored offline)" if ids[i] == -1 else ""
        raise ValueError(f"{what}[{i}] = {ids[i]} is not a class of {name}: expected 0..{num_classes - 1}{hint}")
    return ids


def glue_metrics(name: str, predictions, labels) -> dict[str, float]:
    """The GLUE metrics of task ``name`` (see :data:`GLUE_TASKS`), as plain Python floats.

    ``predictions``: class ids ``(M,)`` or logits ``(M, C)`` (the argmax over the last axis is
    taken; ``C`` must be the task's number of classes); for ``stsb``, scores ``(M,)`` or
    ``(M, 1)`` (the trailing axis is squeezed). ``labels``: ``(M,)`` class ids, or ``stsb``
    scores. Tensors (on any device), numpy arrays and lists are accepted.

    * ``cola``: ``{"matthews_correlation"}`` (``sklearn.metrics.matthews_corrcoef``; 0 when the
      predictions are constant).
    * ``stsb``: ``{"pearson", "spearman"}`` (``scipy.stats.pearsonr`` / ``spearmanr``; NaN when
      the predictions or the labels are constant, where a correlation is undefined).
    * ``mrpc``, ``qqp``: ``{"f1", "accuracy"}``; F1 of class 1 (``equivalent`` / ``duplicate``),
      0 when nothing is predicted positive.
    * the others: ``{"accuracy"}``. MNLI is evaluated twice, once on each dev split: call this
      once per split and name the results after ``GLUE_TASKS["mnli"].eval_splits``
      (``mnli_m``, ``mnli_mm``), e.g. ``{"mnli_m_accuracy": ..., "mnli_mm_accuracy": ...}``.

    Example::

        >>> glue_metrics("mrpc", [1, 1, 0, 1], [1, 0, 0, 1])
        {'f1': 0.8, 'accuracy': 0.75}
        >>> glue_metrics("cola", torch.tensor([[2.0, -1.0], [0.1, 0.3]]), [0, 1])
        {'matthews_correlation': 1.0}
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    spec = _check_task_name(name)
    pred, y = _as_numpy(predictions, "predictions"), _as_numpy(labels, "labels")
    if spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if pred.ndim != 1 or y.ndim != 1:
            raise ValueError(f"stsb is a regression: expected predictions of shape (M,) or (M, 1) and labels (M,), "
                             f"got {tuple(pred.shape)} and {tuple(y.shape)}")
    else:
        if pred.ndim == 2:
            if pred.shape[1] != spec.num_labels:
                raise ValueError(f"logits for {spec.name} must have {spec.num_labels} columns (one per class "
                                 f"{list(spec.label_names)}), got shape {tuple(pred.shape)}")
            pred = pred.argmax(axis=-1)
        if pred.ndim != 1 or y.ndim != 1:
            raise ValueError(f"expected predictions of shape (M,) (class ids) or (M, {spec.num_labels}) (logits) and "
                             f"labels (M,), got {tuple(pred.shape)} and {tuple(y.shape)}")
    if len(pred) != len(y):
        raise ValueError(f"predictions and labels must have the same length, got {len(pred)} and {len(y)}")
    if len(y) == 0:
        raise ValueError("no examples to score: predictions and labels are empty")

    if spec.is_regression:
        pred, y = pred.astype(np.float64), y.astype(np.float64)
        if len(y) < 2:
            raise ValueError("a correlation needs at least 2 examples")
        with warnings.catch_warnings():  # constant input: NaN, documented above
            warnings.simplefilter("ignore")
            return {"pearson": float(pearsonr(pred, y)[0]), "spearman": float(spearmanr(pred, y)[0])}
    pred = _class_ids(pred, "predictions", spec.num_labels, spec.name)
    y = _class_ids(y, "labels", spec.num_labels, spec.name)
    out = {}
    for metric in spec.metrics:
        if metric == "matthews_correlation":
            out[metric] = float(matthews_corrcoef(y, pred))
        elif metric == "f1":
            out[metric] = float(f1_score(y, pred, pos_label=1, zero_division=0))
        else:
            out[metric] = float(np.mean(pred == y))
    return out


# ---------------------------------------------------------------------------------------------
# Loading GLUE
# ---------------------------------------------------------------------------------------------

@dataclass
class GlueTask(TextTask):
    """A GLUE task: a :class:`~data_utils.text.TextTask` plus its dev splits and metrics.

    ``val`` and ``test`` are both the first dev split (the same object), since GLUE's test labels
    are hidden; ``eval_splits`` holds every dev split by its Hub name (``mnli``: also
    ``validation_mismatched``), ``eval_names`` the name to report each under (``mnli_m``,
    ``mnli_mm``; the task name otherwise), ``majority_baselines`` the majority-class accuracy of
    each (NaN for ``stsb``). ``metric_names`` / ``main_metric``: see :data:`GLUE_TASKS`.
    """

    eval_splits: dict[str, EncodedDataset] = field(default_factory=dict)
    eval_names: dict[str, str] = field(default_factory=dict)
    majority_baselines: dict[str, float] = field(default_factory=dict)
    metric_names: tuple[str, ...] = ()
    main_metric: str = ""

    def compute_metrics(self, predictions, labels) -> dict[str, float]:
        """:func:`glue_metrics` of this task: ``predictions`` (M,) ids, (M, C) logits, or (M,) / (M, 1)
        scores for ``stsb``; ``labels`` (M,).

        Example (MNLI, both dev splits)::

            >>> for split, ds in task.eval_splits.items():
            ...     logits, labels = mux.predict_logits(model, ds, n, collate_fn=task.collate_fn)
            ...     print(task.eval_names[split], task.compute_metrics(logits, labels))
            mnli_m {'accuracy': 0.78...}
            mnli_mm {'accuracy': 0.79...}
        """
        return glue_metrics(self.name, predictions, labels)

    def eval_sizes(self) -> dict[str, int]:
        """Examples in each dev split, e.g. ``{"validation_matched": 9815, "validation_mismatched": 9832}``."""
        return {split: len(ds) for split, ds in self.eval_splits.items()}


def _check_tokenizer(tokenizer, max_length, caller: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an integer >= 4 (room for [CLS], [SEP] and words), got {max_length!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{caller} needs a fast transformers tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building a task")


def _expected_files(spec: GlueSpec) -> str:
    """The local files of a task, both ways, with their columns: for messages."""
    exts = "|".join(GLUE_FILE_EXTENSIONS)
    hub = ", ".join(f"{split}.{{{exts}}}" for split in spec.splits)
    glue = ", ".join(["train.tsv"] + [GLUE_DEV_FILES[s] for s in spec.eval_splits])
    return (f"{glue} as GLUE's download gives them, or {hub} with the columns "
            f"{list(spec.text_columns) + ['label']} (the Hub's)")


@contextmanager
def _quiet_datasets():
    """Hide the progress bars ``datasets`` shows while it converts small local files."""
    import datasets

    disabled = getattr(datasets, "are_progress_bars_disabled", lambda: True)()
    if not disabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not disabled:
            datasets.enable_progress_bars()


def _split_file_names(split: str) -> list[str]:
    return [f"{split}.{ext}" for ext in GLUE_FILE_EXTENSIONS] + ([GLUE_DEV_FILES[split]] if split in GLUE_DEV_FILES
                                                                 else [])


def _find_split_file(data_dir: Path, split: str, spec: GlueSpec) -> Path:
    names = _split_file_names(split)
    found = [data_dir / n for n in names if (data_dir / n).is_file()]
    if not found:
        raise FileNotFoundError(f"no file for split {split!r} of GLUE task {spec.name!r}: tried '{data_dir / split}.*' "
                                f"({', '.join(names)}); expected the files {_expected_files(spec)} in '{data_dir}'")
    if len(found) > 1:
        raise ValueError(f"several files for split {split!r} of GLUE task {spec.name!r} in '{data_dir}': "
                         f"{[p.name for p in found]}; keep one")
    return found[0]


def _tsv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return f.readline().rstrip("\r\n").split("\t")


def _read_glue_tsv(path: Path, split: str, spec: GlueSpec):
    """A TSV file of GLUE's own distribution (:data:`GLUE_TSV_LAYOUT`) as a Dataset in the Hub's columns."""
    import datasets

    has_header, text_at, label_at = GLUE_TSV_LAYOUT[spec.name]
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' is not UTF-8 text ({e})") from e
    need = max(*text_at, label_at) + 1
    first = 2 if has_header else 1
    rows = []
    for number, line in enumerate(lines[first - 1:], start=first):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < need:
            raise ValueError(
                f"'{path}' line {number} has {len(fields)} tab-separated field(s): it is neither a file in the "
                f"Hub's columns (a header naming {list(spec.text_columns) + ['label']}) nor one of GLUE's own "
                f"{spec.name} files ({'a header, then ' if has_header else 'no header; '}the text in column(s) "
                f"{[i + 1 for i in text_at]} and the label in column {'the last' if label_at < 0 else label_at + 1}, "
                f"at least {need} fields)")
        rows.append(fields)
    data = {column: [r[i] for r in rows] for column, i in zip(spec.text_columns, text_at)}
    data["label"] = [r[label_at] for r in rows]
    return datasets.Dataset.from_dict(data)


def _read_local_file(path: Path, split: str, spec: GlueSpec, cache_dir):
    """One split file through ``datasets.load_dataset`` with the builder of its extension."""
    import datasets

    ext = path.suffix[1:]
    if ext == "tsv" and not set(spec.text_columns) | {"label"} <= set(_tsv_header(path)):
        return _read_glue_tsv(path, split, spec)  # GLUE's own columns, not the Hub's
    kwargs = {}
    if ext in ("csv", "tsv"):
        # Text stays text: no "NA" / "null" -> NaN, no all-digit sentence -> int.
        kwargs = {"keep_default_na": False, "converters": {c: str for c in spec.text_columns}}
        if ext == "tsv":  # GLUE's TSVs are read literally: a quote character is just a character
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    builder = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}[ext]
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                         cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)
    except Exception as e:  # a parse error of pandas / pyarrow: say which file, and the first cause
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise ValueError(f"could not read '{path}' as a {ext} file for GLUE task {spec.name!r} "
                         f"({type(cause).__name__}: {cause})") from e


def _load_raw(spec: GlueSpec, data_dir, cache_dir) -> dict[str, tuple[object, str]]:
    """split -> (a ``datasets.Dataset``, where it came from, for error messages)."""
    import datasets

    if data_dir is None:
        check_hub_dataset(GLUE_HUB_PATH, None, spec.name, source=f"GLUE task {spec.name!r}",
                          alternative=f"put the task's files {_expected_files(spec)} into a folder and pass "
                                      "data_dir=that folder.")
        try:
            raw = datasets.load_dataset(GLUE_HUB_PATH, spec.name,
                                        cache_dir=None if cache_dir is None else str(cache_dir))
        except Exception as e:
            raise DatasetUnavailableError(
                f"could not load GLUE task {spec.name!r} from the Hugging Face Hub dataset '{GLUE_HUB_PATH}' "
                f"(config {spec.name!r}): the Hub was unreachable or the dataset is not in the cache "
                f"({type(e).__name__}: {e}). Offline? Put the task's files {_expected_files(spec)} into a "
                f"folder and pass data_dir=that folder; or run once with internet access (cache_dir keeps the "
                f"download)."
            ) from e
        missing = [s for s in spec.splits if s not in raw]
        if missing:
            raise ValueError(f"'{GLUE_HUB_PATH}' ({spec.name}) has no split {missing}; it has {list(raw)}")
        return {s: (raw[s], f"{GLUE_HUB_PATH}/{spec.name}") for s in spec.splits}
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir '{data_dir}' is not a folder; expected a folder holding the files "
                                f"{_expected_files(spec)} of GLUE task {spec.name!r}")
    paths = {s: _find_split_file(data_dir, s, spec) for s in spec.splits}  # all missing files before any reading
    return {s: (_read_local_file(p, s, spec, cache_dir), str(p)) for s, p in paths.items()}


def _label_value(spec: GlueSpec, y):
    """The label as the task stores it (a class id, or a float score for stsb); None if invalid."""
    if isinstance(y, (bool, np.bool_)) or y is None:
        return None
    if spec.is_regression:
        if isinstance(y, str):
            try:
                y = float(y.strip())
            except ValueError:
                return None
        if not isinstance(y, numbers.Real) or not math.isfinite(float(y)):
            return None
        y = float(y)
        return y if STSB_RANGE[0] <= y <= STSB_RANGE[1] else None
    if isinstance(y, str):
        if y.strip() in spec.label_names:
            return spec.label_names.index(y.strip())
        try:
            y = int(y.strip())
        except ValueError:
            return None
    if isinstance(y, numbers.Real) and not isinstance(y, numbers.Integral):
        if not math.isfinite(float(y)) or float(y) != int(y):
            return None
        y = int(y)
    if not isinstance(y, numbers.Integral):
        return None
    y = int(y)
    return y if 0 <= y < len(spec.label_names) else None


def _texts_and_labels(spec: GlueSpec, ds, split: str, source: str) -> tuple[list, list]:
    columns = list(ds.column_names)
    missing = [c for c in (*spec.text_columns, "label") if c not in columns]
    if missing:
        raise ValueError(f"split {split!r} of GLUE task {spec.name!r} ({source}) lacks the column(s) {missing}; "
                         f"it has {columns}; expected {list(spec.text_columns) + ['label']}")
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of GLUE task {spec.name!r} ({source}) has no rows")
    data = ds.select_columns([*spec.text_columns, "label"]).to_dict()
    for c in spec.text_columns:
        for i, t in enumerate(data[c]):
            if not isinstance(t, str):
                raise ValueError(f"row {i} of split {split!r} of GLUE task {spec.name!r} ({source}): column {c!r} "
                                 f"holds {t!r}, expected a string")
    labels = []
    for i, y in enumerate(data["label"]):
        value = _label_value(spec, y)
        if value is None:
            if spec.is_regression:
                allowed = f"a number in [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}] (a similarity score)"
            else:
                allowed = (f"a class id 0..{len(spec.label_names) - 1} or a name in {list(spec.label_names)}")
            hint = " (-1 marks a hidden label: GLUE's test split, which cannot be used here)" if y in (-1, "-1") else ""
            raise ValueError(f"label {y!r} in row {i} (0-based, header not counted) of split {split!r} of GLUE "
                             f"task {spec.name!r} ({source}) is not allowed: expected {allowed}{hint}")
        labels.append(value)
    if len(spec.text_columns) == 1:
        texts = data[spec.text_columns[0]]
    else:
        texts = list(zip(*(data[c] for c in spec.text_columns)))
    return texts, labels


def _majority(labels: list, regression: bool) -> float:
    if regression:
        return float("nan")
    return Counter(labels).most_common(1)[0][1] / len(labels)


def load_glue_task(name: str, tokenizer, data_dir=None, max_length: int = 128, cache_dir=None,
                   max_train_examples: int | None = None) -> GlueTask:
    """Build GLUE task ``name`` (one of :data:`GLUE_TASKS`) as a :class:`GlueTask`.

    **Source.** With ``data_dir=None``: ``datasets.load_dataset("nyu-mll/glue", name,
    cache_dir=cache_dir)``, which needs the internet or a cache already holding it. The Hub
    dataset is checked first (:func:`data_utils.hub.check_hub_dataset`; offline, against the
    saved description ``hub_repos.json``); when it is missing or cannot be loaded, a
    :class:`~data_utils.images.DatasetUnavailableError` says so and how to use local files.
    With ``data_dir``: one file per split in that folder, ``train`` and the dev split(s), in
    either of two layouts (one file per split; two for the same split raise a ValueError):

    * GLUE's own files, as its download script unpacks them: ``train.tsv`` and ``dev.tsv``
      (``mnli``: ``dev_matched.tsv`` and ``dev_mismatched.tsv``), in GLUE's columns
      (:data:`GLUE_TSV_LAYOUT`: e.g. CoLA without a header, MRPC's label ``Quality`` first,
      MNLI's ``gold_label`` last). A ``.tsv`` whose header lacks the Hub's columns is read
      this way.
    * files in the Hub's columns, named after the Hub's splits: ``train``, ``validation`` (for
      ``mnli`` ``validation_matched`` and ``validation_mismatched``), each ``{split}.csv``,
      ``.tsv``, ``.json``, ``.jsonl`` (JSON lines) or ``.parquet``, with a header / keys naming
      the task's text columns (:data:`GLUE_TASKS`) and ``label``; other columns (``idx``) are
      ignored. These go through ``datasets.load_dataset`` (builders ``csv``, ``json``,
      ``parquet``), which caches an Arrow copy under ``cache_dir`` (default: the ``datasets``
      cache).

    A ``.tsv`` is read literally (tab-separated, no quoting, as GLUE's own TSVs); a ``.csv``
    with the usual double-quote quoting; in both, text is never turned into a number or NaN.

    **Checks** (each a ValueError / FileNotFoundError that says what was expected): a task name
    not in the nine; a missing file (names the path tried and the files expected); a file without
    the task's columns (names the missing ones and those found); a text that is not a string; a
    label outside the task's set. Labels may be class ids (``0``, ``1.0``, ``"1"``) or class names
    (``"entailment"``); ``stsb`` labels must be numbers in [0, 5] and are stored as floats. A
    ``-1`` (GLUE's hidden test label) is refused.

    **Splits.** ``train``: the GLUE train split, or its first ``max_train_examples`` rows (file
    order; only those are checked and tokenized). ``val`` and ``test``: both the first dev split,
    the same object, every row kept (GLUE's test labels are hidden, and papers report dev).
    ``eval_splits``: all dev splits by name (``mnli``: matched and mismatched), ``eval_names``:
    how to report them (``mnli_m``, ``mnli_mm``).

    **Items** (as in :func:`data_utils.text.load_text_task`): ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (0 for the first sentence, 1 for the second of a pair) and ``labels`` (an
    int; a float for ``stsb``), truncated to ``max_length`` tokens (pairs: the longer sentence
    first). ``collate_fn`` is ``DataCollatorWithPadding(tokenizer)``: a batch is a dict of
    ``(B, L)`` tensors and ``labels`` ``(B,)`` int64 (float32 for ``stsb``). ``task_type``:
    ``"sentence"``, or ``"regression"`` for ``stsb`` (``num_labels`` 1, ``label_names``
    ``["similarity"]``). ``majority_baseline``: accuracy, on the first dev split, of always
    predicting that split's most frequent class; NaN for ``stsb`` (a regression has no majority
    class; the usual reference there is a correlation of 0).

    Example::

        >>> tok = load_tokenizer("bert-base-uncased")             # or train_wordpiece_tokenizer(...)
        >>> task = load_glue_task("rte", tok)                     # or data_dir="glue/rte"
        >>> task.sizes()
        {'train': 2490, 'val': 277, 'test': 277}
        >>> batch = task.collate_fn([task.train[i] for i in range(8)])
        >>> batch["input_ids"].shape, batch["labels"]             # (8, L), (8,)
        >>> task.compute_metrics(logits, labels)                  # logits (277, 2) on task.val
        {'accuracy': 0.66...}
    """
    from transformers import DataCollatorWithPadding

    spec = _check_task_name(name)
    _check_tokenizer(tokenizer, max_length, "load_glue_task")
    if max_train_examples is not None and (isinstance(max_train_examples, bool)
                                           or not isinstance(max_train_examples, int) or max_train_examples < 1):
        raise ValueError(f"max_train_examples must be None (all) or an integer >= 1, got {max_train_examples!r}")

    raw = _load_raw(spec, data_dir, cache_dir)
    kind = "single" if len(spec.text_columns) == 1 else "pair"
    encoded, all_labels = {}, {}
    for split, (ds, source) in raw.items():
        if split == "train" and max_train_examples is not None and len(ds) > max_train_examples:
            ds = ds.select(range(max_train_examples))
        texts, labels = _texts_and_labels(spec, ds, split, source)
        encoded[split] = encode_texts(kind, tokenizer, texts, labels, max_length)
        all_labels[split] = labels

    dev = list(spec.eval_splits)
    baselines = {s: _majority(all_labels[s], spec.is_regression) for s in dev}
    return GlueTask(
        train=encoded["train"], val=encoded[dev[0]], test=encoded[dev[0]],
        num_labels=spec.num_labels, label_names=list(spec.label_names),
        collate_fn=DataCollatorWithPadding(tokenizer), majority_baseline=baselines[dev[0]],
        task_type=spec.task_type, name=spec.name,
        eval_splits={s: encoded[s] for s in dev}, eval_names=dict(spec.eval_splits),
        majority_baselines=baselines, metric_names=spec.metrics, main_metric=spec.main_metric,
    )


# ---------------------------------------------------------------------------------------------
# CoNLL-2003 named entities
# ---------------------------------------------------------------------------------------------

CONLL_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

# The files looked for in a folder, per split, in this order (the last ones: the original release).
CONLL_FILES = {"train": ("train.txt", "eng.train"), "val": ("valid.txt", "dev.txt", "eng.testa"),
               "test": ("test.txt", "eng.testb")}


class NerDataset(EncodedDataset):
    """An :class:`~data_utils.text.EncodedDataset` of a token task that also keeps the words' labels.

    ``texts[i]``: the words of sentence ``i``; ``word_labels[i]``: the tag id of every one of them,
    as read from the file, even those that truncation to ``max_length`` dropped from
    ``input_ids``. Pass ``word_labels`` to :func:`ner_f1` so that those words are scored too.
    """

    def __init__(self, encodings: dict[str, list], labels: list, texts: list, word_labels: list[list[int]]):
        super().__init__(encodings, labels, texts)
        self.word_labels = word_labels

    def num_words(self) -> list[int]:
        """Words per sentence, as in the file."""
        return [len(w) for w in self.word_labels]


def _read_conll(path: Path, label_names: list[str]) -> tuple[list[list[str]], list[list[int]]]:
    """Sentences (lists of words) and their tag ids from one CoNLL file."""
    index = {t: i for i, t in enumerate(label_names)}
    sentences, tags, words, ids = [], [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' is not UTF-8 text ({e}); convert it, e.g. iconv -f latin1 -t utf-8") from e
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":  # a blank line or a document marker ends a sentence
            if words:
                sentences.append(words)
                tags.append(ids)
            words, ids = [], []
            continue
        if len(parts) < 2:
            raise ValueError(f"'{path}' line {number}: {line!r} has one column; expected 'word POS chunk NER' "
                             "(the NER tag last), separated by spaces")
        if parts[-1] not in index:
            raise ValueError(f"'{path}' line {number}: NER tag {parts[-1]!r} (word {parts[0]!r}) is not in the "
                             f"label list {list(label_names)}; pass label_names= with every tag of the files")
        words.append(parts[0])
        ids.append(index[parts[-1]])
    if words:
        sentences.append(words)
        tags.append(ids)
    if not sentences:
        raise ValueError(f"'{path}' holds no sentence; expected CoNLL lines 'word POS chunk NER' with blank "
                         "lines between sentences")
    return sentences, tags


def _conll_paths(data_dir_or_files) -> dict[str, Path]:
    if isinstance(data_dir_or_files, Mapping):
        if set(data_dir_or_files) != set(CONLL_FILES):
            raise ValueError(f"files must map exactly the splits {list(CONLL_FILES)} to paths, "
                             f"got keys {list(data_dir_or_files)}")
        paths = {s: Path(data_dir_or_files[s]).expanduser() for s in CONLL_FILES}
        for split, p in paths.items():
            if not p.is_file():
                raise FileNotFoundError(f"CoNLL file for split {split!r} not found: '{p}'")
        return paths
    folder = Path(data_dir_or_files).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"'{folder}' is not a folder; expected a folder holding train.txt, valid.txt "
                                "(or dev.txt) and test.txt in CoNLL-2003 format, or a dict {split: file}")
    paths = {}
    for split, names in CONLL_FILES.items():
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no CoNLL file for split {split!r} in '{folder}': tried "
                                    f"{[str(folder / n) for n in names]}")
        if len(found) > 1:
            raise ValueError(f"several CoNLL files for split {split!r} in '{folder}': {[p.name for p in found]}; "
                             "keep one, or pass a dict {split: file}")
        paths[split] = found[0]
    return paths


def load_conll_ner(data_dir_or_files, tokenizer, max_length: int = 128, label_names=None) -> TextTask:
    """Named-entity recognition from CoNLL-2003-format files, as a token :class:`~data_utils.text.TextTask`.

    ``data_dir_or_files``: a folder holding ``train.txt``, ``valid.txt`` (or ``dev.txt``) and
    ``test.txt`` (the original names ``eng.train``, ``eng.testa``, ``eng.testb`` also work), or
    a dict ``{"train": path, "val": path, "test": path}``. CoNLL-2003 is licensed; nothing is
    downloaded. File format: one token per line, ``word POS chunk NER`` separated by spaces (only
    the first and the last column are used), a blank line between sentences, ``-DOCSTART-``
    lines skipped. Both the IOB1 tags of the original release and the IOB2 tags of later copies
    fit the default label list.

    ``label_names``: the tags in id order; default :data:`CONLL_LABELS` (``O, B-PER, I-PER,
    B-ORG, I-ORG, B-LOC, I-LOC, B-MISC, I-MISC``, the order of the Hugging Face copy). A tag of the
    files outside the list raises a ValueError naming it, its file and line.

    Items: ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels``, all lists of the
    same length ``L <= max_length``. The label of each word sits on its first sub-token; the other
    sub-tokens and ``[CLS]`` / ``[SEP]`` get -100 (``IGNORE_INDEX``, not scored), as the
    ``casing`` task of :func:`~data_utils.text.load_text_task`. A word the tokenizer turns into no
    token at all (only control characters) is given as the unknown token, so every word that fits
    keeps its one scored position. Sentences longer than ``max_length`` tokens are truncated: the
    splits are :class:`NerDataset` objects whose ``word_labels`` keep the tags of every word, for
    :func:`ner_f1`. ``collate_fn``: ``DataCollatorForTokenClassification(tokenizer,
    label_pad_token_id=-100)``, giving ``(B, L)`` tensors. ``majority_baseline``: token accuracy
    on the test split of always predicting its most frequent tag (``O``; over scored tokens, after
    truncation); its entity F1 is 0.

    Example::

        >>> task = load_conll_ner("data/conll2003", tok)          # train.txt, valid.txt, test.txt
        >>> task.label_names[:3], task.task_type
        (['O', 'B-PER', 'I-PER'], 'token')
        >>> logits, labels = mux.predict_logits(model, task.test, n, collate_fn=task.collate_fn)  # (M, L, 9), (M, L)
        >>> ner_f1(logits, labels, task.label_names, word_labels=task.test.word_labels)
        {'precision': 0.83..., 'recall': 0.85..., 'f1': 0.84...}
    """
    from transformers import DataCollatorForTokenClassification

    _check_tokenizer(tokenizer, max_length, "load_conll_ner")
    names = list(CONLL_LABELS if label_names is None else label_names)
    if not names or not all(isinstance(t, str) and t for t in names) or len(set(names)) != len(names):
        raise ValueError(f"label_names must be a non-empty list of distinct tag strings, got {label_names!r}")
    paths = _conll_paths(data_dir_or_files)
    read = {split: _read_conll(p, names) for split, p in paths.items()}

    vocabulary = sorted({w for sentences, _ in read.values() for s in sentences for w in s})
    pieces = tokenizer(vocabulary, add_special_tokens=False)["input_ids"]
    empty = {w for w, ids in zip(vocabulary, pieces) if not ids}
    datasets = {}
    for split, (sentences, tags) in read.items():
        words = [[tokenizer.unk_token if w in empty else w for w in s] for s in sentences] if empty else sentences
        ds = encode_texts("words", tokenizer, words, tags, max_length)
        datasets[split] = NerDataset(ds.encodings, ds.labels, ds.texts, tags)

    scored = [y for row in datasets["test"].labels for y in row if y != IGNORE_INDEX]
    majority = Counter(scored).most_common(1)[0][1] / len(scored)
    collate_fn = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return TextTask(train=datasets["train"], val=datasets["val"], test=datasets["test"], num_labels=len(names),
                    label_names=names, collate_fn=collate_fn, majority_baseline=majority, task_type="token",
                    name="conll2003")


def ner_f1(predictions, labels, label_names, word_labels=None) -> dict[str, float]:
    """Entity-level precision, recall and F1 (``seqeval``, default CoNLL scheme, not strict).

    ``predictions``: ``(M, L)`` tag ids or ``(M, L, C)`` logits (argmax over the last axis), at
    sub-token level; ``labels``: ``(M, L)`` tag ids, -100 where not scored (other sub-tokens,
    special tokens, padding), as the collator of :func:`load_conll_ner` gives them. For each
    sentence, the positions whose label is not -100, in order, are its words: their gold tags
    and predicted tags form the sentence's two word-level sequences. Entities are then counted
    as ``conlleval`` does (an ``I-X`` after ``O`` starts an entity; an entity is correct when its
    type and both ends match).

    Truncated words: with ``word_labels`` (``task.test.word_labels``: every word's gold tag, as
    in the file), sentence ``i``'s scored positions are its first words and the words that
    truncation dropped are appended as predicted ``O``: their gold entities count as missed, so
    recall is not flattered by a small ``max_length``. Without it, only the words that are in the
    inputs are scored. The rows of ``predictions`` / ``labels`` must then be in dataset order; a
    row whose scored gold tags differ from the start of ``word_labels[i]`` raises a ValueError.

    Returns ``{"precision", "recall", "f1"}`` as Python floats (0 when there is nothing to
    divide by).

    Example (3 predicted entities of which 2 are right, 4 gold entities)::

        >>> ner_f1(pred_ids, labels, CONLL_LABELS)
        {'precision': 0.666..., 'recall': 0.5, 'f1': 0.571...}    # F1 = 2PR/(P+R) = 4/7
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    names = list(label_names)
    pred, gold = _as_numpy(predictions, "predictions"), _as_numpy(labels, "labels")
    shape = tuple(pred.shape)
    if pred.ndim == 3:
        if pred.shape[-1] != len(names):
            raise ValueError(f"logits must have {len(names)} classes on the last axis (one per tag), "
                             f"got shape {tuple(pred.shape)}")
        pred = pred.argmax(axis=-1)
    if gold.ndim != 2 or pred.shape != gold.shape:
        raise ValueError(f"expected predictions (M, L) or (M, L, C) and labels (M, L) of the same M and L, got "
                         f"{shape} and {tuple(gold.shape)}")
    if len(gold) == 0:
        raise ValueError("no sentences to score: predictions and labels are empty")
    if word_labels is not None and len(word_labels) != len(gold):
        raise ValueError(f"word_labels has {len(word_labels)} sentences, labels {len(gold)}: they must be the "
                         "same examples in the same order")
    pred, gold = pred.astype(np.int64), gold.astype(np.int64)
    y_true, y_pred = [], []
    for i in range(len(gold)):
        scored = gold[i] != IGNORE_INDEX
        g, p = gold[i][scored], pred[i][scored]
        for what, ids in (("labels", g), ("predictions", p)):
            if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
                raise ValueError(f"{what} of row {i} hold tag ids outside 0..{len(names) - 1}: "
                                 f"{sorted(set(ids.tolist()) - set(range(len(names))))}")
        true_tags, pred_tags = [names[t] for t in g], [names[t] for t in p]
        if word_labels is not None:
            full = [int(t) for t in word_labels[i]]
            if len(g) > len(full) or g.tolist() != full[:len(g)]:
                raise ValueError(f"row {i}: the scored gold tags {g.tolist()} are not the first words of "
                                 f"word_labels[{i}] = {full}; predictions must be in dataset order")
            true_tags = [names[t] for t in full]
            pred_tags += ["O"] * (len(full) - len(g))
        y_true.append(true_tags)
        y_pred.append(pred_tags)
    return {"precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "f1": float(f1_score(y_true, y_pred, zero_division=0))}
