"""Chapter 05 (multi-input multi-output): CutMix source masks, token CutMix, source attribution,
MixViT's parallel inference, MIMO / MixMo on a ViT and on a CNN, their loss, the single + CutMix control,
configurations, save/load, training, and the feature-sharing measurements (CKA, ablation)."""
import math
import shutil

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import mux
from mux.demultiplexers import SourceAttribution
from mux.losses import MultiInputLoss
from mux.models.mimo import MIMOCNNConfig, MIMOCNNModel, MIMOViTConfig, MIMOViTModel
from mux.models.mixvit import (ClassAttentionConfig, MixViTConfig, MixViTModel, SingleCutMix, Subnetwork,
                              ensemble_logits)
from mux.multiplexers import MIMOMultiplexer, TokenCutMixMultiplexer, cutmix_sources
from mux.similarity import ablation_scores, influence, linear_cka

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# init_values=1: with LayerScale's default 1e-4 the blocks barely touch their input at initialisation, and the
# logits of a fresh model hardly depend on the image (equalities would then hold trivially)
TINY = dict(image_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2, class_depth=1, num_classes=5,
            init_values=1.0)
L = 16  # (8 / 2)^2 tokens per image


def _mixvit(seed=0, **kw):
    torch.manual_seed(seed)
    return MixViTModel(MixViTConfig(**{**TINY, **kw}))


def _mimo(seed=0, **kw):
    torch.manual_seed(seed)
    return MIMOViTModel(MIMOViTConfig(**{**TINY, **kw}))


def _one_source(b, m, i, length=L):
    s = torch.zeros(b, m, length)
    s[:, i] = 1
    return s


# ---------------------------------------------------------------- cutmix_sources


def _reference_cutmix(seed, batch, m, side, p, alpha, one_source_prob=0.0):
    """The masks of ``cutmix_sources``, written out pixel by pixel from the same random draws in the same order."""
    torch.manual_seed(seed)
    lam = torch.distributions.Beta(alpha, alpha).sample((batch,))
    centre = torch.rand(batch, 2) * side
    tie_to_b = (torch.rand(batch, 1) < 0.5)[:, 0]
    perm = torch.rand(batch, m).argsort(dim=1)
    whole = torch.rand(batch) < one_source_prob
    picked = torch.randint(m, (int(whole.sum()), 1))[:, 0].tolist()
    g = side // p
    expected = torch.zeros(batch, m, g * g)
    ties = [0] * batch  # tied patches per example
    for e in range(batch):
        cut = torch.sqrt(1 - lam[e]) * side
        lo = [int(torch.round(centre[e, k] - cut / 2).clamp(0, side)) for k in range(2)]
        hi = [int(torch.round(centre[e, k] + cut / 2).clamp(0, side)) for k in range(2)]
        a, b = int(perm[e, 0]), int(perm[e, 1])
        for r in range(g):
            for c in range(g):
                inside = sum(1 for y in range(r * p, (r + 1) * p) for x in range(c * p, (c + 1) * p)
                             if lo[0] <= y < hi[0] and lo[1] <= x < hi[1])
                if 2 * inside > p * p:
                    src = b
                elif 2 * inside < p * p:
                    src = a
                else:
                    ties[e] += 1
                    src = b if tie_to_b[e] else a
                expected[e, src, r * g + c] = 1
        if whole[e]:
            expected[e] = 0
            expected[e, picked.pop(0)] = 1
    return expected, ties


