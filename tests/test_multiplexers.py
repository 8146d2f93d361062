import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mux
from mux.multiplexers import MULTIPLEXERS

# the fixed DataMUX multiplexers; the contextual one (trained layers, token sequences only) is
# tested in tests/test_mux_plm.py
KINDS = sorted(k for k in MULTIPLEXERS if k not in ("contextual", "mlp_orthogonal"))  # the fixed ones


@settings(deadline=None, max_examples=30)
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 9), d=st.integers(9, 40), b=st.integers(1, 3),
       middle=st.lists(st.integers(1, 3), max_size=2))
def test_shapes_for_any_n(kind, n, d, b, middle):
    m = mux.make_multiplexer(kind, n, d, seed=0)
    x = torch.randn(b, n, *middle, d)
    assert m(x).shape == (b, *middle, d)
    assert m.transform(x).shape == x.shape


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 6), d=st.integers(1, 32), seed=st.integers(0, 10_000))
def test_orthogonal_matrices_are_orthogonal(n, d, seed):
    w = mux.OrthogonalMultiplexer(n, d, seed=seed).weight
    eye = torch.eye(d).expand(n, d, d)
    torch.testing.assert_close(w @ w.transpose(1, 2), eye, atol=1e-5, rtol=0)


def test_orthogonal_matches_hand_built_qr_with_sign_fix():
    n, d, seed = 3, 8, 5
    g = torch.Generator().manual_seed(seed)
    expected = []
    for _ in range(n):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g))
        expected.append(q * torch.diag(r).sign())
    torch.testing.assert_close(mux.OrthogonalMultiplexer(n, d, seed).weight, torch.stack(expected))


def test_mixture_is_mean_of_transformed_instances():
    m = mux.OrthogonalMultiplexer(4, 6, seed=1)
    x = torch.randn(2, 4, 6)
    expected = sum(x[:, i] @ m.weight[i].T for i in range(4)) / 4
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_determinism_from_seed_and_buffers(kind):
    a, b = mux.make_multiplexer(kind, 4, 16, seed=3), mux.make_multiplexer(kind, 4, 16, seed=3)
    assert torch.equal(a.weight, b.weight)
    assert "weight" in dict(a.named_buffers()) and not list(a.parameters())
    assert "weight" in a.state_dict()


def test_different_seeds_differ_for_random_kinds():
    for kind in ("orthogonal", "gaussian_hadamard"):
        a, b = mux.make_multiplexer(kind, 2, 16, seed=0), mux.make_multiplexer(kind, 2, 16, seed=1)
        assert not torch.equal(a.weight, b.weight)


def test_gaussian_rows_have_unit_mean_square():
    w = mux.GaussianHadamardMultiplexer(5, 64, seed=0).weight
    torch.testing.assert_close(w.pow(2).mean(dim=1), torch.ones(5))


def test_binary_blocks_partition_the_dimensions():
    w = mux.BinaryHadamardMultiplexer(3, 10).weight
    torch.testing.assert_close(w.sum(0), torch.ones(10))
    assert w.sum(1).tolist() == [4.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="d >= N"):
        mux.BinaryHadamardMultiplexer(8, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_shapes_get_clear_errors(kind):
    m = mux.make_multiplexer(kind, 4, 16)
    with pytest.raises(ValueError, match=r"expects \(B, N=4, \.\.\., d=16\), got shape \(2, 4, 15\)"):
        m(torch.zeros(2, 4, 15))
    with pytest.raises(ValueError, match="N=4"):
        m(torch.zeros(2, 3, 16))
    with pytest.raises(ValueError, match="got shape"):
        m(torch.zeros(4, 16))


def test_unknown_multiplexer_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown multiplexer 'fourier'"):
        mux.make_multiplexer("fourier", 2, 8)
    with pytest.raises(ValueError, match="N"):
        mux.make_multiplexer("orthogonal", 0, 8)
    with pytest.raises(ValueError, match="d"):
        mux.make_multiplexer("orthogonal", 2, 0)


# --- the numbers of the three DataMUX multiplexers, against hand-built references ---


def test_gaussian_and_binary_match_hand_built_mixtures():
    n, d, seed = 3, 10, 4
    x = torch.randn(2, n, 5, d)  # (B, N, L, d)
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    v = v / v.norm(dim=1, keepdim=True) * d**0.5
    gauss = mux.GaussianHadamardMultiplexer(n, d, seed=seed)
    assert torch.equal(gauss.weight, v)
    torch.testing.assert_close(gauss(x), (x * v[None, :, None]).mean(dim=1))
    masks = torch.zeros(n, d)
    masks[0, :4], masks[1, 4:7], masks[2, 7:] = 1.0, 1.0, 1.0
    binary = mux.BinaryHadamardMultiplexer(n, d)
    assert torch.equal(binary.weight, masks)
    torch.testing.assert_close(binary(x), (x * masks[None, :, None]).mean(dim=1))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_transform_then_mean_bit_for_bit(kind):
    m = mux.make_multiplexer(kind, 4, 12, seed=2)
    x = torch.randn(3, 4, 2, 12)
    assert torch.equal(m(x), m.transform(x).mean(dim=1))
    assert torch.equal(m(x), m.combine(m.transform(x, None), None))


def test_base_multiplexer_is_the_plain_mean():
    m = mux.Multiplexer(3, 8)  # identity transform, mean over N: the "no transform" baseline
    x = torch.randn(2, 3, 4, 8)
    assert torch.equal(m.transform(x), x)
    torch.testing.assert_close(m(x), x.mean(dim=1))
    assert not list(m.parameters()) and not list(m.buffers())


@pytest.mark.parametrize("kind", KINDS)
def test_scale_of_the_mixture(kind):
    """The mean does not keep the scale: ~1/sqrt(N) of one instance's norm, ~1/N for binary blocks."""
    d, trials = 256, 400
    x1 = torch.randn(trials, 1, d, generator=torch.Generator().manual_seed(0))
    for n in (2, 4, 8):
        m = mux.make_multiplexer(kind, n, d, seed=1)
        x = torch.randn(trials, n, d, generator=torch.Generator().manual_seed(n))
        ratio = (m(x).norm(dim=-1) / x.norm(dim=-1).mean(dim=1)).mean().item()
        expected = 1 / n if kind == "binary_hadamard" else n**-0.5
        assert abs(ratio - expected) < 0.05 * expected, (kind, n, ratio, expected)
    if kind != "binary_hadamard":  # each phi_i on its own keeps the norm (on average for Gaussian)
        m = mux.make_multiplexer(kind, 1, d, seed=1)
        kept = (m.transform(x1).norm(dim=-1) / x1.norm(dim=-1)).mean().item()
        assert abs(kept - 1) < 0.02


# --- the mask ---


@pytest.mark.parametrize("kind", KINDS)
def test_mask_padding_contributes_nothing_to_the_mean(kind):
    n, d, length = 3, 12, 5
    m = mux.make_multiplexer(kind, n, d, seed=0)
    x = torch.randn(2, n, length, d)
    mask = torch.ones(2, n, length)
    mask[0, 1, 3:] = 0  # instance 1 of tuple 0 has 3 real tokens
    mask[1, 2, 1:] = 0  # instance 2 of tuple 1 has 1 real token
    out = m(x, mask)
    assert out.shape == (2, length, d)
    expected = (m.transform(x) * mask[..., None]).sum(dim=1) / n  # padding is zero, still divided by N
    torch.testing.assert_close(out, expected)
    noisy = x.clone()
    noisy[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), d)  # whatever the padding holds
    torch.testing.assert_close(m(noisy, mask), out)
    assert torch.equal(m(x, mask.bool()), out)
    assert torch.equal(m(x, torch.ones_like(mask)), m(x))  # all real: the plain mean


