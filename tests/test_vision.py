"""Chapter 04 (vision): the Image Multiplexer's and ConcatPlexer's multiplexers, models, losses,
teachers, checkpoints and multiply-add counts.

Every model here is tiny (8 x 8 pixels, 2 x 2 patches, width 16, two or three blocks) so the
whole file runs in seconds on two CPU cores. Expected values are computed by hand or with
plain torch, never by calling the code under test a second time.
"""
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close
from torch.utils.data import TensorDataset

import mux
from mux.models.concatplexer import TABLE1

D, CLASSES = 16, 5
TINY = dict(num_classes=CLASSES, image_size=8, patch_size=2, in_chans=1, embed_dim=D, depth=2, num_heads=2)
L = 16  # (8 / 2)^2 patches per image


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def concat_config(n=2, k=1, **kw) -> mux.ConcatPlexerConfig:
    return mux.ConcatPlexerConfig(**{**TINY, "depth": 3, **kw}, n_mux=n, concat_point=k)


def concatplexer(n=2, k=1, seed=0, **kw) -> mux.ConcatPlexerModel:
    torch.manual_seed(seed)
    return mux.ConcatPlexerModel(concat_config(n, k, **kw)).eval()


def imux_config(n=2, **kw) -> mux.ImageMultiplexerConfig:
    return mux.ImageMultiplexerConfig(**{**TINY, "num_codes": 8, **kw}, n_mux=n)


def random_codebook(k=8, seed=0, in_chans=1, patch_size=2) -> mux.PatchCodebook:
    g = torch.Generator().manual_seed(seed)
    return mux.PatchCodebook(torch.rand(k, in_chans * patch_size**2, generator=g), patch_size, in_chans)


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- MLPOrthogonalMultiplexer


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_mlp_orthogonal_shapes(n):
    m = mux.MLPOrthogonalMultiplexer(n, D, seed=1)
    assert m(torch.randn(2, n, 6, D)).shape == (2, 6, D)  # token sequences
    assert m(torch.randn(3, n, D)).shape == (3, D)  # vectors
    assert m.transform(torch.randn(2, n, 6, D)).shape == (2, n, 6, D)
    with pytest.raises(ValueError, match=rf"N={n}, \.\.\., d={D}"):
        m(torch.randn(2, n + 1, 6, D))


def test_mlp_orthogonal_equals_the_hand_built_mean_of_q_mlp():
    n, d = 3, 8
    m = mux.MLPOrthogonalMultiplexer(n, d, seed=4)
    x = torch.randn(2, n, 5, d, dtype=torch.float64)
    terms = []
    for i in range(n):
        w1, b1 = m.fc1_weight[i].double(), m.fc1_bias[i].double()
        w2, b2 = m.fc2_weight[i].double(), m.fc2_bias[i].double()
        q = m.weight[i].double()
        mlp = F.gelu(x[:, i] @ w1.T + b1) @ w2.T + b2  # Linear(d, d) -> GELU -> Linear(d, d)
        terms.append(mlp @ q.T)  # Q_i applied to each d-vector: Q_i @ v
    expected = sum(terms) / n
    with torch.no_grad():
        assert_close(m.double()(x), expected, rtol=1e-12, atol=1e-12)


def test_mlp_orthogonal_q_is_the_orthogonal_multiplexers_q():
    for n, d, seed in [(1, 5, 0), (3, 8, 7), (4, 16, 123)]:
        q = mux.MLPOrthogonalMultiplexer(n, d, seed=seed).weight
        assert torch.equal(q, mux.OrthogonalMultiplexer(n, d, seed=seed).weight)
        assert_close(q @ q.transpose(1, 2), torch.eye(d).expand(n, d, d), atol=1e-5, rtol=0)


def test_mlp_orthogonal_partial_sums_over_blocks_give_forward():
    n = 5
    m = mux.MLPOrthogonalMultiplexer(n, D, seed=2)
    x = torch.randn(2, n, 4, D)
    with torch.no_grad():
        blocks = m.partial_sum(x[:, :2], None, 0) + m.partial_sum(x[:, 2:3], None, 2) + m.partial_sum(x[:, 3:], None, 3)
        assert_close(blocks / n, m(x), rtol=1e-5, atol=1e-6)
        # a block uses its own instances' MLP and Q: the same slice at another start gives another sum
        assert not torch.allclose(m.partial_sum(x[:, 2:3], None, 2), m.partial_sum(x[:, 2:3], None, 0))
    with pytest.raises(ValueError, match="not among the N=5"):
        m.partial_sum(x[:, :2], None, 4)


