"""T-MUX (chapter 02): shapes, padding, the index prefix and demultiplexer, retrieval, training, checkpoints.

Most tests use a tokenizer-free tiny model (``TMUXConfig(vocab_size=..., special_token_ids=...)``);
those that need a tokenizer train a small WordPiece one once per session.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

import mux
from mux.models.tmux import TMUXConfig, TMUXModel

from text_batches import CLS, MASK, PAD, SEP, SPECIAL, UNK, V, sentences  # noqa: F401
from text_batches import random_lengths as _random_lengths

MAX_LENGTH = 12
TINY = dict(hidden_size=16, num_layers=1, num_heads=2, max_length=MAX_LENGTH, dropout=0.0)


def config(n=2, task="sentence", **kw) -> TMUXConfig:
    fields = dict(vocab_size=V, n_mux=n, task=task, num_labels=0 if task == "retrieval" else 3,
                  pad_token_id=PAD, special_token_ids=SPECIAL, **TINY)
    fields.update(kw)
    return TMUXConfig(**fields)


def tiny(n=2, task="sentence", seed=0, **kw) -> TMUXModel:
    """A seeded tiny model in eval mode (dropout 0)."""
    torch.manual_seed(seed)
    return TMUXModel(config(n, task, **kw)).eval()


def random_lengths(m, seed=0, low=2, high=9):
    return _random_lengths(m, seed, low, high)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Two small WordPiece tokenizers of different sizes, trained on the course's training sentences."""
    from data_utils.text import text_splits, train_wordpiece_tokenizer

    folder = tmp_path_factory.mktemp("tokenizers")
    train = text_splits().train
    return (train_wordpiece_tokenizer(train, vocab_size=100, folder=folder),
            train_wordpiece_tokenizer(train, vocab_size=200, folder=folder))


@pytest.fixture(scope="session")
def tok(tokenizers):
    return tokenizers[0]


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_output_shapes_for_many_n_and_odd_batch_sizes(n):
    length, classes = 9, {"sentence": 3, "token": 4, "retrieval": V}
    for task, c in classes.items():
        model = tiny(n, task, num_labels=0 if task == "retrieval" else c)
        for m in {1, 2 * n + 1}:  # not a multiple of N (but for N = 1)
            x = sentences(random_lengths(m, seed=m, high=length), width=length, seed=m)
            expected = {"sentence": (m, c), "token": (m, length, c), "retrieval": (m, length, V)}[task]
            with torch.no_grad():
                out = mux.multiplexed_forward(model, x, n)
                assert set(out) == {"logits"} and tuple(out["logits"].shape) == expected
                x["token_type_ids"] = torch.zeros_like(x["input_ids"])
                out = mux.multiplexed_forward(model, {**x, "return_retrieval": True}, n)
            assert set(out) == {"logits", "retrieval_logits", "retrieval_labels"}
            assert tuple(out["logits"].shape) == expected
            assert tuple(out["retrieval_logits"].shape) == (m, length, V)
            assert tuple(out["retrieval_labels"].shape) == (m, length)
            assert out["retrieval_labels"].dtype == torch.long
            if task == "retrieval":
                assert torch.equal(out["logits"], out["retrieval_logits"])


def test_grouped_forward_returns_one_output_per_instance():
    model = tiny(3, "token", num_labels=4)
    x = mux.group(sentences([5, 7, 3, 4, 6, 2], width=7), 3)
    with torch.no_grad():
        out = model(**x, return_retrieval=True)
    assert out["logits"].shape == (2, 3, 7, 4)
    assert out["retrieval_logits"].shape == (2, 3, 7, V) and out["retrieval_labels"].shape == (2, 3, 7)
    vanilla = tiny(1, "sentence", vanilla=True)
    with torch.no_grad():
        assert vanilla(**mux.group(sentences([5, 7, 3]), 1))["logits"].shape == (3, 1, 3)


# ---------------------------------------------------------------- padding


def _outputs(model, batch, n):
    with torch.no_grad():
        return model(**mux.group(batch, n), return_retrieval=True)