def test_mask_of_wrong_shape_or_values_is_rejected():
    m = mux.OrthogonalMultiplexer(3, 8)
    x = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"mask of shape \(B, N, \.\.\.\) = x.shape\[:-1\] = \(2, 3, 5\).*got shape \(2, 3, 5, 8\)"):
        m(x, torch.ones(2, 3, 5, 8))
    with pytest.raises(ValueError, match="got shape \\(2, 5\\)"):
        m(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="0s and 1s"):
        m(x, torch.full((2, 3, 5), 0.5))


class ConcatMultiplexer(mux.Multiplexer):
    """A toy non-mean multiplexer: per-instance scale i+1, padding zeroed, then the N token
    sequences concatenated along the sequence dimension, ``(B, N, L, d) -> (B, N*L, d)``."""

    def transform(self, x, mask=None):
        scale = torch.arange(1, self.n + 1, dtype=x.dtype).view(1, self.n, *([1] * (x.dim() - 2)))
        z = x * scale  # (B, N, L, d)
        return z if mask is None else z * mask.unsqueeze(-1).to(z.dtype)

    def combine(self, z, mask=None):
        return z.flatten(1, 2)  # (B, N, L, d) -> (B, N*L, d)


def test_base_class_carries_a_concatenating_combine_and_the_mask():
    n, d, length = 3, 4, 5
    m = ConcatMultiplexer(n, d)
    x = torch.randn(2, n, length, d)
    mask = torch.ones(2, n, length)
    mask[0, 1, 2:] = 0
    out = m(x, mask)
    assert out.shape == (2, n * length, d)
    for i in range(n):  # segment i is instance i's tokens, scaled by i+1, padding zeroed
        torch.testing.assert_close(out[:, i * length:(i + 1) * length], (i + 1) * x[:, i] * mask[:, i, :, None])
    assert torch.equal(out[0, length + 2:2 * length], torch.zeros(length - 2, d))  # no padding leaks
    assert m(x).shape == (2, n * length, d)  # without a mask every token is real
    with pytest.raises(ValueError, match=r"expects a mask of shape"):  # the base class still checks
        m(x, torch.ones(2, n, length + 1))
    with pytest.raises(ValueError, match=r"expects \(B, N=3, \.\.\., d=4\)"):
        m(torch.randn(2, n, length, d + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_partial_sums_over_blocks_of_instances_give_the_mixture(kind):
    # what MUXPLMModel.embed_and_mix relies on: sum of the blocks' partial sums / N == forward
    n, d = 7, 12
    m = mux.make_multiplexer(kind, n, d, seed=2)
    x, mask = torch.randn(3, n, 5, d), (torch.rand(3, n, 5) > 0.3).long()
    blocks = [(0, 3), (3, 4), (4, 7)]
    total = sum(m.partial_sum(x[:, a:b], mask[:, a:b], start=a) for a, b in blocks) / n
    torch.testing.assert_close(total, m(x, mask))
    with pytest.raises(ValueError, match="are not among the N=7"):
        m.partial_sum(x[:, :3], mask[:, :3], start=5)


def test_the_contextual_multiplexer_has_no_partial_sums():
    m = mux.make_multiplexer("contextual", 2, 8, num_heads=2)
    assert not m.separable
    with pytest.raises(TypeError, match="has no partial sums"):
        m.partial_sum(torch.randn(1, 1, 3, 8), None, start=0)