def test_mlp_orthogonal_state_dict_holds_q_as_a_buffer_and_the_mlps_as_parameters():
    m = mux.MLPOrthogonalMultiplexer(3, D, seed=0)
    state = m.state_dict()
    assert set(state) == {"weight", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}
    assert {name for name, _ in m.named_parameters()} == {"fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}
    assert [name for name, _ in m.named_buffers()] == ["weight"]
    assert state["fc1_weight"].shape == (3, D, D) and state["fc2_bias"].shape == (3, D)
    other = mux.MLPOrthogonalMultiplexer(3, D, seed=99)  # other Q, other MLPs
    x = torch.randn(2, 3, 4, D)
    assert not torch.allclose(other(x), m(x))
    other.load_state_dict(state)
    assert torch.equal(other(x), m(x))


# ---------------------------------------------------------------- ConcatMultiplexer


@pytest.mark.parametrize("n,length", [(1, 5), (2, 4), (2, 16), (3, 9), (3, 12), (4, 16), (5, 10), (7, 49)])
def test_concat_multiplexer_token_counts(n, length):
    d = 8
    m = mux.ConcatMultiplexer(n, d, length)
    x = torch.randn(2, n, length, d)
    assert m.transform(x).shape == (2, n, length // n, d)  # L -> L/N per image
    assert m(x).shape == (2, length, d)  # N * L/N = L after the concatenation
    assert m.pos_embed.shape == (1, length, d) and m.weight.shape == (n, d)  # positions, fixed slot codes


def test_concat_multiplexer_equals_conv1d_per_image_then_concatenation():
    n, length, d = 2, 6, 4
    m = mux.ConcatMultiplexer(n, d, length)
    x = torch.randn(3, n, length, d)
    w, b = m.conv.weight, m.conv.bias  # (d_out, d_in, N), (d_out,)
    v = mux.GaussianHadamardMultiplexer(n, d, seed=0).weight  # the same fixed codes for the same seed
    assert_close(m.weight, v)
    per_image = [F.conv1d(x[:, i].transpose(1, 2), w, b, stride=n).transpose(1, 2) * v[i] for i in range(n)]
    expected = torch.cat(per_image, dim=1) + m.pos_embed
    with torch.no_grad():
        out = m(x)
        assert_close(out, expected)
        # one token written out: image 1's token j = 2 reads its input tokens 4 and 5
        j = 2
        token = (sum(w[:, :, t] @ x[0, 1, j * n + t] for t in range(n)) + b) * v[1]
        assert_close(out[0, length // n + j], token + m.pos_embed[0, length // n + j])


def test_concat_multiplexer_refusals():
    with pytest.raises(ValueError, match=r"each image's 10 tokens.*N=3.*10 is not"):
        mux.ConcatMultiplexer(3, 8, length=10)
    m = mux.ConcatMultiplexer(2, 8, length=6)
    x = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="pass mask=None"):
        m(x, torch.ones(2, 2, 6))
    for bad in [torch.randn(2, 2, 8, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 2, 6, 9), torch.randn(2, 2, 8),
                torch.randn(2, 2, 3, 2, 8)]:
        with pytest.raises(ValueError, match="expects"):
            m(bad)


# ---------------------------------------------------------------- tuple_mixup


def test_tuple_mixup_by_hand():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])
    two = mux.tuple_mixup(torch.stack([a, b])[None], 0.75)[0]
    assert_close(two, torch.tensor([[0.75, 0.5], [0.25, 1.5]]))  # .75 a + .25 b, .25 a + .75 b
    three = mux.tuple_mixup(torch.stack([a, b, c])[None], 0.5)[0]  # .5 on itself, .25 on each other
    assert_close(three, torch.tensor([[0.5 + 1.0, 0.5 + 1.0],
                                      [0.25 + 1.0, 1.0 + 1.0],
                                      [0.25 + 2.0, 0.5 + 2.0]]))


def test_tuple_mixup_alpha_one_is_the_identity_and_alpha_one_over_n_the_mean():
    x = torch.randn(3, 4, 5, 2)
    assert torch.equal(mux.tuple_mixup(x, 1.0), x)
    assert torch.equal(mux.tuple_mixup(x, 1), x)
    assert_close(mux.tuple_mixup(x, 0.25), x.mean(dim=1, keepdim=True).expand_as(x))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_mixed_one_hot_labels_sum_to_one(alpha):
    labels = torch.randint(0, 6, (4, 3), generator=torch.Generator().manual_seed(0))
    soft = mux.tuple_mixup(F.one_hot(labels, 6).float(), alpha)
    assert soft.shape == (4, 3, 6) and bool((soft >= 0).all())
    assert_close(soft.sum(-1), torch.ones(4, 3))


def test_tuple_mixup_refusals():
    with pytest.raises(ValueError, match="N >= 2, got N=1"):
        mux.tuple_mixup(torch.randn(2, 1, 3), 0.5)
    for alpha in (-0.1, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match=r"alpha .* in \[0, 1\]"):
            mux.tuple_mixup(torch.randn(2, 2, 3), alpha)
    with pytest.raises(ValueError, match="grouped"):
        mux.tuple_mixup(torch.randn(3), 0.5)


# ---------------------------------------------------------------- PatchCodebook


def test_codebook_round_trip_and_patch_order():
    k, c, p, grid = 6, 2, 2, 4
    cb = random_codebook(k, seed=3, in_chans=c, patch_size=p)
    codes = torch.randint(0, k, (3, grid * grid), generator=torch.Generator().manual_seed(1))
    pictures = cb.decode(codes, grid)
    assert pictures.shape == (3, c, grid * p, grid * p)
    assert torch.equal(cb.encode(pictures), codes)  # built from centroids: encodes to the codes that built it
    assert torch.equal(cb.decode(cb.encode(pictures), grid), pictures)
    # patch 6 is row 1, column 2 of the 4 x 4 grid (row-major); its pixels are the centroid (channel, row, column)
    r, col = 1, 2
    patch = pictures[2, :, r * p:(r + 1) * p, col * p:(col + 1) * p]
    assert torch.equal(patch.reshape(-1), cb.centroids[codes[2, r * grid + col]])
    # the same order as a ViT's patch tokens: token 6 of timm's patch embedding is that patch's projection
    torch.manual_seed(0)
    vit = mux.models.vit.build_vit(mux.VisionConfig(**{**TINY, "in_chans": c}))
    proj = vit.patch_embed.proj  # Conv2d(C, d, p, stride p)
    with torch.no_grad():
        by_hand = proj.weight.reshape(D, -1) @ patch.reshape(-1) + proj.bias
        assert_close(vit.patch_embed(pictures)[2, r * grid + col], by_hand)


def test_codebook_fit_is_deterministic_given_the_seed():
    pictures = images(12, 1, 8, 8, seed=5)
    a = mux.PatchCodebook.fit(pictures, 8, 2, seed=3)
    b = mux.PatchCodebook.fit(pictures, 8, 2, seed=3)
    assert a.centroids.shape == (8, 4) and a.vocab_size == 8
    assert torch.equal(a.centroids, b.centroids)
    codes = a.encode(pictures)
    assert codes.shape == (12, L) and int(codes.min()) >= 0 and int(codes.max()) < 8


def test_codebook_refuses_too_few_distinct_patches():
    flat = torch.zeros(4, 1, 8, 8)
    flat[:, :, :2, :2] = 1.0  # two distinct patches only
    with pytest.raises(ValueError, match="only 2 distinct patches to fit 3 codes"):
        mux.PatchCodebook.fit(flat, 3, 2)


def test_codes_outside_the_codebook_are_refused():
    model = mux.ImageMultiplexerModel(imux_config(2), tokenizer=random_codebook(8))
    good = torch.randint(0, 8, (2, 2, L))
    assert model(good).shape == (2, 2, CLASSES)
    for value in (8, 100, -1):
        bad = good.clone()
        bad[1, 0, 3] = value
        with pytest.raises(ValueError, match=r"codes must lie in 0 \.\. 7"):
            model(bad)
    with pytest.raises(ValueError, match="expected codes"):
        model(torch.zeros(2, 2, L + 1, dtype=torch.long))


# ---------------------------------------------------------------- ImageMultiplexerModel


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_image_multiplexer_shapes_from_images_and_codes(n):
    torch.manual_seed(0)
    model = mux.ImageMultiplexerModel(imux_config(n), tokenizer=random_codebook(8)).eval()
    assert model(images(3, n, 1, 8, 8)).shape == (3, n, CLASSES)
    out = model(torch.randint(0, 8, (3, n, L)), return_retrieval=True)
    assert out["logits"].shape == (3, n, CLASSES)
    assert out["retrieval_logits"].shape == (3, n, L, 8) and out["retrieval_labels"].shape == (3, n, L)


def test_image_multiplexer_retrieval_labels_are_each_images_own_codes():
    n, cb = 3, random_codebook(8, seed=4)
    codes = torch.randint(0, 8, (2 * n, L), generator=torch.Generator().manual_seed(2))
    pictures = cb.decode(codes, 4).view(2, n, 1, 8, 8)  # images whose codes are known by construction
    model = mux.ImageMultiplexerModel(imux_config(n), tokenizer=cb).eval()
    out = model(pictures, return_retrieval=True)
    assert torch.equal(out["retrieval_labels"], codes.view(2, n, L))
    # codes in, the same codes back as labels, and the same logits as from the images
    from_codes = model(codes.view(2, n, L), return_retrieval=True)
    assert torch.equal(from_codes["retrieval_labels"], codes.view(2, n, L))
    assert_close(from_codes["logits"], out["logits"])


def test_image_multiplexer_cnn_without_codebook():
    model = mux.ImageMultiplexerModel(imux_config(2, patchifier="cnn", num_codes=None)).eval()
    assert model.tokenizer is None and model.retrieval_head is None and model.code_embed is None
    x = images(2, 2, 1, 8, 8)
    assert model(x).shape == (2, 2, CLASSES)
    with pytest.raises(ValueError, match="token retrieval needs a codebook"):
        model(x, return_retrieval=True)
    with pytest.raises(ValueError, match="pass images"):
        model(torch.zeros(2, 2, L, dtype=torch.long))
    # the cnn patchifier's tokens are the ViT's own patch embedding: the codebook does not change them
    with_codes = mux.ImageMultiplexerModel(imux_config(2, patchifier="cnn"), tokenizer=random_codebook(8)).eval()
    with_codes.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    assert_close(with_codes(x), model(x))


def test_image_multiplexer_config_errors():
    with pytest.raises(ValueError, match="image_size 9 is not divisible by patch_size 2"):
        imux_config(2, image_size=9)
    with pytest.raises(ValueError, match="discrete patchifier needs num_codes"):
        imux_config(2, num_codes=None)
    with pytest.raises(ValueError, match="unknown patchifier"):
        imux_config(2, patchifier="dvae")
    with pytest.raises(ValueError, match="the tokenizer has 6 codes, the configuration num_codes=8"):
        mux.ImageMultiplexerModel(imux_config(2), tokenizer=random_codebook(6))


# ---------------------------------------------------------------- ConcatPlexerModel


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("k", [0, 1, 2])  # depth 3: 0, 1 and depth - 1
def test_concatplexer_shapes(n, k):
    model = concatplexer(n, k, teacher_dim=7)
    x = images(3, n, 1, 8, 8)
    assert model.patchify(x).shape == (3, n, L, D)
    assert model(x).shape == (3, n, CLASSES)
    out = model(x, return_features=True)
    assert out["logits"].shape == (3, n, CLASSES) and out["features"].shape == (3, n, 7)


def test_concatplexer_config_errors():
    for k in (-1, 3, 10, True, 1.0):
        with pytest.raises(ValueError, match=r"concat_point must be an integer in 0 \.\. depth - 1 = 2"):
            concat_config(2, k)
    with pytest.raises(ValueError, match=r"16 tokens per image .* not a multiple of N=3"):
        concat_config(3, 1)
    with pytest.raises(ValueError, match="C-Multiplexer"):
        concat_config(2, 1, image_size=6)  # 9 tokens


def test_concatplexer_patchify_is_the_first_k_blocks_per_image():
    n, k = 2, 2
    model = concatplexer(n, k)
    x = images(3, n, 1, 8, 8)
    vit = model.vit
    with torch.no_grad():
        tokens = model.patchify(x)
        for i in range(n):
            t = vit.patch_embed.proj(x[:, i]).flatten(2).transpose(1, 2)  # (B, L, d), row-major patches
            t = t + vit.pos_embed[:, 1:]
            for block in list(vit.blocks)[:k]:
                t = block(t)
            assert_close(tokens[:, i], t)


def test_concatplexer_tells_the_slots_apart():
    model = concatplexer(2, 1)
    x = images(3, 2, 1, 8, 8)
    swapped = x[:, [1, 0]]
    with torch.no_grad():
        # without slot codes and position embedding, self-attention sees the two images as a set:
        # swapping them changes nothing at all, and no demultiplexer could say which image is the first
        codes, positions = model.multiplexer.weight.clone(), model.multiplexer.pos_embed.clone()
        model.multiplexer.weight.fill_(1.0)
        model.multiplexer.pos_embed.zero_()
        assert_close(model(swapped), model(x), rtol=1e-4, atol=1e-5)
        # the two demultiplexers give two different outputs from one CLS state (same image twice)
        same = model(x[:, [0, 0]])
        assert (same[:, 0] - same[:, 1]).abs().max() > 1e-2
        # each alone lets the order of the images reach CLS (an untrained model is not equivariant:
        # the logits of the swapped tuple are not the original's swapped)
        model.multiplexer.weight.copy_(codes)
        assert (model(swapped) - model(x)).abs().max() > 1e-3
        model.multiplexer.weight.fill_(1.0)
        model.multiplexer.pos_embed.copy_(positions).mul_(25)  # std 0.5: large enough to see at init
        assert (model(swapped) - model(x)).abs().max() > 1e-3


def test_concatplexer_features_need_teacher_dim_and_alpha_one_smoothing_is_clean():
    model = concatplexer(2, 1)
    x = images(2, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="teacher_dim"):
        model(x, return_features=True)
    with torch.no_grad():
        out = model(x, smoothing_alpha=1.0)
        assert_close(out["smooth_logits"], out["logits"])
        assert_close(out["logits"], model(x))
        mixed = model(x, smoothing_alpha=0.5)["smooth_logits"]  # both slots hold the tuple's mean
    assert not torch.allclose(mixed, out["logits"])


# ---------------------------------------------------------------- every example, any N and size


def test_every_example_is_evaluated_for_odd_sizes_and_n():
    g = torch.Generator().manual_seed(0)
    for size in (7, 11):
        labels = torch.randint(0, CLASSES, (size,), generator=g)
        small = TensorDataset(torch.rand(size, 1, 8, 8, generator=g), labels)
        large = TensorDataset(torch.rand(size, 1, 12, 12, generator=g), labels)  # 36 tokens: N = 2 or 3
        for n in (2, 3):
            torch.manual_seed(0)
            cp = mux.ConcatPlexerModel(concat_config(n, 1, image_size=12))
            im = mux.ImageMultiplexerModel(imux_config(n), tokenizer=random_codebook(8))
            for model, data in ((cp, large), (im, small)):
                result = mux.evaluate(model, data, n, batch_size=4)
                assert result["n_examples"] == size and 0 <= result["accuracy"] <= 1
        torch.manual_seed(0)
        vit = mux.ViTClassifier(mux.VisionConfig(**TINY)).eval()
        result = mux.evaluate(vit, small, 1, batch_size=4)
        assert result["n_examples"] == size
        with torch.no_grad():  # one image per pass: the loss over the dataset, by hand
            logits = vit.head(vit.vit.forward_features(small.tensors[0])[:, 0])
        assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


# ---------------------------------------------------------------- losses


def test_clip_contrastive_loss_by_hand():
    s = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0], [3.0, 1.0, 0.0, -1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    tau = 0.5
    sn = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in s.tolist()]
    tn = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in t.tolist()]
    logits = [[sum(x * y for x, y in zip(a, b)) / tau for b in tn] for a in sn]

    def ce(rows):  # mean over rows of -log softmax(row)[own index]
        return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(rows)) / len(rows)

    columns = [list(col) for col in zip(*logits)]
    expected = (ce(logits) + ce(columns)) / 2
    assert mux.clip_contrastive_loss(s, t, temperature=tau).item() == pytest.approx(expected, rel=1e-5)
    # scale-free: features are normalised first
    assert mux.clip_contrastive_loss(3 * s, t / 7, temperature=tau).item() == pytest.approx(expected, rel=1e-5)


