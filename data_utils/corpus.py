"""Pre-training corpora and the two pre-training collators of chapter 03 (MUX-BERT, MUX-ELECTRA).

* :func:`load_pretraining_corpus` turns raw text into a map-style dataset of tokenized examples
  (dicts of lists of ints: ``input_ids``, ``attention_mask``, and ``token_type_ids`` when the
  tokenizer has them; no ``labels``: the collators make them). The text comes from

  - ``"offline"`` (the default): the English sentences of the Python documentation
    (:mod:`data_utils.text`), one split of :func:`data_utils.text.text_splits`;
  - the Hugging Face Hub: ``"wikipedia"``, ``"bookcorpus"``, ``"wikipedia+bookcorpus"`` (the
    corpus of BERT and of the MUX-PLMs paper) or any dataset id, downloaded by ``datasets``;
  - local files: ``.txt``, ``.json``/``.jsonl``, ``.csv`` or ``.parquet``.

* :func:`mlm_collator` (masked language modelling, MUX-BERT) and :class:`ReplacedTokenCollator`
  (replaced-token detection with a uniform random generator, MUX-ELECTRA as in the MUX-PLMs
  paper, appendix C: "The generator randomly replaces 15% of tokens in the input with other
  tokens in the vocabulary"; there is no generator network) pad a list of examples into a dict
  of tensors and add ``labels``. Both draw from torch's global RNG in the process that collates,
  which :func:`mux.train` saves and restores with its checkpoints, so a resumed run masks and
  replaces exactly the tokens the uninterrupted run would have (with ``num_workers=0``; workers
  are seeded from the loader's own generator, which ``mux.train`` also reseeds per epoch).

* :func:`corpus_stats` describes a corpus in a few numbers, for the notebook.
"""
from __future__ import annotations

import math
import os
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

import torch

from mux.grouping import IGNORE_INDEX  # -100: positions that are not scored

from .hub import PARQUET_EXPORT, check_hub_dataset
from .images import DatasetUnavailableError
from .text import looks_like_path, text_splits

__all__ = [
    "HUB_CORPORA",
    "HubCorpus",
    "LOCAL_FORMATS",
    "load_pretraining_corpus",
    "mlm_collator",
    "ReplacedTokenCollator",
    "corpus_stats",
]

class HubCorpus(NamedTuple):
    """Where a named corpus lives on the Hub: ``datasets.load_dataset(repo, config, revision=revision)``."""

    repo: str
    config: str | None
    revision: str | None = None  # None: the default branch, "main"


# Short names of the full-scale corpora -> their Hub dataset (data_utils/hub_repos.json describes
# each at this revision, for the check made without the Hub).
# * wikipedia: wikimedia/wikipedia holds Parquet files on its default branch; "20231101.en" is
#   the English dump of 1 November 2023.
# * bookcorpus: the default branch of bookcorpus/bookcorpus holds only a loading script
#   (bookcorpus.py), which datasets >= 4 refuses ("Dataset scripts are no longer supported").
#   The Hub's automatic Parquet export of it, the branch refs/convert/parquet, holds the same
#   rows as Parquet files (one column, "text") and loads without a script. There datasets sees
#   a single configuration, "default", not the script's "plain_text": config stays None.
HUB_CORPORA = {
    "wikipedia": HubCorpus("wikimedia/wikipedia", "20231101.en"),
    "bookcorpus": HubCorpus("bookcorpus/bookcorpus", None, PARQUET_EXPORT),
}

# File extension -> the ``datasets`` builder that reads it.
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                 ".parquet": "parquet"}

_OFFLINE_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _check_tokenizer(tokenizer, what: str, *, fast: bool) -> None:
    if tokenizer is None:
        raise ValueError(f"{what} needs a tokenizer, e.g. data_utils.text.train_wordpiece_tokenizer(...) or "
                         "data_utils.text.load_tokenizer('bert-base-uncased')")
    if fast and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{what} needs a fast transformers tokenizer (is_fast=True), got {type(tokenizer).__name__}")
    missing = [name for name in ("pad_token", "mask_token") if getattr(tokenizer, name, None) is None]
    if missing:
        raise ValueError(f"{what} needs a tokenizer with a pad token and a mask token (BERT-style pre-training); "
                         f"{type(tokenizer).__name__} has no {' and no '.join(missing)}")


