"""Offline English text for the Transformer chapters: sentences, splits, a tokenizer, labelled tasks.

The text is the Python documentation that ships with every Python: the standard library's
``pydoc_data.topics.topics`` (the pages ``help("if")`` shows), a dict of about 80 topics ->
plain text. Nothing is downloaded.

* :func:`load_sentences` cleans it into about 1,800 English sentences (the rule is in its
  docstring); :func:`load_sentence_records` keeps where each one came from (topic, paragraph,
  next sentence of the same paragraph).
* :func:`text_splits` splits them by topic into train / val / test, deterministically.
* :func:`train_wordpiece_tokenizer` trains a small BERT-style WordPiece tokenizer on them (cached
  in a folder when you give one); :func:`load_tokenizer` loads a saved folder (or a Hub name).
* :func:`load_text_task` builds one of the labelled tasks (:data:`TEXT_TASKS`) as padded,
  ``transformers``-collated dict batches with ``labels``, ready for ``mux.group``:

  - ``word_order`` (one sentence -> 2 classes): is this the original word order, or were two
    adjacent words swapped?
  - ``next_sentence`` (a pair -> 2 classes): does the second sentence follow the first in the
    documentation, or is it a random sentence from another topic?
  - ``negation`` (one sentence -> 2 classes): does the sentence contain a negation word
    (``not``, ``no``, ``never``, ...)? Balanced by leaving out sentences of the larger class.
  - ``casing`` (one label per word, 4 classes): the words are given lower-cased; recover how
    each was written (lower, Capitalised, UPPER, mixed).
  - ``retrieval`` (one label per token, the vocabulary): the sentence itself, each token
    labelled with its own id: the targets of T-MUX's token-retrieval warm-up.

The documentation differs a little between Python versions, so the counts quoted in the
docstrings (measured on Python 3.11) may differ by a few percent on yours.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from mux.grouping import IGNORE_INDEX  # -100: positions that are not scored

__all__ = [
    "TEXT_TASKS",
    "encode_texts",
    "looks_like_path",
    "SentenceRecord",
    "TextSplits",
    "TextTask",
    "load_sentence_records",
    "load_sentences",
    "text_splits",
    "train_wordpiece_tokenizer",
    "load_tokenizer",
    "load_text_task",
    "negation_ceiling",
    "bag_of_tokens_floor",
]


TEXT_TASKS = ("word_order", "next_sentence", "negation", "casing", "retrieval")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

MIN_WORDS, MAX_WORDS = 5, 40

# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------

# A sentence ends at ".", "!" or "?" (possibly followed by a closing quote or bracket), followed by
# white space and then an upper-case letter, a quote or an opening bracket.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[A-Z\"'(\[])")
# Lines that are not prose: an underline of a heading, or a reST directive / markup line.
_UNDERLINE = re.compile(r"^[*=\-~^#+]{3,}\s*$")
_MARKUP = re.compile(r"^(\.\.\s|:[A-Za-z-]+:|\[\d+\]|\+[-=+]+\+|\|)")
# The marker of a list item: "* ", "- ", "1. ", "(1) ".
_BULLET = re.compile(r"^(\s*)([*\-]|\d+\.|\(\d+\))\s+")
# Marks of code in an indented block: grammar rules, braces, comments, assignments, a line that
# starts with a Python keyword, ends with ":" or ";", or is a call.
_CODE = re.compile(r"::=|[{}#]|\s=\s|:$|;$|\w\(.*\)$|^\w+(\.\w+)*\("
                   r"|^\s*(def|class|return|import|from|if|elif|else|for|while|with|try|except|raise"
                   r"|yield|lambda|async|await|print)\b", re.M)


@dataclass(frozen=True)
class SentenceRecord:
    """One cleaned sentence and where it came from.

    ``paragraph`` numbers the paragraphs of the whole corpus; ``next`` is the index (in the list
    :func:`load_sentence_records` returns) of the sentence that directly follows this one in the
    same paragraph, or None when there is none (last sentence, or the next one was dropped).
    """

    text: str
    topic: str
    paragraph: int
    next: int | None


def _prose_paragraphs(page: str) -> list[str]:
    """The prose paragraphs of one documentation page, each as a single line of text."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", page):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines or any(_UNDERLINE.match(line) for line in lines):
            continue  # empty, or a heading (a line followed by an underline)
        if any(line.lstrip().startswith((">>>", "...")) or _MARKUP.match(line.lstrip()) for line in lines):
            continue  # an interactive session or reST markup
        bullet = _BULLET.match(lines[0])
        if bullet:  # a list item: replace its marker by spaces, so its lines line up
            lines[0] = " " * bullet.end() + lines[0][bullet.end():]
        if (len(lines) > 1 and not lines[0][0].isspace() and all(x[0].isspace() for x in lines[1:])
                and len(lines[0].split()) <= 6 and not lines[0].endswith(".")):
            lines = lines[1:]  # a definition list: drop the term, keep its indented body
        indented = lines[0][0].isspace()
        lines = textwrap.dedent("\n".join(lines)).split("\n")
        if any(line[0].isspace() for line in lines):
            continue  # still indented after dedenting: nested code or grammar
        if indented and _CODE.search("\n".join(lines)):
            continue  # an indented block that looks like code
        paragraphs.append(" ".join(" ".join(lines).split()))  # normalise white space
    return paragraphs