def test_clip_contrastive_loss_refusals():
    with pytest.raises(ValueError, match=r"student \(3, 4\), teacher \(3, 5\)"):
        mux.clip_contrastive_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"student \(4,\), teacher \(4,\)"):
        mux.clip_contrastive_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mux.clip_contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), temperature=0)


def test_mixed_labels_pads_with_copies_as_the_forward_pass_does():
    labels = torch.tensor([3, 1, 4, 0, 2])
    soft = mux.mixed_labels(labels, 2, 5, 0.8)
    # padded to [3, 1, 4, 0, 2, 3]: tuples (3, 1), (4, 0), (2, 3); the copy's row is dropped
    expected = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0],
                             [0.0, 0.8, 0.0, 0.2, 0.0],
                             [0.2, 0.0, 0.0, 0.0, 0.8],
                             [0.8, 0.0, 0.0, 0.0, 0.2],
                             [0.0, 0.0, 0.8, 0.2, 0.0]])
    assert_close(soft, expected)
    assert torch.equal(mux.pad_to_multiple(labels, 2)[0], torch.tensor([3, 1, 4, 0, 2, 3]))


@pytest.fixture(scope="module")
def vit_teacher():
    torch.manual_seed(1)
    vit = mux.ViTClassifier(mux.VisionConfig(**{**TINY, "embed_dim": 8}))  # teacher width 8
    return vit, mux.FeatureTeacher.from_vit(vit, name="tiny-vit")