def _check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {p!r}")
    return float(p)


def _check_positive_int(name: str, value, minimum: int = 1, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Tokenizing and packing (one batch of documents at a time, inside datasets.Dataset.map)
# ---------------------------------------------------------------------------------------------

def _texts(batch: dict, column: str) -> list[str]:
    """The non-blank strings of one batch (None and blank lines are skipped)."""
    return [t for t in batch[column] if isinstance(t, str) and t.strip()]


def _empty(with_types: bool) -> dict:
    """The output of a batch without text (the tokenizer fails on an empty list)."""
    return {"input_ids": [], "attention_mask": [], **({"token_type_ids": []} if with_types else {})}


def _pack_batch(batch: dict, *, tokenizer, column: str, max_length: int, with_types: bool) -> dict:
    """Tokenize without special tokens, concatenate, cut into ``[CLS] <max_length-2 tokens> [SEP]``."""
    block, texts = max_length - 2, _texts(batch, column)
    if not texts:
        return _empty(with_types)
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)["input_ids"]
    flat = list(chain.from_iterable(ids))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    input_ids = [[cls, *flat[i:i + block], sep] for i in range(0, len(flat) - block + 1, block)]
    out = {"input_ids": input_ids, "attention_mask": [[1] * max_length for _ in input_ids]}
    if with_types:
        out["token_type_ids"] = [[0] * max_length for _ in input_ids]
    return out


def _line_batch(batch: dict, *, tokenizer, column: str, max_length: int, with_types: bool) -> dict:
    """One example per non-blank text: ``[CLS] text [SEP]``, truncated to ``max_length`` tokens."""
    texts = _texts(batch, column)
    if not texts:
        return _empty(with_types)
    enc = tokenizer(texts, truncation=True, max_length=max_length,
                    return_token_type_ids=with_types, return_attention_mask=True)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if with_types:
        out["token_type_ids"] = [[0] * len(row) for row in enc["input_ids"]]  # one segment
    return out


def _encode(ds, *, tokenizer, column: str, max_length: int, pack: bool, num_proc, map_batch_size: int,
            source: str):
    import datasets

    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    features = {"input_ids": datasets.Sequence(datasets.Value("int32")),
                "attention_mask": datasets.Sequence(datasets.Value("int8"))}
    if with_types:
        features["token_type_ids"] = datasets.Sequence(datasets.Value("int8"))
    fn = partial(_pack_batch if pack else _line_batch, tokenizer=tokenizer, column=column,
                 max_length=max_length, with_types=with_types)
    encoded = ds.map(fn, batched=True, batch_size=map_batch_size, num_proc=num_proc,
                     remove_columns=ds.column_names, features=datasets.Features(features),
                     desc=f"{'Packing' if pack else 'Tokenizing'} {source}")
    if len(encoded) == 0:
        if not any(t.strip() for t in ds[column] if isinstance(t, str)):
            raise ValueError(f"the corpus {source!r} holds no text: its {column!r} column is empty or only "
                             "blank lines")
        raise ValueError(f"the corpus {source!r} has too few tokens for one block of max_length={max_length} "
                         f"(packing keeps only whole blocks of {max_length - 2} tokens per batch of "
                         f"{map_batch_size} documents): use more text, a smaller max_length, or pack=False")
    return encoded


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def _offline(split: str, seed: int, max_examples):
    import datasets

    if split not in _OFFLINE_SPLITS:
        raise ValueError(f"the offline corpus has splits 'train', 'val' and 'test'; got split={split!r}")
    sentences = getattr(text_splits(seed), _OFFLINE_SPLITS[split])
    if max_examples is not None:
        sentences = sentences[:max_examples]
    return datasets.Dataset.from_dict({"text": sentences}), "text"