def _split_sentences(paragraph: str) -> list[str]:
    cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(paragraph)] + [len(paragraph)]
    return [paragraph[a:b].strip() for a, b in zip(cuts, cuts[1:]) if paragraph[a:b].strip()]


def _is_clean(sentence: str) -> bool:
    n = len(sentence.split())
    return (MIN_WORDS <= n <= MAX_WORDS and sentence[0].isupper()
            and sentence.rstrip("\"')]").endswith((".", "!", "?")))


_RECORDS: list[SentenceRecord] | None = None


def load_sentence_records() -> list[SentenceRecord]:
    """Every cleaned sentence as a :class:`SentenceRecord` (text, topic, paragraph, next).

    Same sentences, same order as :func:`load_sentences`; the rule is described there.
    The list is built once per process and shared: do not modify it.
    """
    global _RECORDS
    if _RECORDS is None:
        from pydoc_data.topics import topics

        records: list[SentenceRecord] = []
        seen: set[str] = set()
        paragraph = 0
        for topic in sorted(topics):
            for para in _prose_paragraphs(topics[topic]):
                previous = None  # index of the kept sentence just before, in this paragraph
                for sentence in _split_sentences(para):
                    if not _is_clean(sentence) or sentence in seen:
                        previous = None  # a dropped sentence breaks adjacency
                        continue
                    seen.add(sentence)
                    if previous is not None:
                        records[previous] = SentenceRecord(records[previous].text, topic, paragraph,
                                                           len(records))
                    records.append(SentenceRecord(sentence, topic, paragraph, None))
                    previous = len(records) - 1
                paragraph += 1
        _RECORDS = records
    return _RECORDS


def load_sentences(with_topics: bool = False) -> list[str] | list[tuple[str, str]]:
    """Real English sentences from the Python documentation shipped with Python (offline).

    Source: ``pydoc_data.topics.topics``, about 80 documentation topics (``"if"``,
    ``"assignment"``, ``"typesseq"``, ...) -> plain text. The cleaning rule, in order:

    1. Topics in sorted order; each page is split into paragraphs at blank lines.
    2. A paragraph is dropped when it is a heading (a line underlined with ``***`` or ``===``) or
       when any of its lines is code or markup: an indented line (code blocks, grammar rules,
       tables and the continuation of bullet lists are all indented), a line starting with
       ``>>>`` or ``...``, or a reST directive / markup line (``.. note::``, ``:ref:``, ``[1]``
       footnotes, ``+---+`` tables, ``|`` lines).
    3. White space is normalised (a paragraph becomes one line, single spaces).
    4. Sentences are split with a regex: after ``.``, ``!`` or ``?`` (and any closing quote or
       bracket), at white space followed by an upper-case letter, a quote or an opening bracket.
       Known failures: an abbreviation followed by a capital (``e.g. Python``, ``Mr. X``) is
       split in two; a sentence followed by one starting with a lower-case name
       (``... is raised. sys.path is ...``) is not split; inline code such as ``"x.y"`` is kept
       as words.
    5. Kept: sentences of 5 to 40 words (split at white space) that start with an upper-case
       letter and end with ``.``, ``!`` or ``?`` (this drops fragments and sentences that
       introduce a code block with ``:``). Exact duplicates are dropped (the first one is kept).

    Result (Python 3.11): 1,846 sentences, in a fixed order (topic, then position in the page).

    With ``with_topics=True``, returns ``(topic, sentence)`` pairs instead of strings. For the
    paragraph and the next sentence, use :func:`load_sentence_records`.
    """
    records = load_sentence_records()
    if with_topics:
        return [(r.topic, r.text) for r in records]
    return [r.text for r in records]


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

