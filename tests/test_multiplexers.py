import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mux
from mux.multiplexers import MULTIPLEXERS

KINDS = sorted(MULTIPLEXERS)


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