def _local_files(source) -> tuple[str, list[str]]:
    """``(builder, files)`` of a local file, folder, or list of files; errors name what is wrong."""
    paths = [Path(p).expanduser() for p in (source if isinstance(source, (list, tuple)) else [source])]
    if not paths:
        raise ValueError("source is an empty list of files")
    files = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_FORMATS)
            if not found:
                raise ValueError(f"folder {str(p)!r} holds no text files: expected files ending in "
                                 f"{', '.join(LOCAL_FORMATS)}")
            files += found
        elif p.is_file():
            if p.suffix.lower() not in LOCAL_FORMATS:
                raise ValueError(f"file {str(p)!r}: unsupported format {p.suffix!r}; expected one of "
                                 f"{', '.join(LOCAL_FORMATS)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {str(p)!r} does not exist; expected a file or folder of "
                                    f"{', '.join(LOCAL_FORMATS)} files")
    builders = {LOCAL_FORMATS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"the corpus {source!r} mixes file formats ({', '.join(sorted({f.suffix for f in files}))}); "
                         "use files of one format")
    nonempty = [str(f) for f in files if f.stat().st_size > 0]  # datasets fails on an empty file
    if not nonempty:
        raise ValueError(f"the corpus {source!r} holds no text: all its files are empty")
    return builders.pop(), nonempty


_LOCAL_ALTERNATIVE = ("use source='offline' (the Python documentation, no download), or put the text into local "
                      "files (.txt one document per line, .jsonl/.csv/.parquet with a text column) and pass their "
                      "folder as source.")


def _hub_error(name: str, err: Exception) -> DatasetUnavailableError:
    if "scripts are no longer supported" in str(err):  # the check found nothing, datasets did
        return DatasetUnavailableError(
            f"could not load the dataset {name!r} from the Hugging Face Hub: it is defined by a loading script, "
            f"which datasets >= 4 no longer runs ({type(err).__name__}: {err}). Load its Parquet export "
            f"(revision={PARQUET_EXPORT!r}), or {_LOCAL_ALTERNATIVE}")
    return DatasetUnavailableError(
        f"could not load the dataset {name!r} from the Hugging Face Hub (offline, or the Hub could not be "
        f"reached: {type(err).__name__}: {err}). Offline? Use source='offline' (the Python documentation, "
        "no download), or put the text into local files (.txt one document per line, .jsonl/.csv/.parquet "
        "with a text column) and pass their folder as source; or fill the datasets cache on a machine "
        "with internet access first.")


def _hub_source(name: str) -> HubCorpus:
    """The Hub dataset of a short name of :data:`HUB_CORPORA`, or of a dataset id (default branch)."""
    return HUB_CORPORA.get(name, HubCorpus(name, None))


def _hub_label(hub: HubCorpus) -> str:
    details = [d for d in (hub.config, hub.revision and f"revision {hub.revision}") if d]
    return hub.repo if not details else f"{hub.repo} ({', '.join(details)})"


def _check_hub_parts(names: list[str]) -> None:
    """Check every part of a Hub corpus before any is read: a bad one fails before the others stream."""
    for name in names:
        hub = _hub_source(name)
        check_hub_dataset(hub.repo, hub.revision, hub.config, source=f"corpus source {name!r}",
                          alternative=_LOCAL_ALTERNATIVE)


def _hub_part(name: str, split: str, *, streaming: bool, cache_dir, column: str, limit):
    """One Hub dataset, reduced to its text column (first ``limit`` documents when given)."""
    import datasets

    hub = _hub_source(name)
    label = _hub_label(hub)
    try:
        ds = datasets.load_dataset(hub.repo, hub.config, split=split, streaming=streaming, cache_dir=cache_dir,
                                   revision=hub.revision)
        if streaming:  # the Hub is read while iterating: its failures surface here
            return _take(ds, column, limit, label), "text"
    except (ValueError, TypeError, KeyError):
        raise  # a wrong split or argument: datasets' message says what
    except Exception as err:  # ConnectionError, DatasetNotFoundError, HTTP errors, ...
        raise _hub_error(label, err) from err
    return _select(ds, column, limit, label), column