@pytest.mark.parametrize("n, vanilla", [(1, True), (1, False), (2, False), (3, False)])
def test_positions_where_every_instance_is_padding_are_never_attended(n, vanilla):
    model = tiny(n, "token", num_labels=4, vanilla=vanilla)
    x = sentences(([6, 8, 5] * 2)[: 2 * n], width=MAX_LENGTH)  # columns 8.. are padding in every instance
    x["attention_mask"][:, 3] = 0  # and one inner column too
    all_padding = ~mux.group(x["attention_mask"], n).bool().any(dim=1)  # (B, L)
    real = mux.group(x["attention_mask"], n).bool()  # (B, N, L)
    assert all_padding[:, 3].all() and all_padding[:, 8:].all() and real.any()

    y = {k: v.clone() for k, v in x.items()}
    grouped = mux.group(y["input_ids"], n)  # a view: writes go to y
    g = torch.Generator().manual_seed(1)
    where = all_padding[:, None, :].expand_as(grouped)
    grouped[where] = torch.randint(len(SPECIAL), V, (int(where.sum()),), generator=g)
    assert not torch.equal(x["input_ids"], y["input_ids"])
    # ... and the embeddings of what sits there: the [PAD] row and the positions of those columns
    other = copy.deepcopy(model)
    emb = other.backbone.embeddings
    rows = [model.config.prefix_length + t for t in range(MAX_LENGTH) if all_padding[:, t].all()]
    with torch.no_grad():
        emb.word_embeddings.weight[PAD] += 3.0
        emb.position_embeddings.weight[rows] += 3.0

    a, b = _outputs(model, x, n), _outputs(other, y, n)
    assert_close(a["logits"][real], b["logits"][real])
    keep = torch.arange(V) != PAD  # the retrieval head is tied to the word embeddings: column PAD moved
    assert_close(a["retrieval_logits"][real][:, keep], b["retrieval_logits"][real][:, keep])
    assert torch.equal(a["retrieval_labels"], b["retrieval_labels"])
    # T-MUX zeroes padding in the mixture before the encoder, so the changes above cannot reach it; the
    # trailing all-padding columns must not be attended either: without them, the same outputs
    short = _outputs(model, {k: v[:, :8] for k, v in x.items()}, n)
    assert_close(a["logits"][..., :8, :][real[..., :8]], short["logits"][real[..., :8]])
    assert_close(a["retrieval_logits"][..., :8, :][real[..., :8]], short["retrieval_logits"][real[..., :8]])

    # the comparison is sensitive: one real token changed does move the outputs
    z = {k: v.clone() for k, v in x.items()}
    z["input_ids"][0, 1] = (z["input_ids"][0, 1] + 1 - len(SPECIAL)) % (V - len(SPECIAL)) + len(SPECIAL)
    assert not torch.allclose(a["logits"][real], _outputs(model, z, n)["logits"][real])


@pytest.mark.parametrize("n", [2, 3])
def test_padding_of_one_instance_does_not_leak_into_the_mixture(n):
    model = tiny(n, "token", num_labels=4)
    lengths = [4, 9, 6][:n]  # instance 0 is padding at 4..8 where instance 1 is real
    x = sentences(lengths, width=9)
    real = mux.group(x["attention_mask"], n).bool()
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][0, 4:] = torch.arange(4, 9) + 20  # ids that are no padding at all
    a, b = _outputs(model, x, n), _outputs(model, y, n)
    for i in range(n):
        assert_close(a["logits"][:, i][real[:, i]], b["logits"][:, i][real[:, i]])
        assert_close(a["retrieval_logits"][:, i][real[:, i]], b["retrieval_logits"][:, i][real[:, i]])
    assert torch.equal(a["retrieval_labels"], b["retrieval_labels"])
    # whereas a real token of instance 0 does reach instance 1 through the mixture
    z = {k: v.clone() for k, v in x.items()}
    z["input_ids"][0, 1] = 30 if z["input_ids"][0, 1] != 30 else 31
    assert not torch.allclose(a["logits"][:, 1][real[:, 1]], _outputs(model, z, n)["logits"][:, 1][real[:, 1]])


