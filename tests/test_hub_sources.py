"""The Hub datasets the loaders name can be loaded by datasets >= 4, and a bad one fails first (data_utils.hub).

No test reaches the Hub: its answers come from a fake ``HfApi``, or from the saved description
``data_utils/hub_repos.json`` when the Hub is made unreachable.
"""
import datetime

import pytest

import data_utils.corpus as corpus
import data_utils.glue as glue
import data_utils.hub as hub
from data_utils.corpus import HubCorpus, load_pretraining_corpus
from data_utils.hub import PARQUET_EXPORT, check_hub_dataset, classify_repo_files, saved_hub_entry, saved_hub_repos
from data_utils.images import DatasetUnavailableError
from data_utils.text import text_splits, train_wordpiece_tokenizer


def loader_sources():
    """(repo, revision, config) of every Hub dataset the loaders name, read from their tables."""
    sources = [(h.repo, h.revision, h.config) for h in corpus.HUB_CORPORA.values()]
    sources += [(glue.GLUE_HUB_PATH, None, name) for name in glue.GLUE_TASKS]
    return sources


def hub_error(cls, message):
    """An instance of a huggingface_hub error without an HTTP response (``except`` only needs the class)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.response = None
    return err


class FakeApi:
    """``HfApi`` with a fixed listing per repository; a repository not in it is missing."""

    listings: dict = {}
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def list_repo_files(self, repo_id, *, repo_type=None, revision=None, token=None):
        from huggingface_hub.errors import RepositoryNotFoundError

        FakeApi.calls.append((repo_id, repo_type, revision))
        if repo_id not in self.listings:
            raise hub_error(RepositoryNotFoundError, f"404 Repository Not Found for url: .../{repo_id}")
        return list(self.listings[repo_id])


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub reachable, answered by :class:`FakeApi`; returns the dict of listings to fill."""
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "listings", {
        "someone/scripted": [".gitattributes", "README.md", "scripted.py"],
        "someone/both": ["README.md", "both.py", "data/train-00000-of-00001.parquet"],
        "someone/card": [".gitattributes", "README.md"],
        "someone/texts": ["README.md", "data/train.jsonl.gz", "data/validation.jsonl.gz"],
    })
    monkeypatch.setattr(FakeApi, "calls", [])
    return FakeApi


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub unreachable: asking it would fail the test."""
    import huggingface_hub

    class Unreachable:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the Hub was asked although it cannot be reached")

    monkeypatch.setattr(hub, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_wordpiece_tokenizer(text_splits(seed=0).train, vocab_size=300,
                                     folder=tmp_path_factory.mktemp("tokenizer"))


# --- (a) the saved description covers every source the loaders name ---------------------------

def test_every_loader_source_is_described_and_not_script_only():
    for repo, revision, config in loader_sources():
        entry = saved_hub_entry(repo, revision)
        assert entry is not None, f"hub_repos.json does not describe {repo!r} at revision {revision or 'main'!r}"
        assert entry["exists"] is True, repo
        assert entry["script_only"] is False, (
            f"{repo!r} at revision {revision or 'main'!r}, which a loader uses, holds only a loading script: "
            "datasets >= 4 refuses it")
        configs = entry.get("configs")
        assert configs is None or (config or "default") in configs, (repo, config, configs)


def test_saved_entries_say_when_and_on_what_they_rest():
    entries = saved_hub_repos()
    assert len({(e["repo"], e["revision"]) for e in entries}) == len(entries)  # one entry per revision
    for e in entries:
        assert {"repo", "revision", "exists", "script_only", "checked", "source"} <= set(e), e
        datetime.date.fromisoformat(e["checked"])
        assert isinstance(e["source"], str) and len(e["source"]) > 40, e["repo"]
        if e.get("files"):  # a listing, when given, agrees with the verdict
            assert classify_repo_files(e["repo"], e["files"])["script_only"] == e["script_only"]
    # what issue 20 found: bookcorpus's default branch is script-only, its Parquet export is not
    assert saved_hub_entry("bookcorpus/bookcorpus")["script_only"] is True
    assert saved_hub_entry("bookcorpus/bookcorpus", PARQUET_EXPORT)["script_only"] is False


def test_bookcorpus_is_read_from_its_parquet_export():
    assert corpus.HUB_CORPORA["bookcorpus"] == HubCorpus("bookcorpus/bookcorpus", None, PARQUET_EXPORT)


def test_classify_repo_files():
    assert classify_repo_files("a/b", ["b.py", "README.md"]) == {"script": "b.py", "data_files": 0,
                                                                  "script_only": True}
    assert classify_repo_files("a/b", ["b.py", "x.parquet"])["script_only"]  # datasets refuses b.py anyway
    assert classify_repo_files("a/b", ["README.md", ".gitattributes"])["script_only"]  # nothing to read
    for data in ("train.parquet", "d/train.jsonl.gz", "x.csv", "t.txt.bz2", "a.arrow", "s.tsv.zst", "z.zip"):
        assert not classify_repo_files("a/b", ["README.md", "helper.py", data])["script_only"], data


# --- (b) the check: the Hub's answer, or the saved description without it ---------------------

def test_check_refuses_a_script_only_repository(fake_hub):
    with pytest.raises(DatasetUnavailableError,
                       match=r"corpus source 'scripted': the Hub dataset 'someone/scripted' \(revision 'main'\) holds "
                             r"the loading script scripted\.py and no data files \(as listed by the Hub now\).*"
                             r"no longer runs loading scripts.*What to do: load its Parquet export instead "
                             r"\(revision='refs/convert/parquet'.*local files"):
        check_hub_dataset("someone/scripted", source="corpus source 'scripted'",
                          alternative="use local files.")
    assert fake_hub.calls == [("someone/scripted", "dataset", None)]
    with pytest.raises(DatasetUnavailableError, match=r"'someone/both'.*loading script both\.py \("):
        check_hub_dataset("someone/both")
    with pytest.raises(DatasetUnavailableError, match=r"'someone/card'.*holds no data file"):
        check_hub_dataset("someone/card")


def test_check_refuses_a_missing_repository(fake_hub):
    with pytest.raises(DatasetUnavailableError,
                       match=r"GLUE task 'rte': the Hugging Face Hub has no dataset 'someone/gone' \(configuration "
                             r"'rte', revision 'main'\) \(repository not found\).*huggingface\.co/datasets/someone/gone"
                             r".*data_dir"):
        check_hub_dataset("someone/gone", config="rte", source="GLUE task 'rte'",
                          alternative="pass data_dir=a folder of its files.")


def test_check_passes_a_repository_of_data_files(fake_hub):
    assert check_hub_dataset("someone/texts") == "hub"
    assert check_hub_dataset("someone/texts", revision=PARQUET_EXPORT) == "hub"
    assert fake_hub.calls[-1] == ("someone/texts", "dataset", PARQUET_EXPORT)


def test_unreachable_hub_uses_the_saved_description(no_hub):
    assert check_hub_dataset("bookcorpus/bookcorpus", PARQUET_EXPORT) == "saved"
    assert check_hub_dataset("nyu-mll/glue", None, "rte") == "saved"
    with pytest.raises(DatasetUnavailableError, match=r"'bookcorpus/bookcorpus' \(revision 'main'\) holds the loading "
                                                      r"script bookcorpus\.py.*saved description.*hub_repos\.json.*"
                                                      r"could not be reached.*refs/convert/parquet"):
        check_hub_dataset("bookcorpus/bookcorpus")
    assert check_hub_dataset("someone/not-described") == "unchecked"  # datasets and its cache decide


def test_offline_mode_uses_the_saved_description_without_asking(no_hub, monkeypatch):
    monkeypatch.setattr(hub, "_hub_reachable", lambda *a, **k: pytest.fail("probed the Hub in offline mode"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="HF_HUB_OFFLINE is set"):
        check_hub_dataset("bookcorpus/bookcorpus")
    assert check_hub_dataset("wikimedia/wikipedia", None, "20231101.en") == "saved"


def test_a_failing_listing_falls_back_on_the_saved_description(fake_hub, monkeypatch):
    def broken(self, *args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(fake_hub, "list_repo_files", broken)
    assert check_hub_dataset("bookcorpus/bookcorpus", PARQUET_EXPORT) == "saved"
    with pytest.raises(DatasetUnavailableError, match=r"could not be asked \(ConnectionError\)"):
        check_hub_dataset("bookcorpus/bookcorpus")


# --- (c) the loaders check before they read ---------------------------------------------------

def _recording_load_dataset(monkeypatch):
    import datasets

    calls = []

    def load(repo, config=None, split=None, streaming=False, cache_dir=None, revision=None, **kwargs):
        calls.append((repo, config, revision))
        rows = {"text": ["The cat sat on the mat. " * 20, "A dog barked at the mailman. " * 20]}
        ds = datasets.Dataset.from_dict(rows)
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


def test_bookcorpus_passes_the_parquet_revision(tokenizer, no_hub, monkeypatch):
    calls = _recording_load_dataset(monkeypatch)
    ds = load_pretraining_corpus("bookcorpus", tokenizer, max_length=16)
    assert calls == [("bookcorpus/bookcorpus", None, PARQUET_EXPORT)] and len(ds) > 0


def test_a_script_only_part_fails_before_wikipedia_streams(tokenizer, fake_hub, monkeypatch):
    calls = _recording_load_dataset(monkeypatch)
    fake_hub.listings["wikimedia/wikipedia"] = ["20231101.en/train-00000-of-00041.parquet"]
    with pytest.raises(DatasetUnavailableError, match=r"corpus source 'someone/scripted'.*'someone/scripted'.*"
                                                      r"scripted\.py.*source='offline'"):
        load_pretraining_corpus("wikipedia+someone/scripted", tokenizer, streaming=True, max_examples=10)
    with pytest.raises(DatasetUnavailableError, match=r"corpus source 'someone/gone'.*no dataset 'someone/gone'"):
        load_pretraining_corpus("wikipedia+someone/gone", tokenizer)
    assert calls == []  # nothing was read: not even the Wikipedia part


def test_the_old_bookcorpus_entry_fails_first_offline(tokenizer, no_hub, monkeypatch):
    """Today's failure (issue 20), caught before the Wikipedia part streams and without the Hub."""
    calls = _recording_load_dataset(monkeypatch)
    monkeypatch.setitem(corpus.HUB_CORPORA, "bookcorpus", HubCorpus("bookcorpus/bookcorpus", None))
    with pytest.raises(DatasetUnavailableError, match=r"corpus source 'bookcorpus'.*bookcorpus\.py.*"
                                                      r"refs/convert/parquet"):
        load_pretraining_corpus("wikipedia+bookcorpus", tokenizer, streaming=True, max_examples=10)
    assert calls == []


def test_glue_checks_the_hub_before_loading(fake_hub, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded before the check"))
    monkeypatch.setattr(glue, "GLUE_HUB_PATH", "someone/gone")
    tok = train_wordpiece_tokenizer(["A cat sat on the mat."] * 5, vocab_size=60)
    with pytest.raises(DatasetUnavailableError,
                       match=r"GLUE task 'rte'.*no dataset 'someone/gone'.*dev\.tsv.*data_dir"):
        glue.load_glue_task("rte", tok)
