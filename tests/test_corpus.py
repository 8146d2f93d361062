"""Pre-training corpora and collators (data_utils.corpus): offline, local files, Hub errors, MLM and RTD."""
import json
import math

import pytest
import torch

from data_utils.corpus import (
    HUB_CORPORA,
    ReplacedTokenCollator,
    corpus_stats,
    load_pretraining_corpus,
    mlm_collator,
)
from data_utils.images import DatasetUnavailableError
from data_utils.text import load_text_task, text_splits, train_wordpiece_tokenizer
from mux.grouping import IGNORE_INDEX

VOCAB = 500


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = train_wordpiece_tokenizer(text_splits(seed=0).train, vocab_size=VOCAB,
                                    folder=tmp_path_factory.mktemp("tokenizer"))
    assert tok.is_fast and tok.mask_token == "[MASK]" and tok.pad_token == "[PAD]"
    return tok


@pytest.fixture(scope="module")
def lines(tokenizer):
    """The offline train split, one example per sentence (variable lengths: padding in batches)."""
    return load_pretraining_corpus("offline", tokenizer, max_length=64, pack=False)


def _ids(tokenizer, sentences, **kw):
    return tokenizer(sentences, add_special_tokens=False, **kw)["input_ids"]


# --- offline corpus ---------------------------------------------------------------------------

def test_offline_train_corpus_holds_no_held_out_sentence(tokenizer, lines):
    splits = text_splits(seed=0)
    assert len(lines) == len(splits.train)  # one example per train sentence, in order
    train = {tuple(row) for row in lines["input_ids"]}
    assert train == {tuple(row) for row in tokenizer(splits.train, truncation=True, max_length=64)["input_ids"]}
    held_out = tokenizer(splits.val + splits.test, truncation=True, max_length=64)["input_ids"]
    assert not train & {tuple(row) for row in held_out}
    # the chapter's tasks hold out the same sentences with the same seed
    task = load_text_task("retrieval", tokenizer, seed=0)
    assert set(task.test.texts) == set(splits.test) and set(task.val.texts) == set(splits.val)
    test = load_pretraining_corpus("offline", tokenizer, max_length=64, pack=False, split="test")
    assert len(test) == len(splits.test)