# ---------------------------------------------------------------- the index prefix


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_prefix_layout(n):
    model = tiny(n, "sentence")
    expected = torch.full((n, n), n, dtype=torch.long)  # the filler everywhere ...
    for i in range(n):
        expected[i, i] = i  # ... but instance i's own slot, which holds its index token
    assert torch.equal(model.prefix_ids, expected)
    assert model.prefix_embeddings.weight.shape == (n + 1, 16)
    assert model.backbone.embeddings.position_embeddings.weight.shape[0] == MAX_LENGTH + n
    assert model.config.prefix_length == n
    assert isinstance(model.mux, mux.Multiplexer) and isinstance(model.demux, mux.IndexDemultiplexer)
    assert "prefix_ids" not in model.state_dict()  # derived from N, not saved


def test_vanilla_model_has_no_prefix():
    model = tiny(1, "sentence", vanilla=True)
    assert model.prefix_embeddings is None and model.mux is None and model.demux is None
    # one position row more than it uses: the row of T-MUX N=1's index slot, kept so that both draw the same weights
    assert model.backbone.embeddings.position_embeddings.weight.shape[0] == MAX_LENGTH + 1
    assert model.config.prefix_length == 0
    assert not any(isinstance(m, (mux.Multiplexer, mux.Demultiplexer)) for m in model.modules())
    names = set(model.state_dict())
    assert all(k.split(".")[0] in ("backbone", "retrieval_head", "head") for k in names), names
    assert names <= set(tiny(1, "sentence").state_dict())
    assert "vanilla" in repr(model)


def test_identical_instances_get_different_outputs():
    # only the index prefix tells the N copies apart
    n = 3
    model = tiny(n, "token", num_labels=4)
    one = sentences([7], width=7)
    x = {k: v.repeat(n, 1) for k, v in one.items()}
    out = _outputs(model, x, n)["logits"][0]  # (N, L, C)
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.allclose(out[i], out[j], atol=1e-4), (i, j)


# ---------------------------------------------------------------- the index demultiplexer


def _randomise_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("n, d", [(1, 4), (3, 8), (5, 6)])
def test_index_demultiplexer_equals_the_explicit_formula(n, d):
    torch.manual_seed(n)
    demux = _randomise_(mux.IndexDemultiplexer(n, d))
    b, length = 2, 4
    prefix = torch.randn(b, n, d, requires_grad=True)
    for h in (torch.randn(b, d, requires_grad=True), torch.randn(b, length, d, requires_grad=True)):
        out = demux(h, prefix=prefix)
        assert out.shape == (b, n, *h.shape[1:-1], d)
        hs = h if h.dim() == 3 else h[:, None]
        expected = torch.empty(b, n, hs.shape[1], d)
        for i in range(n):
            for t in range(hs.shape[1]):  # LayerNorm(GELU(Linear(cat([key_i, h_t]))))
                expected[:, i, t] = demux.norm(nn.GELU()(demux.proj(torch.cat([prefix[:, i], hs[:, t]], dim=-1))))
        expected = expected if h.dim() == 3 else expected[:, :, 0]
        assert_close(out, expected)
        target = torch.randn_like(out)
        grads = torch.autograd.grad(((out - target) ** 2).sum(), [h, prefix, *demux.parameters()])
        ref = torch.autograd.grad(((expected - target) ** 2).sum(), [h, prefix, *demux.parameters()])
        for g_out, g_ref in zip(grads, ref):
            assert_close(g_out, g_ref, rtol=1e-4, atol=1e-4)


def test_index_demultiplexer_refuses_a_bad_prefix():
    demux = mux.IndexDemultiplexer(3, 8)
    h = torch.randn(2, 5, 8)
    expected = r"needs prefix=\(B=2, N=3, d=8\)"
    for bad in (None, torch.randn(2, 8), torch.randn(2, 4, 8), torch.randn(2, 3, 7), torch.randn(1, 3, 8),
                torch.randn(2, 3, 8, 1)):
        with pytest.raises(ValueError, match=expected):
            demux(h, prefix=bad)
    with pytest.raises(ValueError, match=r"expects \(B, \.\.\., d=8\)"):
        demux(torch.randn(2, 5, 7), prefix=torch.randn(2, 3, 8))


# ---------------------------------------------------------------- retrieval labels and losses


