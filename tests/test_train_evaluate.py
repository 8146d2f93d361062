import json

import pytest
import torch
from torch.utils.data import TensorDataset

import mux
from mux.train import classification_loss


def _model(n=2, **kw):
    mux.seed_everything(0)
    return mux.DataMUXClassifier(n_mux=n, width=32, **kw)


def _cfg(tmp_path=None, **kw):
    base = dict(max_steps=12, batch_size=16, lr=3e-3, seed=0, progress=False, log_every=1)
    if tmp_path is not None:
        base["checkpoint_dir"] = str(tmp_path / "ckpt")
    base.update(kw)
    return mux.TrainConfig(**base)


def test_training_reduces_loss_and_evaluation_counts_every_example(tiny_digits):
    train_set, test_set = tiny_digits
    model = _model(n=3)
    before = mux.evaluate(model, train_set, 3)
    result = mux.train(model, train_set, _cfg(max_steps=40), n=3)
    after = mux.evaluate(result.model, train_set, 3)
    assert after["loss"] < before["loss"]
    assert len(result.history) == 40 and result.steps == 40
    ev = mux.evaluate(result.model, test_set, 3)
    assert ev["n_examples"] == len(test_set) == 37  # 37 is not a multiple of N=3


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("size", [1, 5, 37])
def test_predict_returns_one_prediction_per_example_in_order(n, size):
    # a model whose prediction for each instance is that instance's own label, read from the pixels
    class ReadLabel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # (B, N, 1, 1, 1) -> (B, N, 10) one-hot of the pixel value
            return torch.nn.functional.one_hot(x.flatten(2)[..., 0].long(), 10).float() + 0 * self.w

    labels = torch.arange(size) % 10
    data = TensorDataset(labels.float().view(-1, 1, 1, 1), labels)
    pred = mux.predict(ReadLabel(), data, n, batch_size=4)
    assert torch.equal(pred, labels)


def test_resume_reproduces_uninterrupted_run(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    # 120 instances / 16 per batch -> 8 batches per epoch: the break at step 11 is mid-epoch
    full = mux.train(_model(), train_set, _cfg(max_steps=20), n=2).model

    first = mux.train(_model(), train_set, _cfg(tmp_path, max_steps=20, checkpoint_every=11), n=2)
    # simulate an interruption after step 11: keep only that checkpoint
    ckpts = sorted((tmp_path / "ckpt").iterdir())
    assert [p.name for p in ckpts] == ["checkpoint-00000011", "checkpoint-00000020"]
    import shutil
    shutil.rmtree(ckpts[-1])
    resumed = mux.train(_model(), train_set, _cfg(tmp_path, max_steps=20, checkpoint_every=11), n=2)
    assert resumed.resumed_from == 11 and resumed.steps == 20
    for (k, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"parameter {k} differs after resume")
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in first.history], rel=1e-5)
    state = json.loads((tmp_path / "ckpt" / "checkpoint-00000020" / "trainer_state.json").read_text())
    assert state["step"] == 20 and len(state["history"]) == 20


def test_finished_run_resumes_without_training(tiny_digits, tmp_path):
    train_set, test_set = tiny_digits
    done = mux.train(_model(), train_set, _cfg(tmp_path), n=2)
    again = mux.train(_model(), train_set, _cfg(tmp_path), n=2)
    assert again.resumed_from == 12
    assert mux.evaluate(done.model, test_set, 2) == mux.evaluate(again.model, test_set, 2)
    loaded = mux.load_weights(_model(), tmp_path / "ckpt")
    assert mux.evaluate(loaded, test_set, 2) == mux.evaluate(done.model, test_set, 2)


def test_checkpoint_from_a_different_model_is_refused(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    mux.train(_model(n=2), train_set, _cfg(tmp_path, max_steps=2), n=2)
    with pytest.raises(ValueError, match="written by a different model"):
        mux.train(_model(n=4), train_set, _cfg(tmp_path, max_steps=4), n=4)
    with pytest.raises(ValueError, match="different model"):
        mux.load_weights(_model(n=2, backbone="cnn"), tmp_path / "ckpt")


def test_interruption_saves_completed_steps(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    calls = {"n": 0}

    def interrupting_loss(model, batch, n):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return classification_loss(model, batch, n)

    with pytest.raises(KeyboardInterrupt):
        mux.train(_model(), train_set, _cfg(tmp_path), n=2, loss_fn=interrupting_loss)
    latest = mux.latest_checkpoint(tmp_path / "ckpt")
    assert latest.name == "checkpoint-00000005"  # five completed steps, none lost
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    resumed = mux.train(_model(), train_set, _cfg(tmp_path), n=2)
    assert resumed.resumed_from == 5 and resumed.steps == 12


def test_bad_training_config_is_rejected():
    with pytest.raises(ValueError, match="max_steps"):
        mux.TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        mux.TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="checkpoint_every"):
        mux.TrainConfig(checkpoint_every=-1)
    with pytest.raises(ValueError, match="empty"):
        mux.evaluate(_model(), TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()), 2)