def test_packing_gives_whole_blocks_of_the_concatenated_sentences(tokenizer):
    max_length = 32
    ds = load_pretraining_corpus(tokenizer=tokenizer, max_length=max_length)  # offline, train, pack
    rows = ds["input_ids"]
    assert len(rows) > 100
    for row, mask, types in zip(rows, ds["attention_mask"], ds["token_type_ids"]):
        assert len(row) == max_length and row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
        assert tokenizer.cls_token_id not in row[1:-1] and tokenizer.sep_token_id not in row[1:-1]
        assert set(mask) == {1} and set(types) == {0}
    # the inside of the blocks is the token stream of the sentences, in order, each map batch
    # (1,000 sentences) dropping its short remainder
    train = text_splits(seed=0).train
    expected = []
    for start in range(0, len(train), 1000):
        flat = [t for ids in _ids(tokenizer, train[start:start + 1000]) for t in ids]
        expected += flat[:len(flat) // (max_length - 2) * (max_length - 2)]
    assert [t for row in rows for t in row[1:-1]] == expected
    stats = corpus_stats(ds)
    assert stats == {"examples": len(ds), "tokens": len(ds) * max_length, "mean_length": max_length,
                     "min_length": max_length, "max_length": max_length}


def test_pack_false_truncates(tokenizer):
    ds = load_pretraining_corpus(tokenizer=tokenizer, max_length=12, pack=False, max_examples=50)
    assert len(ds) == 50
    rows = ds["input_ids"]
    assert max(map(len, rows)) == 12 and all(r[0] == tokenizer.cls_token_id and r[-1] == tokenizer.sep_token_id
                                             for r in rows)
    full = tokenizer(text_splits(seed=0).train[:50])["input_ids"]
    assert any(len(f) > 12 for f in full)
    assert all(r == (f if len(f) <= 12 else f[:11] + [tokenizer.sep_token_id]) for r, f in zip(rows, full))
    stats = corpus_stats(ds)
    assert stats["examples"] == 50 and stats["tokens"] == sum(map(len, rows)) and stats["max_length"] == 12


# --- local files ------------------------------------------------------------------------------

TEXT = ["The quick brown fox jumps over the lazy dog.", "A function returns a value to its caller.",
        "Every object has an identity, a type and a value.", "Names refer to objects."]


def test_local_txt_folder(tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT[0] + "\n\n" + TEXT[1] + "\n")
    (folder / "sub" / "b.txt").write_text("   \n" + TEXT[2] + "\n" + TEXT[3] + "\n")
    (folder / "empty.txt").write_text("")
    (folder / "notes.md").write_text("not read")
    kw = dict(tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    ds = load_pretraining_corpus(folder, pack=False, **kw)
    assert ds["input_ids"] == tokenizer(TEXT)["input_ids"]  # blank lines skipped, files in sorted order
    packed = load_pretraining_corpus(str(folder), max_length=8, **kw)
    flat = [t for ids in _ids(tokenizer, TEXT) for t in ids]
    assert len(packed) == len(flat) // 6 and all(len(r) == 8 for r in packed["input_ids"])
    streamed = load_pretraining_corpus(folder / "sub" / "b.txt", pack=False, streaming=True, max_examples=2, **kw)
    assert streamed["input_ids"] == tokenizer(TEXT[2:3])["input_ids"]  # the blank first line counts, is skipped


def test_local_jsonl_with_another_text_column(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(TEXT)))
    kw = dict(tokenizer=tokenizer, cache_dir=tmp_path / "cache", pack=False)
    ds = load_pretraining_corpus(path, text_column="body", **kw)
    assert ds["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert set(ds.column_names) == {"input_ids", "attention_mask", "token_type_ids"}
    assert load_pretraining_corpus(path, text_column="body", max_examples=2, **kw)["input_ids"] == \
        tokenizer(TEXT[:2])["input_ids"]
    streamed = load_pretraining_corpus(path, text_column="body", streaming=True, max_examples=3, **kw)
    assert streamed["input_ids"] == tokenizer(TEXT[:3])["input_ids"]
    with pytest.raises(ValueError, match=r"no text column 'text'.*'id', 'body'"):
        load_pretraining_corpus(path, **kw)
    with pytest.raises(ValueError, match=r"no text column 'text'.*'id', 'body'"):
        load_pretraining_corpus(path, streaming=True, max_examples=2, **kw)
    with pytest.raises(ValueError, match="must hold strings"):
        load_pretraining_corpus(path, text_column="id", **kw)


def test_local_errors(tokenizer, tmp_path):
    kw = dict(tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretraining_corpus(missing, **kw)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_pretraining_corpus("missing.jsonl", **kw)  # an extension makes it a path, not a Hub id
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"holds no text"):
        load_pretraining_corpus(blank, **kw)
    with pytest.raises(ValueError, match=r"holds no text"):
        load_pretraining_corpus(blank, pack=False, **kw)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match=r"holds no text: all its files are empty"):
        load_pretraining_corpus(tmp_path / "empty", **kw)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"holds no text files"):
        load_pretraining_corpus(tmp_path / "nothing", **kw)
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    with pytest.raises(ValueError, match="too few tokens for one block"):
        load_pretraining_corpus(short, max_length=64, **kw)
    with pytest.raises(ValueError, match="streaming=True needs max_examples"):
        load_pretraining_corpus(short, streaming=True, **kw)
    with pytest.raises(ValueError, match="one split"):
        load_pretraining_corpus(short, split="test", **kw)
    with pytest.raises(ValueError, match="splits 'train', 'val' and 'test'"):
        load_pretraining_corpus(tokenizer=tokenizer, split="dev")
    with pytest.raises(ValueError, match="max_length"):
        load_pretraining_corpus(tokenizer=tokenizer, max_length=2)


def test_tokenizer_errors(tokenizer):
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_pretraining_corpus("offline")

    class Slow:
        is_fast = False
        pad_token = mask_token = "x"

    with pytest.raises(ValueError, match="fast transformers tokenizer"):
        load_pretraining_corpus("offline", Slow())
    no_mask = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="[PAD]",
                                      cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    assert no_mask.mask_token is None
    for make in (lambda: load_pretraining_corpus("offline", no_mask), lambda: mlm_collator(no_mask),
                 lambda: ReplacedTokenCollator(no_mask)):
        with pytest.raises(ValueError, match="no mask_token"):
            make()
    with pytest.raises(ValueError, match="mlm_probability"):
        mlm_collator(tokenizer, mlm_probability=1.5)
    with pytest.raises(ValueError, match="replace_probability"):
        ReplacedTokenCollator(tokenizer, replace_probability=0)


# --- Hub --------------------------------------------------------------------------------------

def test_hub_unreachable_gives_a_clear_error(tokenizer, monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError, match=r"'wikimedia/wikipedia \(20231101\.en\)'.*Hub could not be "
                                                      r"reached.*local files"):
        load_pretraining_corpus("wikipedia", tokenizer)
    assert calls == [HUB_CORPORA["wikipedia"][:2]]
    with pytest.raises(DatasetUnavailableError, match="'someone/corpus'"):
        load_pretraining_corpus("someone/corpus", tokenizer, streaming=True, max_examples=10)


