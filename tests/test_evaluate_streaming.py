"""mux.evaluate sums batch by batch (no dataset-sized logits) and gives per-example scores."""
import importlib

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import mux
evaluation = importlib.import_module("mux.evaluation")  # the module of mux.evaluate


class Tokens(Dataset):
    """Token-task examples as dicts: ``labels`` (L,) with some positions IGNORE_INDEX."""

    def __init__(self, size=23, length=5, classes=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, length, 4, generator=g)
        self.y = torch.randint(classes, (size, length), generator=g)
        self.y[:, -1] = mux.IGNORE_INDEX
        self.y[3] = mux.IGNORE_INDEX  # an example with nothing to score
        self.classes = classes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class TokenModel(torch.nn.Module):
    """Reads each instance's tokens: (B, N, L, 4) -> (B, N, L, C)."""

    def __init__(self, classes=7):
        super().__init__()
        self.proj = torch.nn.Linear(4, classes)

    def forward(self, x):
        return self.proj(x)


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, x):  # (B, N, 3) -> (B, N, 4)
        return self.proj(x)


def _reference(model, data, n, batch_size):
    """Accuracy and loss from the kept logits (predict_logits), as evaluate computed them before."""
    logits, labels = mux.predict_logits(model, data, n, batch_size=batch_size)
    scored = labels != mux.IGNORE_INDEX
    acc = (logits[scored].argmax(-1) == labels[scored]).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits[scored], labels[scored]).item()
    return acc, loss, logits, labels


@pytest.mark.parametrize("n, batch_size", [(1, 4), (3, 4), (4, 8), (5, 256)])
def test_streamed_evaluation_equals_the_kept_logits(n, batch_size):
    torch.manual_seed(0)
    data, model = Tokens(), TokenModel()
    result = mux.evaluate(model, data, n, batch_size=batch_size, per_item=True)
    acc, loss, logits, labels = _reference(model, data, n, batch_size)
    assert result["accuracy"] == pytest.approx(acc, rel=1e-6)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["n_examples"] == len(data) and result["n_scored"] == int((labels != mux.IGNORE_INDEX).sum())
    items = result["per_item"]
    assert items.shape == (len(data),) and np.isnan(items[3]) and not np.isnan(np.delete(items, 3)).any()
    right = ((logits.argmax(-1) == labels) & (labels != mux.IGNORE_INDEX)).sum(1).float()
    counted = (labels != mux.IGNORE_INDEX).sum(1).float()
    expect = (right / counted).numpy()
    assert np.allclose(np.delete(items, 3), np.delete(expect, 3))


def test_per_item_scores_are_zero_or_one_for_one_label_per_example_and_average_to_the_accuracy():
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(31, 3), torch.randint(4, (31,)))
    result = mux.evaluate(Linear(), data, 2, batch_size=6, per_item=True)
    assert set(np.unique(result["per_item"])) <= {0.0, 1.0}
    assert result["per_item"].mean() == pytest.approx(result["accuracy"])
    assert "per_item" not in mux.evaluate(Linear(), data, 2)


def test_evaluation_without_an_ensemble_keeps_no_dataset_sized_logits(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluate gathered every logit")

    monkeypatch.setattr(evaluation, "_cat_padded", refuse)
    monkeypatch.setattr(evaluation, "predict_logits", refuse)
    result = mux.evaluate(TokenModel(), Tokens(), 2, batch_size=4)
    assert result["n_examples"] == 23


def test_an_ensemble_still_averages_kept_logits():
    torch.manual_seed(2)
    data = TensorDataset(torch.randn(17, 3), torch.randint(4, (17,)))
    model = Linear()
    logits, labels = mux.predict_logits(model, data, 2, ensemble=3)
    result = mux.evaluate(model, data, 2, ensemble=3, per_item=True)
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