def test_retrieval_labels_ignore_padding_and_special_tokens():
    model = tiny(2, "retrieval")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, 2, 10), generator=g)
    mask = (torch.rand(3, 2, 10, generator=g) < 0.7).long()
    ids[..., 0], mask[..., 0] = CLS, 1  # special tokens at real positions
    ids[..., 5], mask[..., 5] = SEP, 1
    ids[0, 0, 7], mask[0, 0, 7] = 9, 0  # an ordinary id at a padded position
    expected = ids.clone()
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in ids.shape)).tolist():
        b, i, t = idx
        if mask[b, i, t] == 0 or int(ids[b, i, t]) in SPECIAL:
            expected[b, i, t] = mux.IGNORE_INDEX
    labels = model.retrieval_labels(ids, mask)
    assert torch.equal(labels, expected)
    assert (labels != mux.IGNORE_INDEX).any() and (labels == mux.IGNORE_INDEX).any()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, return_retrieval=True)["retrieval_labels"], expected)
    # without special tokens only the padding is ignored (a real [PAD] id is a target then)
    plain = TMUXModel(config(2, "retrieval", special_token_ids=()))
    ids[0, 0, 1], mask[0, 0, 1] = PAD, 1
    assert torch.equal(plain.retrieval_labels(ids, mask), ids.masked_fill(mask == 0, mux.IGNORE_INDEX))


@pytest.mark.parametrize("n, m", [(2, 5), (3, 7)])
def test_retrieval_loss_is_the_cross_entropy_over_the_scored_tokens(n, m):
    model = tiny(n, "retrieval")
    x = sentences(random_lengths(m, low=3), width=9)
    x["input_ids"][0, 1] = SEP  # a special token at a real position
    batch = {**x, "labels": torch.full_like(x["input_ids"], 7)}  # not used
    terms = mux.retrieval_loss(model, batch, n)
    assert set(terms) == {"loss", "retrieval_acc"}
    # by hand: tuples of N (the last one completed with copies, whose outputs are dropped)
    padded, kept = mux.pad_to_multiple(x, n)
    with torch.no_grad():
        logits = mux.ungroup(model(**mux.group(padded, n))["logits"])[:kept]  # (M, L, V)
    scored = (x["attention_mask"] == 1) & ~torch.isin(x["input_ids"], torch.tensor(SPECIAL))
    targets, scored_logits = x["input_ids"][scored], logits[scored]
    expected = -scored_logits.log_softmax(-1)[torch.arange(len(targets)), targets].mean()
    assert_close(terms["loss"], expected)
    assert_close(terms["retrieval_acc"], (scored_logits.argmax(-1) == targets).float().mean())
    # what the logits and the scored labels do not see does not change the loss
    other = {k: v.clone() for k, v in batch.items()}
    other["labels"] = torch.randint(0, V, other["labels"].shape)
    other["input_ids"][other["attention_mask"] == 0] = 9
    assert_close(mux.retrieval_loss(model, other, n)["loss"], terms["loss"])
    del other["labels"]
    assert_close(mux.retrieval_loss(model, other, n)["loss"], terms["loss"])
    other["input_ids"][1, 1] = 30 if other["input_ids"][1, 1] != 30 else 31  # a scored token does
    assert not torch.allclose(mux.retrieval_loss(model, other, n)["loss"], terms["loss"])
    with pytest.raises(TypeError, match="dict batches"):
        mux.retrieval_loss(model, (x["input_ids"], x["input_ids"]), n)


def test_cross_entropy_and_accuracy():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]]])
    labels = torch.tensor([[0, 0, mux.IGNORE_INDEX]])
    ce, acc = mux.cross_entropy_and_accuracy(logits, labels)
    assert_close(ce, F.cross_entropy(logits[0, :2], labels[0, :2]))
    assert acc.item() == 0.5 and not acc.requires_grad
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        mux.cross_entropy_and_accuracy(logits, torch.full_like(labels, mux.IGNORE_INDEX))