def test_hub_parts_are_concatenated(tokenizer, monkeypatch):
    import datasets

    fake = {"wikimedia/wikipedia": datasets.Dataset.from_dict({"id": ["1", "2"], "title": ["a", "b"],
                                                               "text": TEXT[:2]}),
            "bookcorpus/bookcorpus": datasets.Dataset.from_dict({"text": TEXT[2:]})}
    seen = []

    def load(repo, config=None, split=None, streaming=False, cache_dir=None, revision=None):
        seen.append((repo, config, split, streaming, revision))
        return fake[repo].to_iterable_dataset() if streaming else fake[repo]

    monkeypatch.setattr(datasets, "load_dataset", load)
    ds = load_pretraining_corpus("wikipedia+bookcorpus", tokenizer, pack=False)
    assert ds["input_ids"] == tokenizer(TEXT)["input_ids"]
    # bookcorpus: the Hub's Parquet export (its default branch holds only a loading script)
    assert seen == [("wikimedia/wikipedia", "20231101.en", "train", False, None),
                    ("bookcorpus/bookcorpus", None, "train", False, "refs/convert/parquet")]
    # max_examples is shared between the parts; streaming takes the first documents of each
    for streaming in (False, True):
        ds = load_pretraining_corpus("wikipedia+bookcorpus", tokenizer, pack=False, max_examples=3, streaming=streaming)
        assert ds["input_ids"] == tokenizer([TEXT[0], TEXT[1], TEXT[2]])["input_ids"]


# --- collators --------------------------------------------------------------------------------

def _within(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    """Is ``count`` out of ``total`` Bernoulli(p) draws within ``sigmas`` standard deviations of p?"""
    return abs(count - p * total) <= sigmas * math.sqrt(total * p * (1 - p))


def _special(tokenizer, ids):
    return torch.isin(ids, torch.tensor(tokenizer.all_special_ids))


def test_mlm_collator_masks_15_percent_80_10_10(tokenizer, lines):
    from transformers import DataCollatorWithPadding

    examples = [lines[i] for i in range(len(lines))]
    original = DataCollatorWithPadding(tokenizer)(examples)["input_ids"]
    torch.manual_seed(0)
    batch = mlm_collator(tokenizer)(examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    assert ids.shape == labels.shape == original.shape and (mask == (original != tokenizer.pad_token_id)).all()
    eligible = mask & ~_special(tokenizer, original)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~eligible).any()  # padding and special tokens are never selected
    assert (labels[selected] == original[selected]).all()  # the original token where selected
    assert (ids[~selected] == original[~selected]).all()  # nothing else changed
    n = int(selected.sum())
    assert _within(n, int(eligible.sum()), 0.15)
    masked = int((ids[selected] == tokenizer.mask_token_id).sum())
    kept = int((ids[selected] == original[selected]).sum())
    assert _within(masked, n, 0.8)
    assert _within(kept, n, 0.1 + 0.1 / len(tokenizer))  # unchanged, or a random draw of the same token
    assert _within(n - masked - kept, n, 0.1 * (1 - 1 / len(tokenizer)))


def test_replaced_token_collator(tokenizer, lines):
    examples = [lines[i] for i in range(len(lines))]
    collator = ReplacedTokenCollator(tokenizer, return_original_ids=True)
    torch.manual_seed(0)
    batch = collator(examples)
    ids, labels, original = batch["input_ids"], batch["labels"], batch["original_input_ids"]
    mask = batch["attention_mask"].bool()
    assert ids.shape == labels.shape == original.shape and labels.dtype == torch.long
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "original_input_ids"}
    eligible = mask & ~_special(tokenizer, original)
    assert ((labels == IGNORE_INDEX) == ~eligible).all()  # -100 exactly on padding and special tokens
    assert (ids[~eligible] == original[~eligible]).all()  # which are never replaced
    assert ((labels == 1) == (ids != original)).all()  # 1 exactly where the token changed
    assert not _special(tokenizer, ids[eligible]).any()  # no special token is drawn as a replacement
    vocab = len(tokenizer) - len(set(tokenizer.all_special_ids))
    assert _within(int((labels == 1).sum()), int(eligible.sum()), 0.15 * (1 - 1 / vocab))
    replaced = ids[labels == 1]
    assert len(set(replaced.tolist())) > vocab // 2  # drawn from the whole vocabulary
    # deterministic under torch.manual_seed, and the default leaves the original ids out
    torch.manual_seed(0)
    again = ReplacedTokenCollator(tokenizer)(examples)
    assert "original_input_ids" not in again
    assert all(torch.equal(again[k], batch[k]) for k in again)
    assert not torch.equal(ReplacedTokenCollator(tokenizer)(examples)["input_ids"], ids)
    with pytest.raises(ValueError, match="already have 'labels'"):
        collator([{**examples[0], "labels": 1}])