def test_concatplexer_loss_terms_and_total(vit_teacher):
    _, teacher = vit_teacher
    model = concatplexer(2, 1, teacher_dim=8).train()  # no dropout in the tiny model: deterministic
    x, y = images(5, 1, 8, 8, seed=3), torch.tensor([3, 1, 4, 0, 2])
    plain = mux.ConcatPlexerLoss()(model, (x, y), 2)
    assert set(plain) == {"loss", "ce", "acc"}
    logits = mux.multiplexed_forward(model, x, 2)
    assert_close(plain["ce"], F.cross_entropy(logits, y))
    assert_close(plain["loss"], plain["ce"])
    assert plain["acc"].item() == pytest.approx((logits.argmax(-1) == y).float().mean().item())

    loss = mux.ConcatPlexerLoss(clip_weight=0.5, smoothing_weight=0.3, smoothing_alpha=0.8, teacher=teacher)
    terms = loss(model, (x, y), 2)
    assert set(terms) == {"loss", "ce", "acc", "clip", "smooth"}
    assert_close(terms["loss"], terms["ce"] + 0.5 * terms["clip"] + 0.3 * terms["smooth"])
    assert_close(terms["ce"], plain["ce"])
    out = mux.multiplexed_forward(model, {"x": x, "return_features": True, "smoothing_alpha": 0.8}, 2)
    assert_close(terms["clip"], mux.clip_contrastive_loss(out["features"], teacher(x)))
    soft = torch.tensor([[0, 0.2, 0, 0.8, 0], [0, 0.8, 0, 0.2, 0], [0.2, 0, 0, 0, 0.8], [0.8, 0, 0, 0, 0.2],
                         [0, 0, 0.8, 0.2, 0]])
    with torch.no_grad():  # the mixed pass by hand: pad with a copy of image 0, mix the patchifier's tokens
        tokens = model.patchify(torch.cat([x, x[:1]]).view(3, 2, 1, 8, 8))
        mixed = torch.stack([0.8 * tokens[:, 0] + 0.2 * tokens[:, 1], 0.2 * tokens[:, 0] + 0.8 * tokens[:, 1]], 1)
        smooth_logits = model.head(model.demultiplexed_cls(mixed)).reshape(6, CLASSES)[:5]
    assert_close(terms["smooth"], F.cross_entropy(smooth_logits, soft))
    terms["loss"].backward()
    assert model.feature_head.weight.grad is not None and model.multiplexer.pos_embed.grad is not None
    only_smooth = mux.ConcatPlexerLoss(smoothing_weight=1.0)(model, (x, y), 2)
    assert set(only_smooth) == {"loss", "ce", "acc", "smooth"}