@pytest.mark.parametrize("task", ["sentence", "token"])
def test_task_and_retrieval_loss_is_the_weighted_sum(task):
    n, m = 2, 5
    model = tiny(n, task, num_labels=3)
    x = sentences(random_lengths(m, low=3), width=9)
    g = torch.Generator().manual_seed(0)
    if task == "sentence":
        labels = torch.randint(0, 3, (m,), generator=g)
    else:
        labels = torch.randint(0, 3, x["input_ids"].shape, generator=g).masked_fill(x["attention_mask"] == 0,
                                                                                    mux.IGNORE_INDEX)
    batch = {**x, "labels": labels}
    terms = mux.TaskAndRetrievalLoss(0.7, 0.3)(model, batch, n)
    assert set(terms) == {"loss", "task", "retrieval", "task_acc", "retrieval_acc"}
    assert_close(terms["loss"], 0.7 * terms["task"] + 0.3 * terms["retrieval"])
    assert_close(terms["task"], mux.classification_loss(model, batch, n))
    retrieval = mux.retrieval_loss(model, batch, n)
    assert_close(terms["retrieval"], retrieval["loss"])
    assert_close(terms["retrieval_acc"], retrieval["retrieval_acc"])
    default = mux.TaskAndRetrievalLoss()(model, batch, n)
    assert_close(default["loss"], 0.9 * terms["task"] + 0.1 * terms["retrieval"])


def test_task_and_retrieval_loss_repr_and_bad_weights():
    assert repr(mux.TaskAndRetrievalLoss()) == "TaskAndRetrievalLoss(task_weight=0.9, retrieval_weight=0.1)"
    assert repr(mux.TaskAndRetrievalLoss(1, 0)) == "TaskAndRetrievalLoss(task_weight=1.0, retrieval_weight=0.0)"
    assert repr(mux.TaskAndRetrievalLoss(0.9, 0.1)) == repr(mux.TaskAndRetrievalLoss())
    for bad in (-0.1, "0.5", True, None, float("nan")):
        with pytest.raises(ValueError, match="task_weight"):
            mux.TaskAndRetrievalLoss(task_weight=bad)
        with pytest.raises(ValueError, match="retrieval_weight"):
            mux.TaskAndRetrievalLoss(retrieval_weight=bad)


# ---------------------------------------------------------------- evaluation