def _take(iterable_ds, column: str, limit: int, source: str):
    """The first ``limit`` documents of a streamed dataset, as an in-memory ``datasets.Dataset``."""
    import datasets

    texts = []
    for example in islice(iterable_ds, limit):
        if column not in example:
            raise ValueError(f"the corpus {source!r} has no text column {column!r}; its columns are "
                             f"{list(example)}: pass text_column=")
        texts.append(example[column])
    return datasets.Dataset.from_dict({"text": texts}, features=datasets.Features({"text": datasets.Value("string")}))


def _select(ds, column: str, limit, source: str):
    if column not in ds.column_names:
        raise ValueError(f"the corpus {source!r} has no text column {column!r}; its columns are "
                         f"{ds.column_names}: pass text_column=")
    ds = ds.select_columns([column])
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"the text column {column!r} of the corpus {source!r} must hold strings, "
                         f"its type is {ds.features[column]}")
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


def load_pretraining_corpus(source="offline", tokenizer=None, max_length: int = 128, split: str = "train",
                            seed: int = 0, text_column: str = "text", cache_dir=None, streaming: bool = False,
                            max_examples: int | None = None, pack: bool = True, num_proc: int | None = None,
                            map_batch_size: int = 1000):
    """A map-style dataset of tokenized pre-training examples, for :func:`mux.train`.

    Returns a ``datasets.Dataset`` (``len()``, integer indexing) whose items are dicts of lists of
    ints: ``input_ids`` (L,), ``attention_mask`` (L,) all ones, and ``token_type_ids`` (L,) all
    zeros when ``tokenizer.model_input_names`` has them. No ``labels``: :func:`mlm_collator` or
    :class:`ReplacedTokenCollator` pads a list of items and makes them. The columns are stored as
    int32 / int8 (Arrow, memory-mapped for a downloaded or local corpus).

    ``source``:

    * ``"offline"`` (default): the sentences of the ``split`` (``"train"``, ``"val"`` or
      ``"test"``) of :func:`data_utils.text.text_splits` with ``seed``, in their order. The
      chapter's tasks (:func:`data_utils.text.load_text_task` with the same ``seed``) split the
      same sentences the same way (by topic, 10% / 10%), so pre-training on ``split="train"``
      never sees a validation or test sentence of the tasks, nor any sentence of their topics.
      ``seed`` is used only here.
    * a Hub dataset: ``"wikipedia"`` (``wikimedia/wikipedia``, configuration ``20231101.en``),
      ``"bookcorpus"`` (``bookcorpus/bookcorpus`` at revision ``refs/convert/parquet``, the Hub's
      Parquet export: its default branch holds only a loading script, which ``datasets`` >= 4
      refuses), ``"wikipedia+bookcorpus"`` (both, concatenated: BERT's and the MUX-PLMs paper's
      corpus; any names joined by ``+``), or any other dataset id, passed to
      ``datasets.load_dataset(id, split=split, cache_dir=cache_dir)`` (see :data:`HUB_CORPORA`).
      These hold one split, ``"train"``. Before any part is read, each is checked
      (:func:`data_utils.hub.check_hub_dataset`: the Hub, or the saved description
      ``hub_repos.json`` when offline): a dataset that does not exist or holds only a loading
      script raises a :class:`DatasetUnavailableError` naming the source, the repository and
      what to do. When the Hub cannot be reached while loading, a
      :class:`DatasetUnavailableError` names the dataset and the alternatives (``"offline"``, or
      local files).
    * local files: a ``.txt``, ``.json``/``.jsonl``, ``.csv`` or ``.parquet`` file, a list of
      them, or a folder (searched recursively for those extensions; one format per corpus;
      empty files are skipped). ``.txt``: one document (or line) per line, read by
      ``datasets``' ``text`` builder into the column ``"text"`` (``text_column`` is then
      ignored); the other formats: the column ``text_column``. Local files form one split:
      ``split`` must be ``"train"``. A path that does not exist raises FileNotFoundError naming it.
      A string is taken as a path when it exists, looks like one (``./``, ``~``, absolute, two
      ``/`` or more) or ends in a supported extension; otherwise as a Hub id.

    ``pack=True`` (the standard BERT pre-training input, as ``group_texts`` in transformers'
    ``run_mlm.py``): the documents are tokenized without special tokens and concatenated, in
    order, without separators, and the stream is cut into blocks of ``max_length - 2`` tokens,
    each wrapped as ``[CLS] block [SEP]``: every example has exactly ``max_length`` tokens. The
    concatenation runs per ``datasets.map`` batch of ``map_batch_size`` documents, and the short
    remainder of each batch is dropped (fewer than ``max_length - 2`` tokens per
    ``map_batch_size`` documents; the offline train split, about 1,500 sentences, loses at most
    two remainders). ``pack=False``: one example per non-blank document or line,
    ``[CLS] text [SEP]`` truncated to ``max_length`` tokens (a Wikipedia article keeps only its
    start). Blank documents are skipped either way. ``num_proc``: processes for ``map`` (the
    full-scale corpora); with several, each shard is packed on its own.

    ``max_examples``: keep only the first that many documents (sentences, lines, articles),
    before tokenizing; for ``"a+b"``, that many in all, shared as evenly as possible between the
    parts. ``streaming=True`` reads a Hub or local corpus with ``datasets`` streaming and keeps
    only its first ``max_examples`` documents (required: a streamed dataset has no end known in
    advance), held in memory as a map-style dataset: :func:`mux.train` needs ``len()`` and
    integer indexing, since it draws a seeded permutation each epoch and resumes exactly at a
    position of it; an iterable dataset has neither. So streaming is the way to try a slice of
    a large corpus without downloading all of it; the first documents in the dataset's order,
    not a random sample. For the offline corpus, ``streaming`` changes nothing.

    ``cache_dir``: the ``datasets`` cache (downloads, and the tokenized corpus of a downloaded or
    local corpus, reused on the next call with the same arguments and tokenizer).

    Raises ValueError when the tokenizer is not a fast ``transformers`` tokenizer or has no pad
    or mask token (and, with ``pack``, no ``[CLS]``/``[SEP]``), when ``text_column`` is missing
    (naming the columns found), when the corpus holds no text (empty files, blank lines only) or
    too few tokens for one block, and when ``streaming`` is given without ``max_examples``.
    """
    _check_tokenizer(tokenizer, "load_pretraining_corpus", fast=True)
    _check_positive_int("max_length", max_length, minimum=4)
    _check_positive_int("max_examples", max_examples, allow_none=True)
    _check_positive_int("num_proc", num_proc, allow_none=True)
    _check_positive_int("map_batch_size", map_batch_size)
    if pack and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
        raise ValueError("pack=True wraps each block as [CLS] ... [SEP]: the tokenizer needs a cls_token and a "
                         f"sep_token, {type(tokenizer).__name__} has {tokenizer.cls_token!r} / {tokenizer.sep_token!r}")
    if streaming and max_examples is None:
        raise ValueError("streaming=True needs max_examples: the first max_examples documents of the stream are "
                         "kept, in memory, as a map-style dataset (mux.train needs len() and indexing)")
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column must be a column name, got {text_column!r}")

    import datasets

    is_local = isinstance(source, (os.PathLike, list, tuple)) or (
        isinstance(source, str) and (looks_like_path(source) or Path(source).suffix.lower() in LOCAL_FORMATS))
    if not is_local and not isinstance(source, str):
        raise ValueError(f"source must be 'offline', a Hub dataset name, or a local path; got {source!r}")
    name = str(source) if not isinstance(source, (list, tuple)) else ", ".join(map(str, source))

    if source == "offline":
        ds, column = _offline(split, seed, max_examples)
        bars_were_on = not datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()  # under a second: no bar in the notebook
        try:
            return _encode(ds, tokenizer=tokenizer, column=column, max_length=max_length, pack=pack, num_proc=None,
                           map_batch_size=map_batch_size, source=name)
        finally:
            if bars_were_on:
                datasets.utils.enable_progress_bars()

    if is_local:
        if split != "train":
            raise ValueError(f"local files form one split, 'train'; got split={split!r}. For held-out text, "
                             "pass its own files as source")
        builder, files = _local_files(source)
        column = "text" if builder == "text" else text_column
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming,
                                       cache_dir=cache_dir)
            ds = _take(ds, column, max_examples, name) if streaming else _select(ds, column, max_examples, name)
        except datasets.exceptions.DatasetGenerationError as err:
            raise ValueError(f"could not read the corpus {name!r} as {builder} files: {err.__cause__ or err}") from err
        column = "text" if streaming else column
    else:
        names = [part.strip() for part in source.split("+")]
        if not all(names):
            raise ValueError(f"source {source!r}: expected Hub dataset names joined by '+', e.g. "
                             "'wikipedia+bookcorpus'")
        _check_hub_parts(names)  # a missing or script-only source fails here, before any part is read
        parts = []
        for i, part in enumerate(names):
            limit = None if max_examples is None else max_examples // len(names) + (i < max_examples % len(names))
            if limit == 0:
                continue
            ds, column = _hub_part(part, split, streaming=streaming, cache_dir=cache_dir, column=text_column,
                                   limit=limit)
            parts.append(ds.rename_column(column, "text") if column != "text" else ds)
        ds, column = (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), "text"
    return _encode(ds, tokenizer=tokenizer, column=column, max_length=max_length, pack=pack, num_proc=num_proc,
                   map_batch_size=map_batch_size, source=name)


