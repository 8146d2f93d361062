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


def test_dict_batches_are_grouped_padded_and_ungrouped_key_by_key():
    batch = {"input_ids": torch.arange(5 * 3).reshape(5, 3), "attention_mask": torch.ones(5, 3, dtype=torch.long),
             "labels": torch.arange(5), "name": "kept"}
    padded, m = mux.pad_to_multiple(batch, 4)
    assert m == 5 and padded["labels"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and padded["name"] == "kept"
    grouped = mux.group(padded, 4)
    assert grouped["input_ids"].shape == (2, 4, 3) and grouped["labels"].shape == (2, 4)
    assert torch.equal(mux.ungroup(grouped)["input_ids"], padded["input_ids"])
    with pytest.raises(ValueError, match="share their first dimension"):
        mux.group({"a": torch.zeros(4), "b": torch.zeros(3)}, 2)


def test_union_mask_is_real_where_any_instance_is():
    mask = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]])  # (B=1, N=3, L=4)
    assert mux.union_mask(mask).tolist() == [[1, 1, 1, 0]]
    with pytest.raises(ValueError, match="grouped masks"):
        mux.union_mask(torch.ones(2, 4))


def test_multiplexed_forward_takes_dicts_and_returns_dicts_and_dataclasses():
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Tagger(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # (B, N, L) -> per-token "logits" (B, N, L, 1)
            logits = (input_ids * attention_mask).float()[..., None]
            return SequenceClassifierOutput(loss=logits.sum() * 0, logits=logits)

    ids = torch.arange(7 * 2).reshape(7, 2)
    out = mux.multiplexed_forward(Tagger(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 3)
    assert isinstance(out, SequenceClassifierOutput) and out.loss.dim() == 0
    assert torch.equal(out.logits[..., 0], ids.float())

    class Bad(torch.nn.Module):
        def forward(self, input_ids):
            return {"logits": input_ids.float().sum(1)}  # (B, L): lost the instance dimension

    with pytest.raises(ValueError, match="model output 'logits' must be"):
        mux.multiplexed_forward(Bad(), {"input_ids": ids}, 3)