def examples(size, task, seed=0):
    """A list of dicts: ids ``[CLS] words [SEP]`` of 3-9 tokens; a sentence label or one per word."""
    x = sentences(random_lengths(size, seed=seed, low=3), width=9, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for ids, mask in zip(x["input_ids"], x["attention_mask"]):
        ids = ids[mask.bool()]
        if task == "sentence":
            label = torch.randint(0, 3, (), generator=g)
        else:
            label = torch.randint(0, 3, ids.shape, generator=g)
            label[0] = label[-1] = mux.IGNORE_INDEX  # [CLS], [SEP]
        out.append({"input_ids": ids, "labels": label})
    return out


def collate(items):
    """Pad to the longest item: [PAD] ids, attention mask 0, token labels IGNORE_INDEX."""
    longest = max(len(e["input_ids"]) for e in items)
    ids = torch.full((len(items), longest), PAD)
    mask = torch.zeros_like(ids)
    token = items[0]["labels"].dim() == 1
    labels = torch.full((len(items), longest), mux.IGNORE_INDEX) if token else torch.stack([e["labels"] for e in items])
    for i, e in enumerate(items):
        k = len(e["input_ids"])
        ids[i, :k], mask[i, :k] = e["input_ids"], 1
        if token:
            labels[i, :k] = e["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# batch sizes (none a multiple of N) whose last batch holds only the incomplete tuple
SAME_TUPLES = {(3, 7): (4, 7, 8), (4, 13): (5, 13, 14)}
# batch sizes whose last batch also holds whole tuples: the incomplete tuple is completed with other copies
OTHER_FILLERS = {(3, 7): (4, 10), (4, 13): (5, 9)}


def _real(data, logits):
    """The logits of every example at its real positions (token tasks), in dataset order."""
    if logits.dim() == 2:
        return logits
    return torch.cat([logits[i, : len(e["input_ids"])] for i, e in enumerate(data)])


@pytest.mark.parametrize("task", ["sentence", "token"])
@pytest.mark.parametrize("n, size", [(3, 7), (4, 13)])
def test_evaluation_gives_one_prediction_per_example(task, n, size):
    model = tiny(n, task)
    data = examples(size, task)
    scores = mux.evaluate(model, data, n, batch_size=n + 1, collate_fn=collate)
    assert scores["n_examples"] == size
    if task == "token":
        assert scores["n_scored"] == sum(len(e["input_ids"]) - 2 for e in data)
    results = {}
    for bs in SAME_TUPLES[(n, size)]:
        logits, labels = mux.predict_logits(model, data, n, batch_size=bs, collate_fn=collate, order_seed=3)
        assert logits.shape[0] == labels.shape[0] == size
        for i, e in enumerate(data):  # labels come back in dataset order
            k = len(e["input_ids"]) if task == "token" else None
            assert torch.equal(labels[i, :k] if k else labels[i], e["labels"])
        results[bs] = _real(data, logits)
    first, *others = results.values()
    for other in others:
        assert_close(other, first)
    assert model.training is False  # put back as it was


@pytest.mark.parametrize("n, size", [(3, 7), (4, 13)])
def test_evaluation_outputs_do_not_depend_on_the_batch_size(n, size):
    model = tiny(n, "sentence")
    data = examples(size, "sentence")
    a, b = (mux.predict_logits(model, data, n, batch_size=bs, collate_fn=collate, order_seed=3)[0]
            for bs in OTHER_FILLERS[(n, size)])
    assert_close(a, b)


# ---------------------------------------------------------------- construction from a tokenizer


def test_build_uses_the_tokenizer(tok, tokenizers):
    model = TMUXModel.build(tok, 2, seed=1, task="token", num_labels=4, **TINY)
    c = model.config
    assert c.vocab_size == len(tok) and c.pad_token_id == tok.pad_token_id and c.mux_seed == 1
    assert set(c.special_token_ids) == set(tok.all_special_ids)
    assert model.backbone.embeddings.word_embeddings.weight.shape[0] == len(tok)
    model.check_tokenizer(tok)
    with pytest.raises(ValueError, match=rf"{len(tokenizers[1])} tokens .* embeds {len(tok)}"):
        model.check_tokenizer(tokenizers[1])
    enc = tok(["The loop ends.", "A function returns a value."], padding=True, truncation=True,
              max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        out = mux.multiplexed_forward(model.eval(), {**enc, "return_retrieval": True}, 2)
    assert out["logits"].shape[:2] == (2, enc["input_ids"].shape[1])
    assert (out["retrieval_labels"][:, 0] == mux.IGNORE_INDEX).all()  # [CLS]
    again = TMUXModel.build(tok, 2, seed=1, task="token", num_labels=4, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_vanilla_starts_from_the_weights_of_the_tmux_model(tok):
    kw = dict(task="sentence", num_labels=2, **TINY)
    vanilla = TMUXModel.build(tok, 1, seed=7, vanilla=True, **kw).state_dict()
    tmux = TMUXModel.build(tok, 1, seed=7, **kw).state_dict()
    shared = [k for k in vanilla if k in tmux]
    assert shared == list(vanilla)
    for k in shared:
        rows = vanilla[k].shape[0]  # the position table: the vanilla model has N fewer rows
        assert torch.equal(vanilla[k], tmux[k][:rows]), k
    other = TMUXModel.build(tok, 1, seed=8, vanilla=True, **kw).state_dict()
    assert not torch.equal(other["head.weight"], vanilla["head.weight"])


def test_load_warmup_copies_all_but_the_task_head(tok):
    warmup = TMUXModel.build(tok, 2, seed=0, task="retrieval", **TINY)
    _randomise_(warmup)  # as if trained: nothing equal by construction
    model = TMUXModel.build(tok, 2, seed=0, task="sentence", num_labels=2, **{**TINY, "dropout": 0.2})
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert model.load_warmup(warmup) is model
    theirs, ours = warmup.state_dict(), model.state_dict()
    assert set(ours) - set(theirs) == {"head.weight", "head.bias"}
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    assert all(torch.equal(head[k], v) for k, v in model.head.state_dict().items())
    assert model.retrieval_head.weight is model.backbone.embeddings.word_embeddings.weight  # still tied
    x = sentences([5, 7, 4, 6])
    with torch.no_grad():  # the same encoder: the same retrieval logits
        assert_close(_outputs(model.eval(), x, 2)["retrieval_logits"], _outputs(warmup.eval(), x, 2)["retrieval_logits"])


@pytest.mark.parametrize("n, vanilla", [(1, True), (1, False), (3, False)])
def test_a_sentence_head_demultiplexes_the_cls_position_alone(n, vanilla):
    """The sentence forward demultiplexes position 0 only: the same logits as demultiplexing every position."""
    model = tiny(n, "sentence", vanilla=vanilla)
    x = sentences(random_lengths(2 * n, seed=4))
    ids, mask = x["input_ids"].view(2, n, -1), x["attention_mask"].view(2, n, -1)
    types = torch.zeros_like(ids)
    with torch.no_grad():
        first = model.encode(ids, mask, types, first_only=True)
        full = model.encode(ids, mask, types)
        logits = model(ids, mask)["logits"]
    assert first.shape == (2, n, 1, TINY["hidden_size"])
    assert_close(first, full[:, :, :1])
    assert_close(logits, model.head(full[:, :, 0]))
    with torch.no_grad():  # with the retrieval outputs, every position is demultiplexed as before
        both = model(ids, mask, return_retrieval=True)
    assert_close(both["logits"], logits)
    assert both["retrieval_logits"].shape[:3] == ids.shape


@pytest.mark.parametrize("change, named", [
    (dict(n_mux=3), "n_mux"),
    (dict(vocab_size=V + 10), "vocab_size"),
    (dict(hidden_size=32), "hidden_size"),
    (dict(mux_seed=1), "mux_seed"),
])
def test_load_warmup_refuses_another_model(change, named):
    warmup = TMUXModel(config(2, "retrieval"))
    model = TMUXModel(config(2, "sentence", **change))
    with pytest.raises(ValueError, match=rf"the warm-up model differs from this model in {named} \("):
        model.load_warmup(warmup)


# ---------------------------------------------------------------- bad input


def test_bad_configuration_is_refused():
    for bad, message in [
        (dict(n_mux=0), "N"),
        (dict(task="qa"), "unknown task"),
        (dict(multiplexer="dct"), "unknown multiplexer"),
        (dict(task="sentence", num_labels=1), "num_labels"),
        (dict(task="token", num_labels=0), "num_labels"),
        (dict(hidden_size=18, num_heads=4), "multiple of num_heads"),
        (dict(n_mux=2, vanilla=True), "needs n_mux=1"),
        (dict(vanilla="yes", n_mux=1), "vanilla must be True or False"),
        (dict(dropout=1.0), "dropout"),
        (dict(special_token_ids=(2, V)), "outside the vocabulary"),
        (dict(max_length=0), "max_length"),
    ]:
        fields = dict(vocab_size=V, task="retrieval", **TINY)
        fields.update(bad)
        with pytest.raises(ValueError, match=message):
            TMUXConfig(**fields)
    assert TMUXConfig(vocab_size=V, special_token_ids=[3, 2, 3]).special_token_ids == (2, 3)


def test_bad_input_is_refused():
    model = tiny(2, "sentence")
    x = sentences([5, 7, 4, 6])
    ids, mask = mux.group(x["input_ids"], 2), mux.group(x["attention_mask"], 2)
    with pytest.raises(ValueError, match=r"expects input_ids \(B, N=2, L\), got shape \(4, 7\)"):
        model(x["input_ids"])
    with pytest.raises(ValueError, match=r"expects input_ids \(B, N=2, L\), got shape \(1, 4, 7\)"):
        model(mux.group(x["input_ids"], 4))
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.float(), mask)
    too_long = torch.full((2, 2, MAX_LENGTH + 1), 7)
    with pytest.raises(ValueError, match=rf"refuses.*max_length={MAX_LENGTH}"):
        model(too_long)
    model(too_long[..., :MAX_LENGTH])  # the longest allowed
    for bad_id in (V, -1):
        bad = ids.clone()
        bad[0, 0, 1] = bad_id
        with pytest.raises(ValueError, match=rf"vocab_size={V}"):
            model(bad, mask)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(ids, mask[..., :-1])
    with pytest.raises(ValueError, match="token_type_ids must have the shape of input_ids"):
        model(ids, mask, token_type_ids=torch.zeros(2, 7, dtype=torch.long))


# ---------------------------------------------------------------- training and checkpoints


def _cfg(**kw):
    base = dict(max_steps=2, batch_size=8, lr=3e-3, seed=0, progress=False, log_every=1, cpu=True)
    base.update(kw)
    return mux.TrainConfig(**base)


def retrieval_data(size=48, seed=0):
    """Token sequences of 3-8 ids from a small range (retrieval labels come from the ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(size):
        k = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(len(SPECIAL), 15, (k,), generator=g)
        ids[0], ids[-1] = CLS, SEP
        out.append({"input_ids": ids, "labels": torch.zeros(k, dtype=torch.long)})
    return out


def test_a_tiny_retrieval_model_learns():
    mux.seed_everything(0)
    model = TMUXModel(config(2, "retrieval", hidden_size=32))
    result = mux.train(model, retrieval_data(), _cfg(max_steps=20, batch_size=8, lr=1e-2, log_every=5), n=2,
                       loss_fn=mux.retrieval_loss, collate_fn=collate)
    assert [h["step"] for h in result.history] == [5, 10, 15, 20]
    assert all(set(h) == {"step", "lr", "loss", "retrieval_acc"} for h in result.history)
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    assert result.history[-1]["retrieval_acc"] > result.history[0]["retrieval_acc"]


def test_fine_tuning_logs_both_terms_and_the_weights_are_part_of_the_run(tmp_path):
    data = examples(16, "sentence")
    cfg = _cfg(max_steps=1, checkpoint_dir=str(tmp_path / "ckpt"))
    result = mux.train(tiny(2, "sentence"), data, cfg, n=2, loss_fn=mux.TaskAndRetrievalLoss(), collate_fn=collate)
    assert set(result.history[0]) == {"step", "lr", "loss", "task", "retrieval", "task_acc", "retrieval_acc"}
    with pytest.raises(ValueError, match="belongs to another training run.*loss_fn"):
        mux.train(tiny(2, "sentence"), data, cfg, n=2, loss_fn=mux.TaskAndRetrievalLoss(0.5, 0.5),
                  collate_fn=collate)


def test_load_weights_refuses_a_checkpoint_of_another_n_or_vocabulary(tmp_path):
    ckpt = tmp_path / "ckpt"
    trained = mux.train(tiny(2, "retrieval"), retrieval_data(16), _cfg(checkpoint_dir=str(ckpt)), n=2,
                        loss_fn=mux.retrieval_loss, collate_fn=collate).model
    loaded = mux.load_weights(tiny(2, "retrieval", seed=5), ckpt)
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.retrieval_head.weight is loaded.backbone.embeddings.word_embeddings.weight
    for other in (tiny(3, "retrieval"), tiny(2, "retrieval", vocab_size=V + 10), tiny(1, "retrieval", vanilla=True)):
        with pytest.raises(ValueError, match="written by a different model"):
            mux.load_weights(other, ckpt)


@pytest.mark.parametrize("multiplexer", ["gaussian_hadamard", "orthogonal", "binary_hadamard", "contextual"])
def test_embedding_in_blocks_gives_the_encoding_of_all_instances_at_once(multiplexer):
    """Blocks of 2, 2 and 1 instances, one tuple each (the contextual multiplexer takes all 5 at once) give
    the outputs of one block holding every instance of every tuple."""
    model = tiny(5, "token", multiplexer=multiplexer)
    x = sentences(random_lengths(15, seed=5))
    ids, mask = x["input_ids"].view(3, 5, -1), x["attention_mask"].view(3, 5, -1)
    types = torch.zeros_like(ids)
    with torch.no_grad():
        whole = model.encode(ids, mask, types)
        model.block_elements = 2 * (5 + ids.shape[-1]) * TINY["hidden_size"]
        assert_close(model.encode(ids, mask, types), whole)