# ---------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------

def mlm_collator(tokenizer, mlm_probability: float = 0.15, pad_to_multiple_of: int | None = None):
    """The masked-language-modelling collator of BERT (MUX-BERT): ``DataCollatorForLanguageModeling``.

    Called on a list of examples (dicts of lists of ints, e.g. items of
    :func:`load_pretraining_corpus`), it pads them into a dict of tensors ``input_ids``,
    ``attention_mask`` (and ``token_type_ids``), all (B, L), and adds ``labels`` (B, L).
    Each real, non-special token (not padding, not ``[CLS]``/``[SEP]``/``[UNK]``..., i.e. not in
    ``tokenizer.all_special_ids``) is selected with probability ``mlm_probability`` (Bernoulli
    per token); of the selected ones, 80% become ``[MASK]``, 10% a token drawn uniformly from the
    whole vocabulary (special tokens included, as in BERT and ``transformers``), 10% stay
    unchanged (``mask_replace_prob=0.8``, ``random_replace_prob=0.1``, set explicitly).
    ``labels`` holds the original token id at the selected positions and -100
    (``IGNORE_INDEX``) everywhere else. Draws from torch's global RNG (``seed=None``), which
    :func:`mux.train` restores on resume.

    A tokenizer without a pad or a mask token raises ValueError.
    """
    from transformers import DataCollatorForLanguageModeling

    _check_tokenizer(tokenizer, "mlm_collator", fast=False)
    p = _check_probability("mlm_probability", mlm_probability)
    _check_positive_int("pad_to_multiple_of", pad_to_multiple_of, allow_none=True)
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=p, mask_replace_prob=0.8,
                                           random_replace_prob=0.1, pad_to_multiple_of=pad_to_multiple_of,
                                           return_tensors="pt", seed=None)