@dataclass
class TextSplits:
    """Train / validation / test sentences, and the topics each split holds."""

    train: list[str]
    val: list[str]
    test: list[str]
    topics: dict[str, list[str]]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must be below 1 to leave training data, got "
                         f"{val_fraction} + {test_fraction} = {val_fraction + test_fraction}")


def _split_records(seed: int, val_fraction: float, test_fraction: float
                   ) -> dict[str, list[SentenceRecord]]:
    """Records of each split (whole topics), in corpus order; see :func:`text_splits`."""
    _check_fractions(val_fraction, test_fraction)
    records = load_sentence_records()
    per_topic = Counter(r.topic for r in records)
    order = sorted(per_topic)
    random.Random(seed).shuffle(order)
    target = {"test": test_fraction * len(records), "val": val_fraction * len(records)}
    taken = {"test": 0, "val": 0}
    assigned: dict[str, str] = {}
    for topic in order:
        assigned[topic] = "train"
        for split in ("test", "val"):
            size = per_topic[topic]
            if size <= target[split] / 2 and taken[split] + size <= target[split]:
                assigned[topic] = split
                taken[split] += per_topic[topic]
                break
    out: dict[str, list[SentenceRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        out[assigned[r.topic]].append(r)
    return out


def text_splits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> TextSplits:
    """Split the sentences of :func:`load_sentences` into train / val / test, by topic.

    Whole topics go to one split: the topics are shuffled with ``seed``; in that order, each topic
    goes to the test split if it fits in what is left of ``test_fraction`` of all sentences, else
    to validation the same way, else to training. A topic larger than half a split's share always
    goes to training, so that validation and test hold several topics. Sizes are therefore a
    little under, not exactly, the fractions.

    Why by topic: the documentation restates itself within a topic (the same rule worded twice,
    a paragraph and its summary, sentences that share long phrases), so a split by sentence would
    put near-copies of test sentences in the training data. A topic split keeps each page,
    with its vocabulary and its near-duplicates, on one side. The price is a small shift of
    subject between splits, which is also what a held-out set should test.

    Deterministic: the same seed gives the same splits; within a split, sentences keep the order
    of :func:`load_sentences`. A fraction outside [0, 1), or two that sum to 1 or more, raises a
    ValueError.
    """
    parts = _split_records(seed, val_fraction, test_fraction)
    return TextSplits(
        train=[r.text for r in parts["train"]],
        val=[r.text for r in parts["val"]],
        test=[r.text for r in parts["test"]],
        topics={k: sorted({r.topic for r in v}) for k, v in parts.items()},
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def _cache_name(sentences: list[str], vocab_size: int, lowercase: bool) -> str:
    digest = hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()[:12]
    return f"wordpiece-{'uncased' if lowercase else 'cased'}-v{vocab_size}-{digest}"


def _train_wordpiece(sentences: list[str], vocab_size: int, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
    # The trainer numbers the pieces in an order that can change from run to run (it iterates over
    # hash maps); renumber them in a fixed order: special tokens (0-4), then the rest sorted.
    # Ids do not change how a text is cut into pieces (longest piece first), only their numbers.
    pieces = [t for t in sorted(tok.get_vocab()) if t not in SPECIAL_TOKENS]
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + pieces)},
                                 unk_token="[UNK]", continuing_subword_prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def train_wordpiece_tokenizer(sentences: list[str], vocab_size: int = 4000, folder=None,
                              lowercase: bool = True):
    """Train a BERT-style WordPiece tokenizer on ``sentences``; a ``transformers`` fast tokenizer.

    The pieces, as in BERT: a BERT normaliser (clean control characters, split Chinese characters,
    lower-case when ``lowercase``), the BERT pre-tokenizer (split at white space and around
    every punctuation character), a WordPiece model (continuation pieces start with ``##``)
    trained with special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), and the BERT
    template: ``[CLS] A [SEP]`` for one sentence, ``[CLS] A [SEP] B [SEP]`` for a pair, with
    ``token_type_ids`` 0 for A and 1 for B. ``vocab_size`` is an upper bound: a small corpus may
    give fewer pieces. Training takes about a second on the course sentences. The pieces are
    numbered in a fixed order (special tokens, then the others sorted), and training twice in one
    process gives the same vocabulary; in a new process, the ``tokenizers`` trainer may break ties
    between equally frequent merges differently (measured: 4 of 3,993 pieces differ at the default
    size), so for an exactly repeatable run, pass ``folder`` and reuse the saved tokenizer.

    Cache: with ``folder``, the tokenizer is saved (``save_pretrained``) into the sub-folder
    ``folder/wordpiece-{uncased|cased}-v{vocab_size}-{hash}``, where ``hash`` is the first 12 hex
    digits of the SHA-256 of the training sentences (joined with newlines). If that sub-folder
    already exists, it is loaded instead of training again; other sentences, another vocabulary
    size or casing give another sub-folder. ``tokenizer.name_or_path`` is that sub-folder.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an integer above {len(SPECIAL_TOKENS)} "
                         f"(the special tokens), got {vocab_size!r}")
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences must be a non-empty list of strings")
    if folder is None:
        return _train_wordpiece(sentences, vocab_size, lowercase)
    target = Path(folder) / _cache_name(sentences, vocab_size, lowercase)
    if (target / "tokenizer.json").is_file():
        return load_tokenizer(target)
    tok = _train_wordpiece(sentences, vocab_size, lowercase)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # all files appear at once, so a half-written cache is never read
    except OSError:  # another process wrote the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(target)


def looks_like_path(name) -> bool:
    """Whether ``name`` names a local file or folder rather than a Hub id (``"owner/name"``)."""
    if isinstance(name, os.PathLike):
        return True
    s = str(name)
    return (os.path.isabs(s) or s.startswith(("./", "../", "~", ".\\")) or s.count("/") > 1
            or os.sep in s and os.sep != "/" or os.path.exists(s))


def load_tokenizer(name_or_folder):
    """Load a tokenizer with ``transformers.AutoTokenizer.from_pretrained``.

    ``name_or_folder`` is a folder written by ``save_pretrained`` (e.g. by
    :func:`train_wordpiece_tokenizer`) or a Hugging Face Hub name such as
    ``"bert-base-uncased"`` (downloaded, so it needs the internet or a filled Hub cache).
    A path (a ``Path``, an absolute path, one starting with ``./``, ``../`` or ``~``, or with more
    than one ``/``) that is not a folder with a tokenizer raises FileNotFoundError naming it.
    """
    from transformers import AutoTokenizer

    if looks_like_path(name_or_folder):
        folder = Path(name_or_folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist; expected a folder "
                                    "written by save_pretrained (e.g. by train_wordpiece_tokenizer)")
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            raise FileNotFoundError(f"folder {str(folder)!r} holds no tokenizer: expected tokenizer.json, "
                                    "tokenizer_config.json or vocab.txt in it")
        return AutoTokenizer.from_pretrained(str(folder))
    try:
        return AutoTokenizer.from_pretrained(str(name_or_folder))
    except OSError as e:
        raise OSError(f"could not load tokenizer {name_or_folder!r}: it is not a folder here and could not "
                      f"be loaded from the Hugging Face Hub (offline?). Original error: {e}") from e


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

class EncodedDataset(Dataset):
    """A map-style dataset of already tokenized examples: each item a dict of lists of ints
    (``input_ids``, ``attention_mask``, ``token_type_ids`` where the tokenizer gives them) and
    ``labels`` (an int, or a list aligned with ``input_ids`` for a token task). ``texts`` keeps the
    raw input (a string, a pair of strings, or a list of words) for inspection."""

    def __init__(self, encodings: dict[str, list], labels: list, texts: list):
        self.encodings, self.labels, self.texts = encodings, labels, texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


@dataclass
class TextTask:
    """A labelled text task: datasets, labels, collator and the majority baseline."""

    train: EncodedDataset
    val: EncodedDataset
    test: EncodedDataset
    num_labels: int
    label_names: list[str]
    collate_fn: object
    majority_baseline: float
    task_type: str  # "sentence" (one label per example) or "token" (one label per word)
    name: str

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _swap_adjacent(words: list[str], rng: random.Random) -> list[str] | None:
    """Swap two adjacent inner words (never the first or the last), choosing a pair that differs."""
    pairs = [i for i in range(1, len(words) - 2) if words[i] != words[i + 1]]
    if not pairs:
        return None
    i = rng.choice(pairs)
    out = list(words)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _word_order(records: list[SentenceRecord], rng: random.Random):
    idx = list(range(len(records)))
    rng.shuffle(idx)
    texts, labels = [], []
    for k, i in enumerate(idx):
        words = records[i].text.split()
        swapped = _swap_adjacent(words, rng) if k % 2 else None
        if k % 2 and swapped is None:
            continue  # cannot be corrupted: leave it out rather than unbalance the labels
        texts.append(" ".join(swapped) if swapped else records[i].text)
        labels.append(0 if swapped else 1)
    return texts, labels


def _next_sentence(records: list[SentenceRecord], all_records: list[SentenceRecord], rng: random.Random):
    topics = {r.topic for r in records}
    if len(topics) < 2:
        raise ValueError("next_sentence needs at least two topics in every split; got "
                         f"{sorted(topics)}: use larger val/test fractions")
    anchors = [r for r in records if r.next is not None]
    rng.shuffle(anchors)
    texts, labels = [], []
    for k, r in enumerate(anchors):
        if k % 2 == 0:
            texts.append((r.text, all_records[r.next].text))
            labels.append(1)
        else:
            while (other := rng.choice(records)).topic == r.topic:
                pass
            texts.append((r.text, other.text))
            labels.append(0)
    return texts, labels


NEGATION_WORDS = frozenset({"not", "no", "never", "cannot", "none", "nothing", "neither", "nor", "nobody", "nowhere"})
_NEGATION_WORD = re.compile(r"[\w']+")  # identifiers such as no_debug_ranges stay one word


def _is_negated(sentence: str) -> bool:
    return any(w.lower() in NEGATION_WORDS or w.lower().endswith("n't") for w in _NEGATION_WORD.findall(sentence))


def negation_ceiling(task, tokenizer) -> dict:
    """How many of a negation task's negated test sentences still show a negation word after truncation.

    ``task`` is the ``"negation"`` :class:`TextTask`; each test sentence is decoded from the token ids
    the model reads (``max_length`` tokens at most), so a negation word cut off by the truncation is
    gone. Returns ``{"negated": ..., "lost": ..., "ceiling": ...}``: the negated test sentences, those
    whose negation word is gone (their label cannot be read from the tokens), and the best test
    accuracy a model can then expect, ``1 - lost / len(task.test)`` (about: it could still guess a
    lost one right).
    """
    if task.name != "negation":
        raise ValueError(f"negation_ceiling reads the 'negation' task, got {task.name!r}")
    negated = [i for i, y in enumerate(task.test.labels) if y == 1]
    texts = [tokenizer.decode(task.test[i]["input_ids"], skip_special_tokens=True) for i in negated]
    lost = sum(not _is_negated(text) for text in texts)
    return {"negated": len(negated), "lost": lost, "ceiling": 1 - lost / len(task.test)}


def bag_of_tokens_floor(task: TextTask, cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> dict:
    """A non-neural baseline for a sentence task: logistic regression on bags of the token ids the models read.

    Each example becomes the counts of its ``input_ids`` (after the same truncation the models see;
    a pair is one bag of both sentences), with scikit-learn's ``CountVectorizer`` (the vocabulary
    from the training split) and ``LogisticRegression``. The inverse regularisation ``C`` is chosen
    among ``cs`` by accuracy on the validation split (the first best), then scored on every test
    example. Word order is invisible to it: where it is close to a Transformer, the task is
    mostly about which words occur.

    Returns ``{"accuracy", "correct", "C", "val_accuracy"}``: test accuracy, each test example's
    0/1 result in dataset order (for :func:`mux.stats.paired_difference`), the chosen ``C`` and
    the validation accuracy of every ``C`` tried.
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    if task.task_type != "sentence":
        raise ValueError(f"bag_of_tokens_floor needs a sentence task (one label per example); "
                         f"{task.name!r} is a {task.task_type} task")
    if not cs or any(not (isinstance(c, (int, float)) and c > 0) for c in cs):
        raise ValueError(f"cs must be positive regularisation values C, got {cs!r}")

    def ids(data: EncodedDataset) -> list[list[str]]:
        return [[str(i) for i in row] for row in data.encodings["input_ids"]]

    bags = CountVectorizer(analyzer=lambda tokens: tokens)
    x_train = bags.fit_transform(ids(task.train))
    x_val, x_test = bags.transform(ids(task.val)), bags.transform(ids(task.test))
    fitted, val_accuracy = {}, {}
    for c in cs:
        fitted[c] = LogisticRegression(C=c, max_iter=2000).fit(x_train, task.train.labels)
        val_accuracy[c] = float(fitted[c].score(x_val, task.val.labels))
    best = max(cs, key=lambda c: val_accuracy[c])  # max keeps the first of equals
    correct = [int(p == y) for p, y in zip(fitted[best].predict(x_test), task.test.labels)]
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "C": best, "val_accuracy": val_accuracy}