def test_concatplexer_loss_refusals_and_repr(vit_teacher):
    _, teacher = vit_teacher
    model = concatplexer(2, 1, teacher_dim=7)
    x, y = images(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"gives 8 features, the model's feature head 7.*teacher_dim=8"):
        mux.ConcatPlexerLoss(clip_weight=1.0, teacher=teacher)(model, (x, y), 2)
    with pytest.raises(ValueError, match="clip_weight > 0 needs a teacher"):
        mux.ConcatPlexerLoss(clip_weight=1.0)
    with pytest.raises(ValueError, match="smoothing_alpha"):
        mux.ConcatPlexerLoss(smoothing_weight=1.0, smoothing_alpha=1.5)
    with pytest.raises(ValueError, match="clip_weight must be a finite number >= 0"):
        mux.ConcatPlexerLoss(clip_weight=-1.0)
    text = repr(mux.ConcatPlexerLoss(clip_weight=1, smoothing_weight=0.5, teacher=teacher))
    assert text == ("ConcatPlexerLoss(clip_weight=1.0, smoothing_weight=0.5, smoothing_alpha=0.8, "
                    "teacher='tiny-vit', temperature=0.07)")
    assert "0x" not in text
    assert repr(mux.ConcatPlexerLoss()) == ("ConcatPlexerLoss(clip_weight=0.0, smoothing_weight=0.0, "
                                            "smoothing_alpha=0.8, teacher=None, temperature=0.07)")