@pytest.mark.parametrize("batch, m, side, p, alpha, prob", [
    (6, 2, 8, 2, 0.5, 0.0),
    (6, 2, 8, 2, 1.0, 0.0),
    (5, 2, 12, 3, 0.5, 0.0),  # 9 pixels per patch: never a tie
    (7, 3, 8, 2, 1.0, 0.0),
    (8, 4, 8, 4, 2.0, 0.5),
    (5, 2, 6, 1, 0.5, 0.0),  # patch 1: the mask is the pixel box itself
])
def test_cutmix_masks_are_the_majority_vote_of_a_pixel_box(batch, m, side, p, alpha, prob):
    ties_seen = no_tie_cases = 0
    for seed in range(6):
        torch.manual_seed(seed)
        mask = cutmix_sources(batch, m, side, p, alpha, one_source_prob=prob)
        expected, ties = _reference_cutmix(seed, batch, m, side, p, alpha, prob)
        assert mask.shape == (batch, m, (side // p) ** 2) and mask.dtype == torch.float32
        assert torch.equal(mask.sum(dim=1), torch.ones(batch, (side // p) ** 2))
        assert torch.equal(mask, expected), f"seed {seed}"
        ties_seen += sum(t > 0 for t in ties)
        no_tie_cases += sum(t == 0 for t in ties)
    assert no_tie_cases > 0  # examples without any tie are exact too, not only through the tie draw
    if p in (2, 4):
        assert ties_seen > 0  # and the tie draw is exercised


def test_cutmix_mask_on_a_case_worked_by_hand(monkeypatch):
    # lambda = 0.75: a box of side sqrt(0.25) * 8 = 4 pixels centred at (3, 5): rows 1..4, columns 3..6.
    # On the 4 x 4 grid of 2 x 2 patches: rows 1..4 cover half of patch rows 0 and 2 and all of row 1;
    # columns 3..6 cover half of patch columns 1 and 3 and all of column 2. Only patch (1, 2) has more
    # than half its pixels in the box; (0, 2), (2, 2), (1, 1), (1, 3) are ties, the rest mostly outside.
    class FixedBeta:
        def __init__(self, *args):
            pass

        def sample(self, shape):
            return torch.full(shape, 0.75)

    draws = iter([torch.tensor([[3.0 / 8, 5.0 / 8]]), torch.tensor([[0.9]]), torch.tensor([[0.2, 0.7]]),
                  torch.tensor([0.99])])
    monkeypatch.setattr(torch.distributions, "Beta", FixedBeta)
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: next(draws))
    mask = cutmix_sources(1, 2, 8, 2, 0.5)
    # pair = argsort([0.2, 0.7]) = (a=0, b=1); tie draw 0.9 >= 0.5: ties go to a
    from_b = torch.zeros(4, 4)
    from_b[1, 2] = 1
    assert torch.equal(mask[0, 1], from_b.flatten())
    assert torch.equal(mask[0, 0], 1 - from_b.flatten())


def test_cutmix_lambda_is_the_token_share():
    torch.manual_seed(0)
    mask = cutmix_sources(64, 2, 8, 2, 0.5)
    lam = mask.mean(dim=-1)
    for e in range(64):
        for s in range(2):
            assert lam[e, s].item() == pytest.approx(sum(mask[e, s].tolist()) / L)
    assert torch.allclose(lam.sum(dim=1), torch.ones(64))
    # both sources get the larger share in some examples: either may get the box
    assert (lam[:, 0] > 0.5).any() and (lam[:, 1] > 0.5).any()
    # a Beta(0.5, 0.5) lambda is often far from 1/2: some examples are truly mixed, not all one source
    assert ((lam[:, 0] > 0) & (lam[:, 0] < 1)).any()


def test_cutmix_one_source_prob_one_takes_every_token_from_one_source():
    torch.manual_seed(0)
    mask = cutmix_sources(200, 3, 8, 2, 1.0, one_source_prob=1.0)
    per_source = mask.sum(dim=-1)  # (B, M)
    assert torch.equal(per_source.max(dim=1).values, torch.full((200,), float(L)))
    assert torch.equal((per_source > 0).sum(dim=1), torch.ones(200, dtype=torch.long))
    assert set(per_source.argmax(dim=1).tolist()) == {0, 1, 2}  # drawn uniformly, every source happens


def test_cutmix_three_sources_use_at_most_two_per_example():
    torch.manual_seed(0)
    mask = cutmix_sources(300, 3, 8, 2, 1.0)
    used = mask.sum(dim=-1) > 0  # (B, M)
    assert (used.sum(dim=1) <= 2).all()
    assert (used.sum(dim=1) == 2).any()
    assert used.any(dim=0).all()  # each of the three sources takes part in some mixture
    assert torch.equal(mask.sum(dim=1), torch.ones(300, L))


@pytest.mark.parametrize("kwargs, match", [
    (dict(m=1), "m >= 2"),
    (dict(m=0), "m >= 2"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"),
    (dict(image_size=9), "not divisible by patch_size"),
    (dict(one_source_prob=1.5), "one_source_prob"),
])
def test_cutmix_refuses_bad_arguments(kwargs, match):
    args = {"batch": 2, "m": 2, "image_size": 8, "patch_size": 2, "alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        cutmix_sources(**args)


# ---------------------------------------------------------------- token CutMix multiplexer


def test_token_cutmix_equals_mixing_pixel_patches_then_embedding():
    model = _mixvit()
    embed = model.backbone.patch_embed
    b, m, p, g = 5, 2, 2, 4
    torch.manual_seed(1)
    images = torch.randn(b, m, 1, 8, 8)
    mask = cutmix_sources(b, m, 8, p, 0.5)
    assert ((mask.sum(dim=-1) > 0).sum(dim=1) == 2).any()  # some example truly mixes both
    mixed = torch.empty(b, 1, 8, 8)
    for e in range(b):
        for r in range(g):
            for c in range(g):
                src = int(mask[e, :, r * g + c].argmax())
                mixed[e, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = images[e, src, :, r * p:(r + 1) * p,
                                                                          c * p:(c + 1) * p]
    with torch.no_grad():
        pixel_then_embed = embed(mixed)  # (B, L, d)
        tokens = embed(images.flatten(0, 1)).view(b, m, L, 16)
        token_mix = TokenCutMixMultiplexer(m, 16)(tokens, mask)
    assert token_mix.shape == (b, L, 16)
    assert torch.allclose(pixel_then_embed, token_mix, atol=1e-6)
    # and it is not the mean of the two: the mask matters
    assert not torch.allclose(token_mix, tokens.mean(dim=1), atol=1e-3)


def test_token_cutmix_refuses_a_missing_or_non_one_hot_mask():
    mux_ = TokenCutMixMultiplexer(2, 4)
    x = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="needs a source mask"):
        mux_(x)
    both = torch.ones(2, 2, 3)  # two sources at every position
    with pytest.raises(ValueError, match="exactly one"):
        mux_(x, both)
    none = torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        mux_(x, none)
    fine = _one_source(2, 2, 1, 3)
    assert torch.equal(mux_(x, fine), x[:, 1])


def test_mimo_multiplexer_is_a_weighted_sum_of_per_source_encoders():
    torch.manual_seed(0)
    mm = MIMOMultiplexer(2, 8, 4)
    x = torch.randn(3, 2, 5, 4)
    e = [x[:, i] @ mm.weight[i].T + mm.bias[i] for i in range(2)]
    with torch.no_grad():
        assert torch.allclose(mm(x), e[0] + e[1], atol=1e-6)
        w = torch.rand(3, 2, 5)
        assert torch.allclose(mm(x, w), w[:, 0, :, None] * e[0] + w[:, 1, :, None] * e[1], atol=1e-6)


# ---------------------------------------------------------------- source attribution


def test_source_attribution_embedding_adds_one_vector_per_subnetwork():
    torch.manual_seed(0)
    sa = SourceAttribution(3, 8, "embedding")
    t = torch.randn(2, 5, 8)
    with torch.no_grad():
        tiled = sa(t)
        assert tiled.shape == (2, 3, 5, 8)
        for i in range(3):
            assert torch.allclose(tiled[:, i], t + sa.bias[i])
        assert not torch.allclose(tiled[:, 0], tiled[:, 1])
        for i in range(3):
            one = sa(t, sources=_one_source(2, 3, i, 5))
            assert one.shape == (2, 5, 8)
            assert torch.allclose(one, tiled[:, i])
        # a mixed mask: each token gets its own source's vector
        mask = F.one_hot(torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]]), 3).transpose(1, 2).float()
        mixed = sa(t, sources=mask)
        for e in range(2):
            for pos in range(5):
                assert torch.allclose(mixed[e, pos], t[e, pos] + sa.bias[int(mask[e, :, pos].argmax())])
    assert sa.no_weight_decay() == {"bias"}


def test_source_attribution_encoding_adds_a_linear_map_per_subnetwork():
    torch.manual_seed(0)
    sa = SourceAttribution(2, 8, "encoding")
    t = torch.randn(3, 4, 8)
    with torch.no_grad():
        tiled = sa(t)
        assert tiled.shape == (3, 2, 4, 8)
        for i in range(2):
            assert torch.allclose(tiled[:, i], t + t @ sa.weight[i].T + sa.bias[i], atol=1e-6)
            assert torch.allclose(sa(t, sources=_one_source(3, 2, i, 4)), tiled[:, i], atol=1e-6)


def test_source_attribution_none_and_errors():
    sa = SourceAttribution(2, 8, "none")
    assert sa.bias is None and sa.weight is None and list(sa.parameters()) == []
    t = torch.randn(2, 4, 8)
    assert torch.equal(sa(t, sources=_one_source(2, 2, 0, 4)), t)
    assert torch.equal(sa(t), t.unsqueeze(1).expand(-1, 2, -1, -1))
    with pytest.raises(ValueError, match="unknown source attribution"):
        SourceAttribution(2, 8, "bogus")
    with pytest.raises(ValueError, match="source mask"):
        SourceAttribution(2, 8)(t, sources=torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="patch tokens"):
        SourceAttribution(2, 8)(torch.randn(2, 8))


# ---------------------------------------------------------------- MixViT: parallel inference


@pytest.mark.parametrize("backbone", ["cait", "convit"])
@pytest.mark.parametrize("source", ["embedding", "encoding"])
def test_parallel_inference_equals_each_subnetwork_alone(backbone, source):
    model = _mixvit(backbone=backbone, source=source, subnetworks=3).eval()
    torch.manual_seed(5)
    x = torch.randn(4, 1, 1, 8, 8)
    m, b = 3, 4
    calls = {"blocks": [], "class": []}
    h1 = model.backbone.blocks[0].register_forward_hook(lambda mod, args, out: calls["blocks"].append(args[0].shape))
    h2 = model.class_blocks[0].register_forward_hook(lambda mod, args, out: calls["class"].append(args[0].shape))
    with torch.no_grad():
        sub = model(x, return_subnetworks=True)
    h1.remove(), h2.remove()
    assert sub.shape == (b, m, 5)
    assert len(calls["blocks"]) == 1 and calls["blocks"][0][0] == b  # the feature blocks once, on B images
    assert len(calls["class"]) == 1 and calls["class"][0][0] == b * m  # class attention once, B * M rows
    with torch.no_grad():
        for i in range(m):
            alone = model(x.repeat(1, m, 1, 1, 1), sources=_one_source(b, m, i))
            assert alone.shape == (b, m, 5)
            torch.testing.assert_close(sub[:, i], alone[:, i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(Subnetwork(model, i)(x), sub[:, i:i + 1], rtol=0, atol=0)
            torch.testing.assert_close(model.subnetwork(i)(x), sub[:, i:i + 1], rtol=0, atol=0)
        ens = model(x)
    # the subnetworks differ (source attribution and their own heads), and the logits depend on the image
    assert not torch.allclose(sub[:, 0], sub[:, 1], atol=1e-3)
    assert not torch.allclose(sub[0], sub[1], atol=1e-3)
    assert ens.shape == (b, 1, 5)
    torch.testing.assert_close(ens, torch.log(torch.softmax(sub, dim=-1).mean(dim=1, keepdim=True)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble_logits(sub), ens)
    with pytest.raises(ValueError, match="out of range"):
        model.subnetwork(m)


def test_training_pass_routes_each_token_to_its_source_attribution():
    # with a mixed mask, the training pass equals mixing by hand, then attributing per token
    model = _mixvit(source="encoding").eval()
    torch.manual_seed(2)
    x = torch.randn(3, 2, 1, 8, 8)
    mask = cutmix_sources(3, 2, 8, 2, 1.0)
    with torch.no_grad():
        out = model(x, sources=mask)
        tok = model.add_positions(model.backbone.patch_embed(x.flatten(0, 1))).view(3, 2, L, 16)
        mixed = (tok * mask[..., None]).sum(dim=1)
        t = model.extract(mixed)
        s = torch.stack([t + t @ model.attribution.weight[i].T + model.attribution.bias[i] for i in range(2)], 1)
        t_star = (s * mask[..., None]).sum(dim=1)
        cls = model.classify(t_star)
        expected = torch.stack([model.heads[i](cls) for i in range(2)], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_single_subnetwork_is_the_plain_backbone():
    model = _mixvit(subnetworks=1, source="none").eval()
    assert model.multiplexer is None and model.attribution is None and len(model.heads) == 1
    x = torch.randn(2, 1, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        t = model.extract(model.add_positions(model.backbone.patch_embed(x[:, 0])))
        expected = model.heads[0](model.classify(t))
    assert out.shape == (2, 1, 5)
    torch.testing.assert_close(out[:, 0], expected)
    with pytest.raises(ValueError, match="M >= 2"):
        model(x, sources=torch.ones(2, 1, L))


# ---------------------------------------------------------------- the loss


def _batch(b=6, classes=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(classes, (b,), generator=g)


def test_token_cutmix_loss_weights_each_input_by_its_token_share():
    model = _mixvit()
    images, labels = _batch()
    loss_fn = MultiInputLoss("token_cutmix")
    assert loss_fn.alpha == 0.5
    torch.manual_seed(11)
    terms = loss_fn(model, (images, labels), 1)
    # the same draws, in the loss's order: the permutation of the second input, then the masks
    torch.manual_seed(11)
    order = torch.stack([torch.arange(6), torch.randperm(6)], dim=1)
    mask = cutmix_sources(6, 2, 8, 2, 0.5)
    with torch.no_grad():
        logits = model(images[order], sources=mask)
    expected = 0.0
    for e in range(6):
        for i in range(2):
            share = mask[e, i].sum().item() / L
            ce = F.cross_entropy(logits[e, i][None], labels[order[e, i]][None]).item()
            expected += share * ce
    expected /= 6
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-5)
    main = mask.sum(dim=-1).argmax(dim=1)
    acc = sum(int(logits[e, main[e]].argmax() == labels[order[e, main[e]]]) for e in range(6)) / 6
    assert terms["acc"].item() == pytest.approx(acc)
    terms["loss"].backward()  # a real training loss
    assert model.attribution.bias.grad is not None and model.attribution.bias.grad.abs().sum() > 0


def test_token_cutmix_loss_with_a_fixed_mask(monkeypatch):
    # an independent check of the weights: a mask fixed by hand, 12 tokens from input 0 and 4 from input 1
    model = _mixvit(seed=1)
    images, labels = _batch(b=4, seed=4)
    mask = torch.zeros(4, 2, L)
    mask[:, 0, :12] = 1
    mask[:, 1, 12:] = 1
    mask[1] = mask[1].flip(0)  # example 1: 4 tokens from input 0, 12 from input 1
    seen = {}

    def fixed(batch, m, image_size, patch_size, alpha, one_source_prob=0.0, device=None):
        seen.update(batch=batch, m=m, image_size=image_size, patch_size=patch_size, alpha=alpha,
                    one_source_prob=one_source_prob)
        return mask.clone()

    monkeypatch.setattr("mux.multiplexers.cutmix_sources", fixed)
    loss_fn = MultiInputLoss("token_cutmix", alpha=0.7)
    loss_fn.set_step(0, 100)
    torch.manual_seed(0)
    loss = loss_fn(model, (images, labels), 1)["loss"]
    assert seen == dict(batch=4, m=2, image_size=8, patch_size=2, alpha=0.7, one_source_prob=0.0)
    torch.manual_seed(0)
    second = torch.randperm(4)
    with torch.no_grad():
        x = torch.stack([images, images[second]], dim=1)
        logits = model(x, sources=mask)
    ce0 = F.cross_entropy(logits[:, 0], labels, reduction="none")
    ce1 = F.cross_entropy(logits[:, 1], labels[second], reduction="none")
    w0 = torch.tensor([0.75, 0.25, 0.75, 0.75])
    expected = (w0 * ce0 + (1 - w0) * ce1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the unweighted sum differs: the weights are what make it this number
    assert loss.item() != pytest.approx((ce0 + ce1).mean().item(), rel=1e-3)


def test_sum_loss_weights_every_input_one():
    model = _mimo()
    images, labels = _batch()
    loss_fn = MultiInputLoss("sum")
    assert loss_fn.alpha is None
    sources, weights = loss_fn.mix(6, 2, model.config)
    assert torch.equal(sources, torch.ones(6, 2, L)) and torch.equal(weights, torch.ones(6, 2))
    torch.manual_seed(7)
    loss = loss_fn(model, (images, labels), 1)["loss"]
    torch.manual_seed(7)
    order = torch.stack([torch.arange(6), torch.randperm(6)], dim=1)
    with torch.no_grad():
        logits = model(images[order], sources=torch.ones(6, 2, L))
    expected = sum(F.cross_entropy(logits[:, i], labels[order[:, i]]) for i in range(2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("m", [2, 3])
def test_mixmo_weights(m):
    config = MIMOViTConfig(**{**TINY, "subnetworks": m})
    loss_fn = MultiInputLoss("mixmo")
    assert loss_fn.alpha == 2.0
    torch.manual_seed(0)
    sources, weights = loss_fn.mix(400, m, config)
    assert sources.shape == (400, m, L) and weights.shape == (400, m)
    assert torch.allclose(weights.sum(dim=1), torch.ones(400))
    is_cut = ((sources == 0) | (sources == 2)).all(dim=(1, 2)) & (sources.sum(dim=1) == 2).all(dim=1)
    constant = (sources == sources[:, :, :1]).all(dim=2).all(dim=1)
    is_linear = constant & torch.isclose(sources[:, :, 0], 2 * weights).all(dim=1) & ~is_cut
    for e in range(400):
        if is_cut[e]:
            torch.testing.assert_close(weights[e], sources[e].mean(dim=-1) / 2)
        else:
            assert constant[e]
            torch.testing.assert_close(sources[e, :, 0], 2 * weights[e])
            assert ((weights[e] > 0).sum() <= 2).item()
    assert 120 < int(is_cut.sum()) < 280  # cut_prob 0.5
    assert is_linear.any()
    # cut_prob 1: all cut; over the final ramp the cut probability falls to 0: all linear
    torch.manual_seed(0)
    all_cut, _ = MultiInputLoss("mixmo", cut_prob=1.0).mix(50, m, config)
    assert ((all_cut == 0) | (all_cut == 2)).all() and (all_cut.sum(dim=1) == 2).all()
    end = MultiInputLoss("mixmo", cut_prob=1.0)
    end.set_step(100, 100)
    linear, w = end.mix(50, m, config)
    assert (linear == linear[:, :, :1]).all() and torch.allclose(linear[:, :, 0], 2 * w)


def test_mixmo_loss_runs_on_mimo():
    model = _mimo()
    images, labels = _batch()
    torch.manual_seed(0)
    terms = MultiInputLoss("mixmo")(model, (images, labels), 1)
    assert torch.isfinite(terms["loss"]) and terms["loss"].item() > 0


def test_ramp_follows_the_last_twelfth_of_training():
    # set_step(step, max_steps) comes before step + 1 of max_steps: the last step (step = 119) is at the end
    loss_fn = MultiInputLoss()
    values = []
    for step in (0, 50, 100, 108):
        loss_fn.set_step(step, 120)
        values.append(loss_fn.ramp())
    assert values == [0.0, 0.0, 0.0, 0.0]
    loss_fn.set_step(109, 120)
    assert loss_fn.ramp() == pytest.approx(0.0, abs=1e-9)
    loss_fn.set_step(114, 120)
    assert loss_fn.ramp() == pytest.approx(0.5)
    loss_fn.set_step(116, 120)
    assert loss_fn.ramp() == pytest.approx(0.7)
    loss_fn.set_step(119, 120)
    assert loss_fn.ramp() == pytest.approx(1.0)
    half = MultiInputLoss(final_fraction=0.5)
    half.set_step(2, 4)
    assert half.ramp() == pytest.approx(0.5)
    assert MultiInputLoss(final_fraction=0.0).ramp() == 0.0
    # at the last step every example takes all its tokens from one input, and its weight is 1
    loss_fn.set_step(119, 120)
    torch.manual_seed(0)
    sources, weights = loss_fn.mix(30, 2, MixViTConfig(**TINY))
    assert torch.equal(weights.max(dim=1).values, torch.ones(30))
    assert torch.equal(sources.sum(dim=-1).max(dim=1).values, torch.full((30,), float(L)))


def test_multi_input_loss_errors():
    images, labels = _batch()
    with pytest.raises(ValueError, match="n=1"):
        MultiInputLoss()(_mixvit(), (images, labels), 2)
    with pytest.raises(ValueError, match="M >= 2"):
        MultiInputLoss()(_mixvit(subnetworks=1, source="none"), (images, labels), 1)
    with pytest.raises(ValueError, match="unknown mixing"):
        MultiInputLoss("mixup")
    with pytest.raises(ValueError, match="alpha"):
        MultiInputLoss(alpha=0)
    with pytest.raises(ValueError, match="final_fraction"):
        MultiInputLoss(final_fraction=2)


# ---------------------------------------------------------------- configurations


def test_config_errors():
    with pytest.raises(ValueError, match="subnetworks >= 2|source='none'"):
        MixViTConfig(subnetworks=1, source="embedding")
    MixViTConfig(subnetworks=1, source="none")  # the single-input baseline is fine
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        MixViTConfig(image_size=9, patch_size=2)
    with pytest.raises(ValueError, match="class-attention"):
        MixViTConfig(timm_name="vit_small_patch16_224")
    with pytest.raises(ValueError, match="class-attention"):
        MixViTConfig.from_timm("vit_small_patch16_224")
    with pytest.raises(ValueError, match="not a convit"):
        MixViTConfig(timm_name="cait_xxs24_224", backbone="convit")
    with pytest.raises(ValueError, match="class_depth"):
        MixViTConfig(class_depth=0)
    with pytest.raises(ValueError, match="unknown backbone"):
        MixViTConfig(backbone="swin")
    with pytest.raises(ValueError, match="unknown source attribution"):
        MixViTConfig(source="bogus")
    with pytest.raises(ValueError, match="init_values"):
        MixViTConfig(init_values=0)
    with pytest.raises(ValueError, match="M >= 2"):
        MIMOViTConfig(subnetworks=1)
    assert isinstance(MIMOViTConfig(), ClassAttentionConfig)


def test_from_timm_reads_the_sizes_without_downloading():
    cait = MixViTConfig.from_timm("cait_xxs24_224")
    assert (cait.backbone, cait.depth, cait.class_depth, cait.embed_dim, cait.patch_size, cait.image_size,
            cait.num_heads) == ("cait", 24, 2, 192, 16, 224, 4)
    convit = MixViTConfig.from_timm("convit_tiny")
    assert (convit.backbone, convit.depth, convit.class_depth, convit.embed_dim, convit.num_heads) == (
        "convit", 10, 2, 192, 4)
    assert convit.timm_name == "convit_tiny" and not convit.pretrained
    assert MixViTConfig.from_timm("convit_tiny", subnetworks=3, image_size=32).image_size == 32
    assert MIMOViTConfig.from_timm("cait_xxs24_224").depth == 24


# ---------------------------------------------------------------- save and load


@pytest.mark.parametrize("backbone", ["cait", "convit"])
def test_save_and_load(tmp_path, backbone):
    model = _mixvit(backbone=backbone, source="encoding").eval()
    with torch.no_grad():  # make the weights unlike a fresh model's
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "m")
    loaded = MixViTModel.load(tmp_path / "m").eval()
    assert loaded.config == model.config
    x = torch.randn(3, 1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, return_subnetworks=True), model(x, return_subnetworks=True),
                                   rtol=0, atol=0)
        fresh = _mixvit(seed=9, backbone=backbone, source="encoding").eval()
        assert not torch.allclose(fresh(x), model(x))
    MixViTModel.load(tmp_path / "m", expect=model.config)
    with pytest.raises(ValueError, match="MIMOViTModel"):
        MIMOViTModel.load(tmp_path / "m")
    with pytest.raises(ValueError, match="subnetworks"):
        MixViTModel.load(tmp_path / "m", expect=MixViTConfig(**{**TINY, "backbone": backbone, "source": "encoding",
                                                                 "subnetworks": 3}))
    other = "convit" if backbone == "cait" else "cait"
    with pytest.raises(ValueError, match="backbone"):
        MixViTModel.load(tmp_path / "m", expect=MixViTConfig(**{**TINY, "backbone": other, "source": "encoding"}))


def test_mimo_save_and_load(tmp_path):
    model = _mimo().eval()
    model.save(tmp_path / "mimo")
    loaded = MIMOViTModel.load(tmp_path / "mimo").eval()
    x = torch.randn(2, 1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="MixViTModel"):
        MixViTModel.load(tmp_path / "mimo")


# ---------------------------------------------------------------- MIMO on a ViT


@pytest.mark.parametrize("backbone", ["cait", "convit"])
def test_mimo_sum_training_pass_on_one_image_equals_sum_inference(backbone):
    model = _mimo(backbone=backbone, subnetworks=3).eval()
    torch.manual_seed(0)
    x = torch.randn(4, 1, 1, 8, 8)
    with torch.no_grad():
        infer = model(x, return_subnetworks=True)
        train = model(x.repeat(1, 3, 1, 1, 1), sources=torch.ones(4, 3, L))
        ens = model(x)
        other = model(torch.cat([x, torch.randn(4, 2, 1, 8, 8)], dim=1), sources=torch.ones(4, 3, L))
    assert infer.shape == train.shape == (4, 3, 5) and ens.shape == (4, 1, 5)
    torch.testing.assert_close(train, infer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ens, ensemble_logits(infer))
    assert not torch.allclose(other, infer, atol=1e-4)  # other images: another result
    # the input encoders are what tells the subnetworks apart: each source has its own
    assert not torch.allclose(model.multiplexer.weight[0], model.multiplexer.weight[1])
    assert isinstance(model.backbone.patch_embed, torch.nn.Identity)


def test_mimo_patches_are_the_row_major_pixel_patches():
    model = _mimo()
    images = torch.arange(64.0).view(1, 1, 8, 8)
    patches = model.patches(images)
    assert patches.shape == (1, L, 4)
    assert patches[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0]
    assert patches[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]
    assert patches[0, 4].tolist() == [16.0, 17.0, 24.0, 25.0]


# ---------------------------------------------------------------- training end to end


def _data(size=16, classes=5):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(size, 1, 8, 8, generator=g), torch.randint(classes, (size,), generator=g))


def test_train_and_evaluate_end_to_end():
    data = _data()
    model = _mixvit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mux.train(model, data, mux.TrainConfig(max_steps=3, batch_size=8, cpu=True, progress=False, seed=0,
                                                     log_every=1), 1, MultiInputLoss())
    assert result.steps == 3 and len(result.history) == 3
    assert all(math.isfinite(h["loss"]) for h in result.history)
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ev = mux.evaluate(result.model, data, 1)
    assert ev["n_examples"] == 16
    assert 0.0 <= ev["accuracy"] <= 1.0
    # the accuracy is the ensemble's over all 16 examples
    with torch.no_grad():
        logits = result.model.eval()(data.tensors[0][:, None])
    assert ev["accuracy"] == pytest.approx((logits[:, 0].argmax(-1) == data.tensors[1]).float().mean().item())


def test_loss_is_told_the_step_by_train():
    seen = []

    class Recording(MultiInputLoss):
        def set_step(self, step, max_steps):
            seen.append((step, max_steps))
            super().set_step(step, max_steps)

    mux.train(_mixvit(), _data(), mux.TrainConfig(max_steps=3, batch_size=8, cpu=True, progress=False, seed=0),
              1, Recording())
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    data = _data()

    def cfg(**kw):
        return mux.TrainConfig(max_steps=6, batch_size=8, cpu=True, progress=False, seed=0, log_every=1, **kw)

    def loss():  # a ramp over the second half, so the schedule matters after the break
        return MultiInputLoss(final_fraction=0.5)

    full = mux.train(_mixvit(), data, cfg(), 1, loss())
    ckpt = tmp_path / "ckpt"
    first = mux.train(_mixvit(), data, cfg(checkpoint_dir=str(ckpt), checkpoint_every=3), 1, loss())
    names = [p.name for p in mux.list_checkpoints(ckpt)]
    assert names == ["checkpoint-00000003", "checkpoint-00000006"]
    shutil.rmtree(ckpt / names[-1])  # as if interrupted after step 3
    resumed = mux.train(_mixvit(), data, cfg(checkpoint_dir=str(ckpt), checkpoint_every=3, resume=True), 1, loss())
    assert resumed.resumed_from == 3 and resumed.steps == 6
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {k} differs")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in first.history] == \
        [h["loss"] for h in full.history]


# ---------------------------------------------------------------- the CutMix control: single + token CutMix


def _single(seed=0):
    return _mixvit(seed, subnetworks=1, source="none")


def test_single_cutmix_infers_with_the_wrapped_model_on_one_image():
    single = _single()
    control = SingleCutMix(single)
    x = torch.randn(4, 1, 1, 8, 8)
    assert torch.equal(control(x), single(x)) and control(x).shape == (4, 1, 5)


def test_single_cutmix_mixes_tokens_as_mixvit_does_and_makes_one_prediction():
    single = _single()
    control = SingleCutMix(single)
    x = torch.randn(3, 2, 1, 8, 8)
    torch.manual_seed(1)
    sources = cutmix_sources(3, 2, 8, 2, 0.5)
    out = control(x, sources=sources)
    assert out.shape == (3, 2, 5) and torch.equal(out[:, 0], out[:, 1])  # one prediction, scored against both labels
    tokens = single.add_positions(single.backbone.patch_embed(x.flatten(0, 1))).view(3, 2, L, -1)
    mixed = (sources.unsqueeze(-1) * tokens).sum(1)  # each position from one image
    expected = single.heads[0](single.classify(single.extract(mixed)))
    torch.testing.assert_close(out[:, 0], expected)
    only_first = _one_source(3, 2, 0)  # every token from image 0: the single model on image 0
    torch.testing.assert_close(control(x, sources=only_first)[:, 0], single(x[:, :1])[:, 0], atol=1e-5, rtol=0)


def test_single_cutmix_loss_is_the_lambda_weighted_cross_entropy():
    control = SingleCutMix(_single())
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(5, (6,))
    torch.manual_seed(0)
    got = MultiInputLoss("token_cutmix")(control, (images, labels), 1)["loss"]
    torch.manual_seed(0)  # the same draws: the partner order, then the masks
    order = torch.stack([torch.arange(6), torch.randperm(6)], dim=1)
    sources = cutmix_sources(6, 2, 8, 2, 0.5)
    logits = control(images[order], sources=sources)[:, 0]
    lam = sources.mean(-1)
    expected = (lam[:, 0] * F.cross_entropy(logits, labels[order[:, 0]], reduction="none")
                + lam[:, 1] * F.cross_entropy(logits, labels[order[:, 1]], reduction="none")).mean()
    torch.testing.assert_close(got, expected)


def test_single_cutmix_refuses_a_multi_output_model():
    with pytest.raises(ValueError, match="wraps the single-input MixViTModel"):
        SingleCutMix(_mixvit())
    with pytest.raises(ValueError, match="CutMix mixes M >= 2 images"):
        SingleCutMix(_single(), inputs=1)


def test_single_cutmix_trains_end_to_end():
    control = SingleCutMix(_single())
    result = mux.train(control, _data(), mux.TrainConfig(max_steps=2, batch_size=8, cpu=True, progress=False, seed=0),
                       1, MultiInputLoss("token_cutmix"))
    assert result.steps == 2 and mux.evaluate(result.model, _data(), 1)["n_examples"] == 16


# ---------------------------------------------------------------- what each head reads


@pytest.mark.parametrize("source", ["embedding", "encoding", "none"])
def test_subnetwork_features_are_what_the_heads_read(source):
    model = _mixvit(source=source).eval()
    x = torch.randn(3, 1, 1, 8, 8)
    feats = model.subnetwork_features(x)
    assert feats.shape == (3, 2, 16)
    logits = torch.stack([h(feats[:, i]) for i, h in enumerate(model.heads)], dim=1)
    torch.testing.assert_close(logits, model(x, return_subnetworks=True))
    if source == "none":  # no attribution: both heads read the same class token
        torch.testing.assert_close(feats[:, 0], feats[:, 1])


def test_mimo_vit_subnetwork_features_are_shared():
    model = _mimo().eval()
    x = torch.randn(2, 1, 1, 8, 8)
    feats = model.subnetwork_features(x)
    torch.testing.assert_close(torch.stack([h(feats[:, i]) for i, h in enumerate(model.heads)], 1),
                               model(x, return_subnetworks=True))


# ---------------------------------------------------------------- MIMO / MixMo on a CNN


def _cnn(seed=0, **kw):
    torch.manual_seed(seed)
    return MIMOCNNModel(MIMOCNNConfig(**{"width": 8, "num_classes": 5, **kw}))


def test_mimo_cnn_inference_sums_the_encoders_on_one_image():
    model = _cnn().eval()
    x = torch.randn(3, 1, 1, 8, 8)
    ones = torch.ones(3, 2, 64)
    torch.testing.assert_close(model(x, return_subnetworks=True), model(x.expand(-1, 2, -1, -1, -1), sources=ones))
    torch.testing.assert_close(model(x)[:, 0].exp(), model(x, return_subnetworks=True).softmax(-1).mean(1))
    torch.testing.assert_close(model.subnetwork(1)(x)[:, 0], model(x, return_subnetworks=True)[:, 1])


def test_mimo_cnn_mixes_pixel_by_pixel():
    model = _cnn()
    x = torch.randn(2, 2, 1, 8, 8)
    w = torch.rand(2, 2, 64)
    mixed = sum(w[:, i].view(2, 1, 8, 8) * model.encoders[i](x[:, i]) for i in range(2))
    expected = torch.stack([h(model.trunk(mixed)) for h in model.heads], dim=1)
    torch.testing.assert_close(model(x, sources=w), expected)


def test_mimo_cnn_trains_with_the_mixmo_loss():
    result = mux.train(_cnn(), _data(), mux.TrainConfig(max_steps=2, batch_size=8, cpu=True, progress=False, seed=0),
                       1, MultiInputLoss("mixmo"))
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_mimo_cnn_config_errors():
    with pytest.raises(ValueError, match="M >= 2"):
        MIMOCNNConfig(subnetworks=1)
    with pytest.raises(ValueError, match="patch_size must be 1"):
        MIMOCNNConfig(patch_size=2)


# ---------------------------------------------------------------- feature sharing: CKA and ablation


def test_linear_cka_is_one_for_rotated_and_scaled_features_and_small_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    assert linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(200, 6, generator=g)) < 0.15
    with pytest.raises(ValueError, match="same n items"):
        linear_cka(x, x[:10])


def test_influence_is_the_column_l1_norm():
    w = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 0.5, 0.0]])
    assert influence(w).tolist() == [4.0, 2.5, 0.0]


def test_ablation_removes_the_source_heads_top_features_for_every_head():
    # head 0 reads feature 0 only, head 1 feature 1 only: removing head 0's top feature breaks head 0 alone
    feats = torch.zeros(4, 2, 3)
    labels = torch.tensor([0, 1, 0, 1])
    feats[:, :, 0] = torch.where(labels == 1, 1.0, -1.0)[:, None]
    feats[:, :, 1] = feats[:, :, 0]
    weights = torch.zeros(2, 2, 3)
    weights[0, 1, 0], weights[1, 1, 1] = 1.0, 1.0
    biases = torch.zeros(2, 2)
    biases[:, 0] = 0.5
    out = ablation_scores(feats, weights, biases, labels, k=1, source=0, random_draws=3)
    assert out["before"].mean(0).tolist() == [1.0, 1.0]
    assert out["top"].mean(0).tolist() == [0.5, 1.0]  # head 0 now says class 0 for everything
    assert out["random"].shape == (4, 2)
    with pytest.raises(ValueError, match="expected 1 <= k < d"):
        ablation_scores(feats, weights, biases, labels, k=3)