class ReplacedTokenCollator:
    """Replaced-token detection with a uniform random generator (MUX-ELECTRA, MUX-PLMs appendix C).

    ``collator(examples) -> dict`` of tensors: the examples (dicts of lists of ints, without
    ``labels``) are padded by ``DataCollatorWithPadding`` into ``input_ids``, ``attention_mask``
    (and ``token_type_ids``), all (B, L); then each real, non-special token (not padding, not in
    ``tokenizer.all_special_ids``) is selected with probability ``replace_probability``
    (Bernoulli per token, torch's global RNG, as :func:`mlm_collator`), and each selected token
    is replaced by a token drawn uniformly from the vocabulary without its special tokens (never
    ``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]``). ``labels`` (B, L), long: 1 where the
    token now differs from the original, 0 where it is the original (including a selected token
    whose draw happened to give it back: as in ELECTRA, a token is "replaced" only if it
    changed), -100 (``IGNORE_INDEX``) on padding and special tokens. The discriminator is trained
    with a binary cross-entropy over the positions whose label is not -100.

    The RNG use depends only on the batch shape (one Bernoulli and one uniform draw per
    position), so under ``torch.manual_seed`` the output is deterministic.

    ``return_original_ids=True`` adds ``original_input_ids`` (B, L), the padded inputs before
    replacement, to inspect what changed. Off by default: :func:`mux.train`'s losses pass every
    key of a batch but ``labels`` to the model, which would not expect it.

    A tokenizer without a pad or a mask token raises ValueError (the mask token is not used here,
    but the model pre-trained with this collator is a BERT-style encoder whose tokenizer has one).
    """

    def __init__(self, tokenizer, replace_probability: float = 0.15, pad_to_multiple_of: int | None = None,
                 return_original_ids: bool = False):
        from transformers import DataCollatorWithPadding

        _check_tokenizer(tokenizer, "ReplacedTokenCollator", fast=False)
        self.tokenizer = tokenizer
        self.replace_probability = _check_probability("replace_probability", replace_probability)
        self.return_original_ids = bool(return_original_ids)
        _check_positive_int("pad_to_multiple_of", pad_to_multiple_of, allow_none=True)
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
        special = set(tokenizer.all_special_ids)
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        vocab = sorted(set(tokenizer.get_vocab().values()) - special)
        if not vocab:
            raise ValueError("the tokenizer's vocabulary has no token besides its special tokens: nothing to draw "
                             "replacements from")
        self.candidates = torch.tensor(vocab, dtype=torch.long)  # (V',) ids a replacement is drawn from

    def __repr__(self) -> str:
        return (f"ReplacedTokenCollator(replace_probability={self.replace_probability}, "
                f"vocabulary={len(self.candidates)} tokens, return_original_ids={self.return_original_ids})")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ReplacedTokenCollator got an empty list of examples")
        if any("labels" in e for e in examples):
            raise ValueError("ReplacedTokenCollator makes the labels itself; got examples that already have "
                             "'labels' (pre-training examples hold only input_ids, attention_mask, token_type_ids)")
        batch = dict(self.pad(examples))
        original = batch["input_ids"]  # (B, L)
        real = ~torch.isin(original, self.special_ids)
        if "attention_mask" in batch:
            real &= batch["attention_mask"].bool()
        probability = torch.full(original.shape, self.replace_probability).masked_fill_(~real, 0.0)
        selected = torch.bernoulli(probability).bool()  # (B, L)
        draws = self.candidates[torch.randint(len(self.candidates), original.shape)]  # (B, L)
        corrupted = torch.where(selected, draws, original)
        labels = (corrupted != original).long().masked_fill_(~real, IGNORE_INDEX)
        batch["input_ids"], batch["labels"] = corrupted, labels
        if self.return_original_ids:
            batch["original_input_ids"] = original
        return batch