def test_task_and_retrieval_loss_on_image_multiplexer_tensor_batch():
    torch.manual_seed(0)
    model = mux.ImageMultiplexerModel(imux_config(3), tokenizer=random_codebook(8))
    x, y = images(7, 1, 8, 8), torch.randint(0, CLASSES, (7,))
    terms = mux.TaskAndRetrievalLoss(0.9, 0.1)(model, (x, y), 3)
    assert {"loss", "task", "retrieval", "task_acc", "retrieval_acc"} <= set(terms)
    assert 0 <= terms["retrieval_acc"].item() <= 1 and math.isfinite(terms["loss"].item())
    assert_close(terms["loss"], 0.9 * terms["task"] + 0.1 * terms["retrieval"])
    terms["loss"].backward()
    assert model.retrieval_head.weight.grad is not None


# ---------------------------------------------------------------- FeatureTeacher


def test_feature_teacher_from_vit_is_the_vits_cls_and_frozen(vit_teacher):
    vit, teacher = vit_teacher
    x = images(3, 1, 8, 8, seed=7)
    v = vit.vit
    with torch.no_grad():  # the ViT's final CLS state, by hand
        t = v.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.cls_token.expand(3, -1, -1), t], dim=1) + v.pos_embed
        for block in v.blocks:
            t = block(t)
        cls = v.norm(t)[:, 0]
    features = teacher(x)
    assert features.shape == (3, 8) and teacher.dim == 8
    assert_close(features, cls)
    assert not features.requires_grad
    student = nn.Linear(8, 8)
    mux.clip_contrastive_loss(student(features), features).backward()
    assert student.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.encoder.parameters())
    assert all(p.requires_grad for p in vit.parameters()), "the caller's ViT must stay trainable"
    teacher.train()
    assert teacher.training and not teacher.encoder.training


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=12, num_channels=3)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def test_feature_teacher_from_clip(tiny_clip):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's normalisation
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    grey = images(4, 1, 8, 8, seed=2)
    rgb16 = F.interpolate(grey.repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear", antialias=True,
                          align_corners=False)  # to CLIP's 16 x 16, three channels
    pixels = (rgb16 - mean) / std

    projected = mux.FeatureTeacher.from_clip(str(tiny_clip))
    features = projected(grey)
    assert features.shape == (4, 12) and projected.dim == 12 and not features.requires_grad
    assert_close(features, projected(rgb16))  # a 3-channel 16 x 16 image is used as it is
    reference = CLIPVisionModelWithProjection.from_pretrained(str(tiny_clip)).eval()
    with torch.no_grad():
        assert_close(features, reference(pixel_values=pixels).image_embeds, rtol=1e-4, atol=1e-5)

    hidden = mux.FeatureTeacher.from_clip(str(tiny_clip), projection=False)
    pooled = hidden(grey)
    assert pooled.shape == (4, 16) and hidden.dim == 16
    reference = CLIPVisionModel.from_pretrained(str(tiny_clip)).eval()
    with torch.no_grad():
        assert_close(pooled, reference(pixel_values=pixels).pooler_output, rtol=1e-4, atol=1e-5)

    for teacher in (projected, hidden):
        teacher.train()
        assert teacher.training and not teacher.encoder.training
        assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="reads 3-channel images, got 2"):
        projected(torch.rand(1, 2, 8, 8))


def _matmul_dtypes(teacher):
    """The output dtypes of every nn.Linear and the patch convolution inside the teacher's encoder, per call."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in teacher.encoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return seen, hooks


def test_feature_teacher_runs_its_encoder_in_the_trainings_lower_precision(vit_teacher, monkeypatch):
    from mux.models import concatplexer as cp

    _, teacher = vit_teacher
    x = images(3, 1, 8, 8, seed=5)
    seen, hooks = _matmul_dtypes(teacher)
    try:
        def dtypes_of(**autocast):
            seen.clear()
            if autocast:
                with torch.autocast("cpu", **autocast):
                    out = teacher(x)
            else:
                out = teacher(x)
            assert out.dtype == torch.float32 and out.shape == (3, 8)  # features always come back in fp32
            assert seen, "no matrix product seen"
            return set(seen)

        monkeypatch.setattr(cp, "_training_precision", lambda: None)  # no training set up: on a CPU, fp32
        reference = teacher(x)
        assert dtypes_of() == {torch.float32}
        # inside an active autocast (as the student's forward under Accelerate), the teacher follows it
        assert dtypes_of(dtype=torch.bfloat16) == {torch.bfloat16}
        # called from the loss, outside any autocast, during a bf16 training: the training's precision
        monkeypatch.setattr(cp, "_training_precision", lambda: "bf16")
        assert dtypes_of() == {torch.bfloat16}
        assert_close(teacher(x), reference, rtol=0.05, atol=0.05)  # the same features, to bf16's precision
        monkeypatch.setattr(cp, "_training_precision", lambda: "no")  # an fp32 training: fp32
        assert dtypes_of() == {torch.float32}
        # asked for: bf16 whatever the training does; "no": fp32 even inside an autocast
        teacher.precision = "bf16"
        assert dtypes_of() == {torch.bfloat16}
        teacher.precision = "no"
        assert dtypes_of(dtype=torch.bfloat16) == {torch.float32}
    finally:
        teacher.precision = "auto"
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="precision must be one of"):
        mux.FeatureTeacher.from_vit(vit_teacher[0], precision="half")


def test_feature_teacher_in_a_bf16_training_runs_in_bf16(vit_teacher):
    """Through mux.train with mixed_precision="bf16" on the CPU: the loss calls the teacher outside the
    autocast Accelerate puts around the student's forward, and the teacher still runs in bf16."""
    from accelerate.state import AcceleratorState

    vit, _ = vit_teacher
    teacher = mux.FeatureTeacher.from_vit(vit, name="tiny-vit")
    seen, hooks = _matmul_dtypes(teacher)
    data = TensorDataset(images(8, 1, 8, 8, seed=4), torch.arange(8) % CLASSES)
    loss = mux.ConcatPlexerLoss(clip_weight=1.0, teacher=teacher)
    cfg = mux.TrainConfig(max_steps=2, batch_size=4, cpu=True, mixed_precision="bf16", progress=False)
    try:
        mux.train(concatplexer(2, 1, teacher_dim=8), data, cfg, 2, loss)
        assert seen and set(seen) == {torch.bfloat16}
    finally:
        for h in hooks:
            h.remove()
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests expect no bf16 state


