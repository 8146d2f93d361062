import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mux


@given(b=st.integers(1, 6), n=st.integers(1, 9), feat=st.integers(1, 4))
def test_group_ungroup_round_trip(b, n, feat):
    x = torch.arange(b * n * feat).reshape(b * n, feat)
    g = mux.group(x, n)
    assert g.shape == (b, n, feat)
    # tuple k holds instances k*N .. k*N+N-1, in order
    assert torch.equal(g[0, :, 0], x[:n, 0])
    assert torch.equal(mux.ungroup(g), x)


@given(m=st.integers(1, 40), n=st.integers(1, 12))
def test_pad_to_multiple_uses_copies_and_keeps_originals(m, n):
    x = torch.arange(m)
    padded, kept = mux.pad_to_multiple(x, n)
    assert kept == m
    assert len(padded) % n == 0 and len(padded) - m < n
    assert torch.equal(padded[:m], x)
    assert set(padded[m:].tolist()) <= set(x.tolist())


@given(m=st.integers(1, 30), n=st.integers(1, 8))
def test_multiplexed_forward_one_output_per_instance_in_order(m, n):
    # a "model" that returns each instance's own value: any mixing of order would show
    class Echo(torch.nn.Module):
        def forward(self, x):
            return x * 2

    x = torch.randn(m, 3)
    out = mux.multiplexed_forward(Echo(), x, n)
    torch.testing.assert_close(out, x * 2)


def test_group_rejects_remainder_with_clear_message():
    with pytest.raises(ValueError, match=r"batch of 30 instances cannot be split into tuples of N=4; pad with mux.pad_to_multiple"):
        mux.group(torch.zeros(30, 2), 4)


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", True, None])
def test_bad_n_is_rejected(bad):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        mux.group(torch.zeros(4, 2), bad)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        mux.pad_to_multiple(torch.zeros(4, 2), bad)


def test_pad_empty_batch_and_ungroup_flat_are_errors():
    with pytest.raises(ValueError, match="empty batch"):
        mux.pad_to_multiple(torch.zeros(0, 2), 2)
    with pytest.raises(ValueError, match=r"\(B, N, \.\.\.\)"):
        mux.ungroup(torch.zeros(5))


def test_multiplexed_forward_checks_model_output():
    with pytest.raises(ValueError, match="must return"):
        mux.multiplexed_forward(torch.nn.Flatten(), torch.zeros(4, 2), 2)