# ---------------------------------------------------------------------------------------------
# Description
# ---------------------------------------------------------------------------------------------

def corpus_stats(dataset) -> dict:
    """``{"examples", "tokens", "mean_length", "min_length", "max_length"}`` of a tokenized corpus.

    ``tokens`` counts every token of every example, special tokens included (the sum of the
    lengths of ``input_ids``); ``mean_length`` is ``tokens / examples``. Works on the datasets of
    :func:`load_pretraining_corpus` (read column-wise, fast on millions of examples) and on any
    map-style dataset of dicts with ``input_ids``. An empty dataset raises ValueError.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("corpus_stats: the dataset is empty")
    try:
        import datasets
        import pyarrow.compute as pc
    except ImportError:  # pragma: no cover - datasets is a dependency of the course
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        if "input_ids" not in dataset.column_names:
            raise ValueError(f"corpus_stats needs an input_ids column; the dataset has {dataset.column_names}")
        total, low, high = 0, math.inf, 0
        for batch in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=65536):
            lengths = pc.list_value_length(batch["input_ids"])
            total += pc.sum(lengths).as_py() or 0
            low, high = min(low, pc.min(lengths).as_py()), max(high, pc.max(lengths).as_py())
    else:
        lengths = [len(dataset[i]["input_ids"]) for i in range(n)]
        total, low, high = sum(lengths), min(lengths), max(lengths)
    return {"examples": n, "tokens": int(total), "mean_length": total / n, "min_length": int(low),
            "max_length": int(high)}