def test_feature_teacher_from_clip_undoes_the_datas_normalisation(tiny_clip):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)  # a pretrained timm model's, say
    rgb = images(3, 3, 16, 16, seed=8)
    normalised = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    plain = mux.FeatureTeacher.from_clip(str(tiny_clip), precision="no")
    reading_normalised = mux.FeatureTeacher.from_clip(str(tiny_clip), input_normalization=(mean, std),
                                                      precision="no")
    assert_close(reading_normalised(normalised), plain(rgb), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain(normalised), plain(rgb), atol=1e-3)  # without it, other features
    with pytest.raises(ValueError, match="input_mean and input_std go together"):
        mux.FeatureTeacher(nn.Identity(), 4, "vit", "x", input_mean=(0.5,))


# ---------------------------------------------------------------- save / load


def test_concatplexer_save_load_round_trip(tmp_path):
    model = concatplexer(2, 1, teacher_dim=5)
    folder = model.save(tmp_path / "cp")
    loaded = mux.ConcatPlexerModel.load(folder).eval()
    assert loaded.config == model.config
    x = images(2, 2, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x, return_features=True), loaded(x, return_features=True)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["features"], b["features"])
    assert mux.ConcatPlexerModel.load(folder, expect=model.config).config == model.config
    with pytest.raises(ValueError, match=r"concat_point \(1 there, 0 here\)"):
        mux.ConcatPlexerModel.load(folder, expect=replace(model.config, concat_point=0))
    with pytest.raises(ValueError, match="holds a 'ConcatPlexerModel'"):
        mux.ImageMultiplexerModel.load(folder)
    with pytest.raises(FileNotFoundError):
        mux.ConcatPlexerModel.load(tmp_path / "nothing")


def test_image_multiplexer_save_load_round_trip_keeps_the_codebook(tmp_path):
    torch.manual_seed(0)
    codebook = mux.PatchCodebook.fit(images(6, 1, 8, 8, seed=1), 8, 2, seed=0)
    model = mux.ImageMultiplexerModel(imux_config(2), tokenizer=codebook).eval()
    folder = model.save(tmp_path / "im")
    loaded = mux.ImageMultiplexerModel.load(folder).eval()
    assert torch.equal(loaded.tokenizer.centroids, codebook.centroids)
    x = images(3, 2, 1, 8, 8, seed=4)
    with torch.no_grad():
        a, b = model(x, return_retrieval=True), loaded(x, return_retrieval=True)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["retrieval_labels"], b["retrieval_labels"])
    with pytest.raises(ValueError, match=r"num_classes \(5 there, 6 here\)"):
        mux.ImageMultiplexerModel.load(folder, expect=replace(model.config, num_classes=6))
    with pytest.raises(ValueError, match="holds a 'ImageMultiplexerModel'"):
        mux.ConcatPlexerModel.load(folder)


# ---------------------------------------------------------------- count_macs


def block_macs(tokens, d, hidden):
    """One timm block on ``tokens`` tokens: qkv + proj + MLP, q @ k^T and attn @ v, two LayerNorms (5 per element)."""
    return tokens * (3 * d * d + d * d + 2 * d * hidden) + 2 * tokens**2 * d + 2 * 5 * tokens * d


def test_count_macs_of_a_tiny_vit_by_hand():
    c, p, d, depth, hidden = 1, 2, D, 2, 4 * D
    with torch.device("meta"):
        model = mux.ViTClassifier(mux.VisionConfig(**TINY))
        counted = mux.count_macs(model, torch.empty(1, 1, c, 8, 8))
    expected = L * d * c * p * p + depth * block_macs(L + 1, d, hidden) + 5 * (L + 1) * d + d * CLASSES
    assert counted["total"] == expected
    assert counted["by_module"]["vit.patch_embed"] == L * d * c * p * p
    assert counted["by_module"]["vit.blocks.0"] == block_macs(L + 1, d, hidden)
    assert counted["by_module"]["vit.norm"] == 5 * (L + 1) * d
    assert counted["by_module"]["head"] == d * CLASSES
    with torch.device("meta"):
        assert mux.count_macs(model, torch.empty(1, 1, c, 8, 8), norms=False)["total"] == \
            expected - (2 * depth + 1) * 5 * (L + 1) * d