def _negation(records: list[SentenceRecord], rng: random.Random):
    by_label = {1: [r.text for r in records if _is_negated(r.text)], 0: [r.text for r in records if not _is_negated(r.text)]}
    keep = min(len(v) for v in by_label.values())
    pairs = [(t, y) for y, texts in by_label.items() for t in rng.sample(texts, keep)]
    rng.shuffle(pairs)
    return [t for t, _ in pairs], [y for _, y in pairs]


CASING_LABELS = ["lower", "Capitalised", "UPPER", "mixed"]
_WORD = re.compile(r"\w+|[^\w\s]")  # a word, or one punctuation character (as BERT splits them)


def _casing_label(word: str) -> int:
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return IGNORE_INDEX
    if word == word.lower():
        return 0
    if len(letters) >= 2 and word == word.upper():
        return 2
    if letters[0].isupper() and word[0] == letters[0] and word[1:] == word[1:].lower():
        return 1
    return 3


def _casing(records: list[SentenceRecord], rng: random.Random):
    texts, labels = [], []
    for r in records:
        words = _WORD.findall(r.text)
        texts.append([w.lower() for w in words])
        labels.append([_casing_label(w) for w in words])
    return texts, labels


def encode_texts(kind: str, tokenizer, texts: list, labels: list, max_length: int) -> EncodedDataset:
    """Tokenise ``texts`` with their ``labels`` for a task of ``kind`` (pair, single, retrieval, words)."""
    if kind == "pair":
        enc = tokenizer([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=max_length)
    elif kind == "single":
        enc = tokenizer(texts, truncation=True, max_length=max_length)
    elif kind == "retrieval":  # each token labelled with its own id; special tokens are not scored
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        special = set(tokenizer.all_special_ids)
        labels = [[IGNORE_INDEX if t in special else t for t in ids] for ids in enc["input_ids"]]
    else:  # words with one label each -> labels on the first sub-token of each word
        enc = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=max_length)
        aligned = []
        for i, word_labels in enumerate(labels):
            row, previous = [], None
            for w in enc.word_ids(i):
                row.append(IGNORE_INDEX if w is None or w == previous else word_labels[w])
                previous = w
            aligned.append(row)
        labels = aligned
    return EncodedDataset({k: list(v) for k, v in enc.items()}, labels, texts)