def test_count_macs_on_cpu_tensors_counts_attention_too():
    """torch's counter has no formula for the CPU's fused attention kernel; count_macs adds one."""
    torch.manual_seed(0)
    model = mux.ViTClassifier(mux.VisionConfig(**TINY))
    cpu = mux.count_macs(model, torch.zeros(1, 1, 1, 8, 8))["total"]
    expected = L * D * 4 + 2 * block_macs(L + 1, D, 4 * D) + 5 * (L + 1) * D + D * CLASSES
    assert cpu == expected


def test_count_macs_of_a_tiny_concatplexer_by_hand():
    n, k, depth, c, p, d, hidden = 2, 1, 3, 1, 2, D, 4 * D
    with torch.device("meta"):
        model = mux.ConcatPlexerModel(concat_config(n, k))
        counted = mux.count_macs(model, torch.empty(1, n, c, 8, 8))
    per_tuple = (n * L * d * c * p * p  # patch embedding, each image
                 + n * k * block_macs(L, d, hidden)  # the first k blocks, each image, at L tokens
                 + n * (L // n) * d * d * n  # conv1d: L/N outputs of d, each reading N tokens of d, each image
                 + (depth - k) * block_macs(L + 1, d, hidden)  # the rest, once per tuple, CLS + L tokens
                 + 5 * (L + 1) * d  # final LayerNorm
                 + n * d * d + 4 * n * d  # MLP demultiplexers: N linear maps on CLS + LayerNorm without affine
                 + n * d * CLASSES)  # head, each image
    assert counted["total"] == per_tuple
    assert counted["by_module"]["multiplexer"] == n * (L // n) * d * d * n
    assert counted["by_module"]["demultiplexer"] == n * d * d + 4 * n * d
    assert TABLE1 == {1: (2, 1), 2: (2, 3), 3: (2, 6), 4: (4, 1)}


def test_a_timm_model_by_name_gives_its_sizes_and_builds_offline():
    """VisionConfig.from_timm reads timm's sizes on the meta device; build_vit then creates that model
    (pretrained=False: nothing is downloaded) at another image size and class count."""
    config = mux.VisionConfig.from_timm("vit_tiny_patch16_224", image_size=32, in_chans=3, num_classes=3)
    assert (config.patch_size, config.embed_dim, config.depth, config.num_heads) == (16, 192, 12, 3)
    model = mux.ViTClassifier(config)
    assert model(torch.rand(2, 1, 3, 32, 32)).shape == (2, 1, 3)
    cp = mux.ConcatPlexerModel(mux.ConcatPlexerConfig(**config.to_dict(), n_mux=2, concat_point=6))
    assert cp(torch.rand(1, 2, 3, 32, 32)).shape == (1, 2, 3)
    wrong = mux.VisionConfig(**{**config.to_dict(), "depth": 4})
    with pytest.raises(ValueError, match="build it with VisionConfig.from_timm"):
        mux.ViTClassifier(wrong)
    with pytest.raises(ValueError, match="pretrained=True needs timm_name"):
        mux.VisionConfig(pretrained=True)


# ---------------------------------------------------------------- chapter 04's rework: CNN patchifier, attention


@pytest.mark.parametrize("image_size, patch_size", [(9, 2), (8, 3), (10, 4)])
def test_a_cnn_patchifier_refuses_an_image_size_its_stride_does_not_divide(image_size, patch_size):
    with pytest.raises(ValueError, match=rf"cnn patchifier .* image_size {image_size} is not divisible by "
                                         rf"patch_size {patch_size}"):
        mux.ImageMultiplexerConfig(**{**TINY, "image_size": image_size, "patch_size": patch_size}, n_mux=2,
                                   patchifier="cnn", num_codes=None)


def test_the_cnn_image_multiplexer_trains_without_a_codebook():
    """Chapter 04's main Image Multiplexer: the ViT's own patch embedding, no codes, cross-entropy alone."""
    torch.manual_seed(0)
    cfg = mux.ImageMultiplexerConfig(**TINY, n_mux=2, patchifier="cnn", num_codes=None)
    model = mux.ImageMultiplexerModel(cfg)
    assert model.code_embed is None and model.retrieval_head is None and model.tokenizer is None
    x, y = images(6, 1, 8, 8), torch.randint(0, CLASSES, (6,))
    result = mux.train(model, TensorDataset(x, y), mux.TrainConfig(max_steps=2, batch_size=6, cpu=True,
                                                                    progress=False), 2)
    assert result.steps == 2 and result.model(images(3, 2, 1, 8, 8)).shape == (3, 2, CLASSES)
    with pytest.raises(ValueError, match="token retrieval needs a codebook"):
        model(images(3, 2, 1, 8, 8), return_retrieval=True)


def test_the_concatplexer_cls_attention_reads_each_slot_from_its_own_tokens():
    """With k = 0 and the C-Multiplexer, tokens 0 .. L/N - 1 of the shared sequence are image 1's and the
    rest image 2's: changing image 2 leaves the first half of the sequence, before any block, unchanged."""
    model = concatplexer(n=2, k=0)
    a, b = images(1, 2, 1, 8, 8, seed=1), images(1, 2, 1, 8, 8, seed=2)
    b[:, 0] = a[:, 0]
    with torch.no_grad():
        ta, tb = model.multiplexer(model.patchify(a)), model.multiplexer(model.patchify(b))
    assert_close(ta[:, : L // 2], tb[:, : L // 2])
    assert not torch.allclose(ta[:, L // 2:], tb[:, L // 2:])