def load_text_task(name: str, tokenizer, seed: int = 0, max_length: int = 64) -> TextTask:
    """Build one of the tasks in :data:`TEXT_TASKS` from the real sentences.

    Splits come from :func:`text_splits` (``seed``, 10% / 10% of the sentences by topic), and
    ``seed`` also draws the corruptions and pairings below, so a task is deterministic.

    * ``"word_order"`` (sentence task, labels ``["swapped", "original"]``): the sentences of a
      split are shuffled; every other one keeps its words (label 1), the rest have two adjacent
      words swapped (label 0). The swap never moves the first or the last word (which carry the
      capital letter and the final full stop, cues too easy to spot) and always swaps two
      different words; a sentence with no such pair is left out. Each sentence appears once,
      either original or swapped. About half of each label.
    * ``"next_sentence"`` (sentence-pair task, labels ``["random", "next"]``): each sentence that
      has a next sentence in its paragraph is used once as the first sentence of a pair; every
      other one is paired with that next sentence (label 1), the rest with a random sentence of
      another topic in the same split (label 0). Balanced to within one example.
    * ``"negation"`` (sentence task, labels ``["affirmative", "negated"]``): label 1 when the
      sentence contains a word of :data:`NEGATION_WORDS` (``not``, ``no``, ``never``, ``cannot``,
      ``none``, ``nothing``, ``neither``, ``nor``, ``nobody``, ``nowhere``) or a word ending in
      ``n't``, whatever its case; else 0. A keyword rule, so a perfect model reaches 100%; what it
      tests is whether one instance's [CLS] state still holds a fact about one of its words after
      N sentences were mixed. Each split keeps all sentences of the smaller class (about a
      fifth are negated) and as many, drawn at random, of the larger: balanced, half each.
    * ``"casing"`` (token task, labels :data:`CASING_LABELS`): the sentence is split into words
      and punctuation characters, and given lower-cased; each word is labelled by how it was
      written: ``lower``, ``Capitalised`` (first letter upper, rest lower, e.g. ``Python``, ``I``),
      ``UPPER`` (two or more letters, all upper: ``ASCII``) or ``mixed`` (anything else:
      ``NameError``). The label sits on the first sub-token of each word; other sub-tokens,
      ``[CLS]``/``[SEP]``, and words without a letter (punctuation, numbers) get -100
      (``IGNORE_INDEX``: not scored), the standard token-classification convention.
    * ``"retrieval"`` (token task, one label per token, ``num_labels`` = the vocabulary): each
      sentence of the split as it is, every token labelled with its own id, special tokens
      ([CLS], [SEP]) with -100: what T-MUX's token-retrieval warm-up must recover from the
      mixture (``mux.retrieval_loss``). Its ``majority_baseline`` is the share of the most
      frequent token.

    Inputs longer than ``max_length`` tokens (special tokens included) are truncated (pairs: the
    longer sentence first). ``tokenizer`` must be a fast ``transformers`` tokenizer with a pad
    token, e.g. from :func:`train_wordpiece_tokenizer` or :func:`load_tokenizer`.

    ``majority_baseline`` is the accuracy, on the test split, of always predicting the most frequent
    label of that split (for ``casing``: over the scored tokens, after truncation).
    ``collate_fn`` pads a list of items into a dict of tensors: ``DataCollatorWithPadding`` for
    sentence tasks, ``DataCollatorForTokenClassification`` (labels padded with -100) for ``casing``.
    """
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; expected one of {list(TEXT_TASKS)}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an integer >= 4 (room for [CLS], [SEP] and words), got {max_length!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"load_text_task needs a fast transformers tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building a task")

    parts = _split_records(seed, 0.1, 0.1)
    all_records = load_sentence_records()
    datasets = {}
    for k, (split, records) in enumerate(parts.items()):
        rng = random.Random(f"{name}-{seed}-{split}")
        if name == "word_order":
            texts, labels = _word_order(records, rng)
            kind = "single"
        elif name == "next_sentence":
            texts, labels = _next_sentence(records, all_records, rng)
            kind = "pair"
        elif name == "negation":
            texts, labels = _negation(records, rng)
            kind = "single"
        elif name == "casing":
            texts, labels = _casing(records, rng)
            kind = "words"
        else:
            texts, labels = [r.text for r in records], None
            kind = "retrieval"
        datasets[split] = encode_texts(kind, tokenizer, texts, labels, max_length)

    if name == "retrieval":
        label_names, task_type = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), "token"
        collate_fn = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
        test_labels = [y for row in datasets["test"].labels for y in row if y != IGNORE_INDEX]
    elif name == "casing":
        label_names, task_type = list(CASING_LABELS), "token"
        collate_fn = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
        test_labels = [y for row in datasets["test"].labels for y in row if y != IGNORE_INDEX]
    else:
        label_names = {"word_order": ["swapped", "original"], "next_sentence": ["random", "next"],
                       "negation": ["affirmative", "negated"]}[name]
        task_type = "sentence"
        collate_fn = DataCollatorWithPadding(tokenizer)
        test_labels = datasets["test"].labels
    majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)
    return TextTask(train=datasets["train"], val=datasets["val"], test=datasets["test"],
                    num_labels=len(label_names), label_names=label_names, collate_fn=collate_fn,
                    majority_baseline=majority, task_type=task_type, name=name)
