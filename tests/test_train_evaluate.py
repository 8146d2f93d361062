"""The training loop and the evaluation: results, exact resume, and the ways they could be silently wrong."""
import json
import os
from pathlib import Path
import shutil
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

import mux
from mux.losses import classification_loss

from mux.training import checkpoints, parts  # (mux.train is the function; these are its modules)


def _model(n=2, **kw):
    mux.seed_everything(0)
    return mux.DataMUXClassifier(n_mux=n, width=32, **kw)


def _cfg(tmp_path=None, **kw):
    base = dict(max_steps=12, batch_size=16, lr=3e-3, seed=0, progress=False, log_every=1, cpu=True)
    if tmp_path is not None:
        base["checkpoint_dir"] = str(tmp_path / "ckpt")
    base.update(kw)
    return mux.TrainConfig(**base)


def _assert_same_weights(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"parameter {k} differs")


# ---------------------------------------------------------------- training and evaluation


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


class ReadLabel(torch.nn.Module):
    """Predicts each instance's own label, read from its single pixel: ``(B, N, 1, 1, 1) -> (B, N, 10)``."""

    def __init__(self, copy_first=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.copy_first = copy_first  # cheat: answer instance 0's label for the whole tuple

    def forward(self, x):
        labels = x.flatten(2)[..., 0].long()
        if self.copy_first:
            labels = labels[:, :1].expand_as(labels)
        return torch.nn.functional.one_hot(labels, 10).float() + 0 * self.w


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("size", [1, 5, 37])
def test_predict_returns_one_prediction_per_example_in_order(n, size):
    labels = torch.arange(size) % 10
    data = TensorDataset(labels.float().view(-1, 1, 1, 1), labels)
    for order_seed in (0, 1, None):
        assert torch.equal(mux.predict(ReadLabel(), data, n, batch_size=4, order_seed=order_seed), labels)


def test_evaluation_tuples_do_not_follow_a_class_sorted_dataset():
    # 4 classes of 24 examples, sorted by class like ImageFolder; a model that answers instance 0's
    # label for its whole tuple is right only by luck when tuples mix classes.
    labels = torch.arange(4).repeat_interleave(24)
    data = TensorDataset(labels.float().view(-1, 1, 1, 1), labels)
    in_order = mux.evaluate(ReadLabel(copy_first=True), data, 4, order_seed=None)["accuracy"]
    shuffled = mux.evaluate(ReadLabel(copy_first=True), data, 4)["accuracy"]
    assert in_order == 1.0  # what dataset-order grouping used to report
    assert shuffled < 0.6  # about 1/4 + 3/4 * 1/4 = 0.44 expected
    assert mux.evaluate(ReadLabel(), data, 4)["accuracy"] == 1.0


def test_evaluation_casts_inputs_to_the_model_dtype(tiny_digits):
    _, test_set = tiny_digits
    model = _model().to(torch.bfloat16)
    result = mux.evaluate(model, test_set, 2)
    assert result["n_examples"] == 37 and 0 <= result["accuracy"] <= 1


def test_bad_training_config_is_rejected():
    with pytest.raises(ValueError, match="max_steps"):
        mux.TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        mux.TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="checkpoint_every"):
        mux.TrainConfig(checkpoint_every=-1)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        mux.TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        mux.evaluate(_model(), TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()), 2)


def test_check_n_names_the_quantity():
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 0$"):
        mux.check_n(0, name="batch_size")
    with pytest.raises(ValueError, match=r"N \(instances multiplexed together\)"):
        mux.check_n(0)


# ---------------------------------------------------------------- exact resume


def test_resume_reproduces_uninterrupted_run(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    # 120 instances / 16 per batch -> 8 batches per epoch: the break at step 11 is mid-epoch,
    # and the resumed run crosses into epochs 2 and 3
    full = mux.train(_model(), train_set, _cfg(max_steps=20), n=2)
    first = mux.train(_model(), train_set, _cfg(tmp_path, max_steps=20, checkpoint_every=11), n=2)
    ckpts = mux.list_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in ckpts] == ["checkpoint-00000011", "checkpoint-00000020"]
    shutil.rmtree(ckpts[-1])  # as if interrupted after step 11
    resumed = mux.train(_model(), train_set, _cfg(tmp_path, max_steps=20, checkpoint_every=11), n=2)
    assert resumed.resumed_from == 11 and resumed.steps == 20
    _assert_same_weights(full.model, resumed.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in first.history]
    state = json.loads((tmp_path / "ckpt" / "checkpoint-00000020" / "trainer_state.json").read_text())
    assert state["step"] == 20 and len(state["history"]) == 20


def test_finished_run_resumes_without_training(tiny_digits, tmp_path):
    train_set, test_set = tiny_digits
    done = mux.train(_model(), train_set, _cfg(tmp_path), n=2)
    again = mux.train(_model(), train_set, _cfg(tmp_path, progress=True, description="again"), n=2)
    assert again.resumed_from == 12
    assert mux.evaluate(done.model, test_set, 2) == mux.evaluate(again.model, test_set, 2)
    loaded = mux.load_weights(_model(), tmp_path / "ckpt")
    assert mux.evaluate(loaded, test_set, 2) == mux.evaluate(done.model, test_set, 2)


@pytest.mark.parametrize("change, named", [
    (dict(seed=1), "seed"),
    (dict(lr=1.0), "lr"),
    (dict(max_steps=20), "max_steps"),
    (dict(batch_size=32), "instances_per_batch"),
    (dict(grad_accum_steps=2), "grad_accum_steps"),
])
def test_resume_refuses_a_checkpoint_of_another_run(tiny_digits, tmp_path, change, named):
    train_set, _ = tiny_digits
    mux.train(_model(), train_set, _cfg(tmp_path, max_steps=4), n=2)
    with pytest.raises(ValueError, match=f"belongs to another training run.*{named}"):
        mux.train(_model(), train_set, _cfg(tmp_path, **{"max_steps": 4, **change}), n=2)


def test_checkpoint_from_a_different_model_is_refused(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    mux.train(_model(n=2), train_set, _cfg(tmp_path, max_steps=2), n=2)
    with pytest.raises(ValueError, match="written by a different model"):
        mux.train(_model(n=4), train_set, _cfg(tmp_path, max_steps=2), n=4)
    with pytest.raises(ValueError, match="different model"):
        mux.load_weights(_model(n=2, backbone="cnn"), tmp_path / "ckpt")


def test_resume_false_in_a_used_folder_is_refused(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    mux.train(_model(), train_set, _cfg(tmp_path, max_steps=4), n=2)
    with pytest.raises(ValueError, match="already holds checkpoints .* resume=False"):
        mux.train(_model(), train_set, _cfg(tmp_path, max_steps=6, seed=3, resume=False), n=2)
    assert [p.name for p in mux.list_checkpoints(tmp_path / "ckpt")] == ["checkpoint-00000004"]


def test_epoch_orders_of_neighbouring_seeds_differ(tiny_digits):
    # Accelerate's seedable sampler seeds epoch e with seed + e: seed 0's second epoch was seed 1's first
    train_set, _ = tiny_digits
    seen = []

    def recording_loss(model, batch, n):
        seen[-1].append(batch[1].clone())
        return classification_loss(model, batch, n)

    orders = {}
    for seed, steps in ((0, 16), (1, 8)):  # 8 batches per epoch
        seen.append([])
        mux.train(_model(), train_set, _cfg(seed=seed, max_steps=steps), n=2, loss_fn=recording_loss)
        orders[seed] = torch.cat(seen[-1])
    seed0_epoch1, seed1_epoch0 = orders[0][120:], orders[1]
    assert not torch.equal(seed0_epoch1, seed1_epoch0)
    assert sorted(seed0_epoch1.tolist()) == sorted(seed1_epoch0.tolist())  # both are whole epochs


# ---------------------------------------------------------------- interruption


def _interrupting_loss(model, batch, n):
    _interrupting_loss.calls += 1
    if _interrupting_loss.calls == _interrupting_loss.at:
        raise KeyboardInterrupt
    return classification_loss(model, batch, n)


def test_keyboard_interrupt_before_an_update_saves_the_completed_steps(tiny_digits, tmp_path):
    train_set, _ = tiny_digits
    full = mux.train(_model(), train_set, _cfg(), n=2)
    _interrupting_loss.calls, _interrupting_loss.at = 0, 6
    with pytest.raises(KeyboardInterrupt):
        mux.train(_model(), train_set, _cfg(tmp_path), n=2, loss_fn=_interrupting_loss)
    assert mux.latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-00000005"  # five completed steps
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    _interrupting_loss.at = -1
    resumed = mux.train(_model(), train_set, _cfg(tmp_path), n=2, loss_fn=_interrupting_loss)
    assert resumed.resumed_from == 5 and resumed.steps == 12
    _assert_same_weights(full.model, resumed.model)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_the_update_finishes_the_step_and_resumes_exactly(tiny_digits, tmp_path, signum):
    # Ctrl-C, or a scheduler's SIGTERM (SLURM preemption), arriving right after optimizer.step(),
    # before the step counter moves: the old loop saved 6 updates under step 5
    train_set, _ = tiny_digits
    full = mux.train(_model(), train_set, _cfg(), n=2)
    calls = {"n": 0}
    before = signal.getsignal(signum)

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signum)

    handle = register_optimizer_step_post_hook(hook)
    try:
        with pytest.raises(mux.TrainingInterrupted, match="interrupted after step 6") as stopped:
            mux.train(_model(), train_set, _cfg(tmp_path), n=2)
    finally:
        handle.remove()
    assert stopped.value.step == 6 and Path(stopped.value.checkpoint_dir) == tmp_path / "ckpt"
    assert isinstance(stopped.value, KeyboardInterrupt)  # code that stops on Ctrl-C stops on it too
    assert mux.latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-00000006"
    assert signal.getsignal(signum) is before  # the handler is put back
    resumed = mux.train(_model(), train_set, _cfg(tmp_path), n=2)
    assert resumed.resumed_from == 6
    _assert_same_weights(full.model, resumed.model)


# ---------------------------------------------------------------- checkpoints on disk


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tiny_digits, tmp_path):
    train_set, test_set = tiny_digits
    full = mux.train(_model(), train_set, _cfg(tmp_path, checkpoint_every=6), n=2)
    newest = mux.latest_checkpoint(tmp_path / "ckpt")
    assert newest.name == "checkpoint-00000012"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a write cut short
    with pytest.warns(UserWarning, match="checkpoint-00000012"):
        resumed = mux.train(_model(), train_set, _cfg(tmp_path, checkpoint_every=6), n=2)
    assert resumed.resumed_from == 6
    _assert_same_weights(full.model, resumed.model)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="older checkpoint"):
        loaded = mux.load_weights(_model(), tmp_path / "ckpt")
    assert mux.evaluate(loaded, test_set, 2)["n_examples"] == 37


def test_checkpoint_files_are_flushed_before_the_rename(tiny_digits, tmp_path, monkeypatch):
    train_set, _ = tiny_digits
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoints.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                             real_fsync(fd)))
    monkeypatch.setattr(checkpoints.os, "replace", lambda a, b: (renamed.append(len(synced)), real_replace(a, b)))
    mux.train(_model(), train_set, _cfg(tmp_path, max_steps=2), n=2)
    assert renamed and any(p.endswith("model.safetensors") for p in synced[:renamed[0]])
    assert any(p.endswith("trainer_state.json") for p in synced[:renamed[0]])


class TiedModel(torch.nn.Module):
    """A classifier whose output layer shares the input embedding's weight, as BERT's MLM head does."""

    def __init__(self, vocab=10, d=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.out = torch.nn.Linear(d, vocab)
        self.out.weight = self.embed.weight

    def forward(self, x):  # (B, N, 1, 1, 1) pixel values 0..9 -> (B, N, 10)
        return self.out(self.embed(x.flatten(2)[..., 0].long()))


def test_load_weights_restores_tied_weights(tmp_path):
    labels = torch.arange(40) % 10
    data = TensorDataset(labels.float().view(-1, 1, 1, 1), labels)
    torch.manual_seed(0)
    trained = mux.train(TiedModel(), data, _cfg(tmp_path, max_steps=3), n=2).model
    loaded = mux.load_weights(TiedModel(), tmp_path / "ckpt")
    assert loaded.out.weight is loaded.embed.weight
    _assert_same_weights(trained, loaded)


# ---------------------------------------------------------------- precision and Accelerate's state


def test_model_comes_back_without_autocast_and_a_second_run_may_change_precision(tiny_digits):
    train_set, _ = tiny_digits
    bf16 = mux.train(_model(), train_set, _cfg(max_steps=2, mixed_precision="bf16"), n=2).model
    x = torch.rand(2, 2, 1, 8, 8)
    assert bf16(x).dtype == torch.float32  # Accelerate's autocast wrapper is gone
    again = mux.train(_model(), train_set, _cfg(max_steps=2, mixed_precision="no"), n=2)
    assert again.steps == 2


def test_train_accepts_an_existing_accelerator(tiny_digits):
    from accelerate import Accelerator

    train_set, _ = tiny_digits
    accelerator = Accelerator(cpu=True)
    first = mux.train(_model(), train_set, _cfg(max_steps=2), n=2, accelerator=accelerator)
    second = mux.train(_model(), train_set, _cfg(max_steps=2), n=2, accelerator=accelerator)
    assert first.steps == second.steps == 2
    _assert_same_weights(first.model, second.model)


def test_auto_precision_skips_emulated_bf16(monkeypatch):
    # a T4 or V100 reports bf16 "supported" only by emulation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert parts.resolve_precision(mux.TrainConfig()) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert parts.resolve_precision(mux.TrainConfig()) == "bf16"
    assert parts.resolve_precision(mux.TrainConfig(cpu=True)) == "no"


def test_fingerprint_survives_compile_and_a_library_upgrade():
    from transformers import BertConfig, BertModel

    model = _model()
    assert mux.model_fingerprint(torch.compile(model)) == mux.model_fingerprint(model)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    before = mux.model_fingerprint(bert)
    bert.config.transformers_version = "0.0.1"
    assert mux.model_fingerprint(bert) == before


# ---------------------------------------------------------------- what the next chapters need


class TinyTagger(torch.nn.Module):
    """A multiplexed token tagger: ``input_ids (B, N, L)``, ``attention_mask (B, N, L)`` -> dict with
    ``logits (B, N, L, 2)``. Mixes the N embedded sequences by their mean, like DataMUX."""

    def __init__(self, vocab=30, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.index = torch.nn.Parameter(torch.randn(8, d))  # a vector per instance index
        self.head = torch.nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask):
        n = input_ids.shape[1]
        z = self.embed(input_ids) * self.index[:n, None, :]  # (B, N, L, d)
        mixed = torch.relu(self.mix(z.mean(dim=1)))  # (B, L, d)
        mixed = mixed * mux.union_mask(attention_mask)[..., None]
        h = self.norm(mixed[:, None] + z)  # (B, N, L, d)
        return {"logits": self.head(h), "aux": z.pow(2).mean()}


def token_data(size=60, seed=0):
    """Sentences of 3-8 token ids; label 1 for an even id. A list of dicts, batched by a collator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(size):
        ids = torch.randint(1, 30, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        out.append({"input_ids": ids, "labels": (ids % 2 == 0).long()})
    return out


def collate(examples):
    longest = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.zeros(len(examples), longest, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), longest, dtype=torch.long),
             "labels": torch.full((len(examples), longest), mux.IGNORE_INDEX)}
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        batch["input_ids"][i, :k], batch["attention_mask"][i, :k], batch["labels"][i, :k] = e["input_ids"], 1, e["labels"]
    return batch


def test_dict_batches_token_outputs_and_named_loss_terms():
    data = token_data()

    def loss_with_terms(model, batch, n):
        ce = classification_loss(model, batch, n)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        aux = mux.multiplexed_forward(model, inputs, n)["aux"]
        return {"loss": ce + 0.01 * aux, "ce": ce, "aux": aux}

    torch.manual_seed(0)
    result = mux.train(TinyTagger(), data, _cfg(max_steps=30, batch_size=12, log_every=10, lr=1e-2), n=3,
                       loss_fn=loss_with_terms, collate_fn=collate)
    assert [h["step"] for h in result.history] == [10, 20, 30]
    assert set(result.history[0]) == {"step", "lr", "loss", "ce", "aux"}
    assert result.history[-1]["ce"] < result.history[0]["ce"]
    scores = mux.evaluate(result.model, data, 3, batch_size=9, collate_fn=collate)
    assert scores["n_examples"] == 60 and scores["n_scored"] == sum(len(e["input_ids"]) for e in data)
    logits, labels = mux.predict_logits(result.model, data, 3, batch_size=9, collate_fn=collate)
    assert logits.shape[:2] == labels.shape == (60, 8)
    for i in (0, 17, 59):  # dataset order; padding positions carry IGNORE_INDEX
        k = len(data[i]["input_ids"])
        assert torch.equal(labels[i, :k], data[i]["labels"]) and (labels[i, k:] == mux.IGNORE_INDEX).all()


def test_a_dataloader_can_be_passed_and_gives_the_same_run(tiny_digits):
    train_set, _ = tiny_digits
    a = mux.train(_model(), train_set, _cfg(max_steps=10), n=2).model
    b = mux.train(_model(), DataLoader(train_set, batch_size=16), _cfg(max_steps=10), n=2).model
    _assert_same_weights(a, b)
    with pytest.raises(ValueError, match="multiple of N=3"):
        mux.train(_model(n=3), DataLoader(train_set, batch_size=16), _cfg(max_steps=1), n=3)


def test_gradient_accumulation_matches_a_larger_batch(tiny_digits):
    train_set, _ = tiny_digits
    big = mux.train(_model(), train_set, _cfg(max_steps=6, batch_size=24), n=2).model
    accumulated = mux.train(_model(), train_set, _cfg(max_steps=6, batch_size=12, grad_accum_steps=2), n=2).model
    for (k, x), y in zip(big.state_dict().items(), accumulated.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


def test_gradient_clipping_limits_the_update(tiny_digits):
    train_set, _ = tiny_digits
    start = _model().state_dict()

    def moved(**kw):
        m = mux.train(_model(), train_set, _cfg(max_steps=1, **kw), n=2).model
        return sum((m.state_dict()[k] - v).abs().sum().item() for k, v in start.items())

    assert moved(max_grad_norm=1e-12) < 0.01 * moved()


def test_weight_decay_spares_biases_norms_and_embeddings():
    data = token_data(24)
    torch.manual_seed(0)
    model = TinyTagger()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def zero_loss(model, batch, n):  # no gradient: only weight decay moves the parameters
        out = mux.multiplexed_forward(model, {k: v for k, v in batch.items() if k != "labels"}, n)
        return out["logits"].sum() * 0

    after = mux.train(model, data, _cfg(max_steps=1, batch_size=12, weight_decay=0.5), n=2, loss_fn=zero_loss,
                      collate_fn=collate).model.state_dict()
    decayed = {k for k in before if not torch.equal(before[k], after[k])}
    assert decayed == {"mix.weight", "index", "head.weight"}


def test_weight_decay_spares_the_demultiplexer_biases_and_norms():
    names = set(parts.no_weight_decay_names(_model()))
    assert {"demux.bias", "demux.norm_weight", "demux.norm_bias"} <= names and "demux.weight" not in names


# ---------------------------------------------------------------- eval_fn: evaluation during training


class DropoutTagger(TinyTagger):
    """TinyTagger with dropout on its logits: its training steps draw from the global RNG."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, input_ids, attention_mask):
        out = super().forward(input_ids, attention_mask)
        return {**out, "logits": self.drop(out["logits"])}


TAG_DATA = token_data(36)


def _tag_train(eval_fn=None, tmp_path=None, **kw):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, **{"max_steps": 10, "batch_size": 12, "lr": 1e-2, **kw})
    return mux.train(DropoutTagger(), TAG_DATA, cfg, n=3, collate_fn=collate, eval_fn=eval_fn)


def _tag_accuracy(model):
    return {"accuracy": mux.evaluate(model, TAG_DATA, 3, batch_size=9, collate_fn=collate)["accuracy"]}


@pytest.mark.parametrize("eval_every, steps", [(0, [10]), (4, [4, 8, 10]), (5, [5, 10]), (20, [10])])
def test_eval_fn_runs_every_eval_every_steps_and_after_the_last(eval_every, steps):
    calls = []

    def eval_fn(model):
        calls.append((type(model), torch.is_grad_enabled()))
        return {**_tag_accuracy(model), "calls": torch.tensor(len(calls))}

    result = _tag_train(eval_fn, eval_every=eval_every)
    assert [e["step"] for e in result.evaluations] == steps
    assert [e["calls"] for e in result.evaluations] == list(range(1, len(steps) + 1))
    assert all(type(v) is float for e in result.evaluations for k, v in e.items() if k != "step")
    assert calls == [(DropoutTagger, False)] * len(steps)  # the bare model, without gradients
    assert result.evaluations[-1]["accuracy"] == _tag_accuracy(result.model)["accuracy"]  # the final weights


def test_eval_fn_changes_nothing_in_the_training_run():
    import random

    import numpy as np

    inputs = {k: v for k, v in collate(TAG_DATA[:6]).items() if k != "labels"}

    def meddling(model):
        torch.rand(100), random.random(), np.random.rand(3)  # draws from every RNG
        model.eval()  # and leaves the model in eval mode
        mux.multiplexed_forward(model, inputs, 3)
        return {"x": 1}

    plain = _tag_train()
    evaluated = _tag_train(meddling, eval_every=3)
    assert plain.evaluations == [] and [e["step"] for e in evaluated.evaluations] == [3, 6, 9, 10]
    _assert_same_weights(plain.model, evaluated.model)
    assert [h["loss"] for h in evaluated.history] == [h["loss"] for h in plain.history]
    assert evaluated.model.training and plain.model.training


def test_eval_fn_sees_the_model_in_eval_mode():
    modes = []
    _tag_train(lambda m: modes.append(m.training) or {"training": float(m.training)}, eval_every=5)
    assert modes == [False, False]


def test_evaluations_survive_resume(tmp_path):
    full = _tag_train(_tag_accuracy, eval_every=3)
    assert [e["step"] for e in full.evaluations] == [3, 6, 9, 10]
    first = _tag_train(_tag_accuracy, tmp_path, eval_every=3, checkpoint_every=5)
    ckpts = mux.list_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in ckpts] == ["checkpoint-00000005", "checkpoint-00000010"]
    shutil.rmtree(ckpts[-1])  # as if interrupted after step 5
    resumed = _tag_train(_tag_accuracy, tmp_path, eval_every=3, checkpoint_every=5)
    assert resumed.resumed_from == 5
    assert resumed.evaluations == first.evaluations == full.evaluations
    _assert_same_weights(full.model, resumed.model)
    state = json.loads((tmp_path / "ckpt" / "checkpoint-00000010" / "trainer_state.json").read_text())
    assert state["evaluations"] == full.evaluations
    again = _tag_train(_tag_accuracy, tmp_path, eval_every=3, checkpoint_every=5)  # finished: nothing to add
    assert again.resumed_from == 10 and again.evaluations == full.evaluations


def test_evaluations_survive_an_interruption(tmp_path):
    full = _tag_train(_tag_accuracy, eval_every=3)
    _interrupting_loss.calls, _interrupting_loss.at = 0, 8
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        mux.train(DropoutTagger(), TAG_DATA, _cfg(tmp_path, max_steps=10, batch_size=12, lr=1e-2, eval_every=3), n=3,
                  loss_fn=_interrupting_loss, collate_fn=collate, eval_fn=_tag_accuracy)
    state = json.loads((mux.latest_checkpoint(tmp_path / "ckpt") / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["evaluations"] == full.evaluations[:2]  # steps 3 and 6
    _interrupting_loss.at = -1
    torch.manual_seed(0)
    resumed = mux.train(DropoutTagger(), TAG_DATA, _cfg(tmp_path, max_steps=10, batch_size=12, lr=1e-2, eval_every=3),
                        n=3, loss_fn=_interrupting_loss, collate_fn=collate, eval_fn=_tag_accuracy)
    assert resumed.resumed_from == 7 and resumed.evaluations == full.evaluations


def test_a_finished_run_resumed_with_eval_fn_is_evaluated_once_at_its_end(tmp_path):
    done = _tag_train(None, tmp_path)
    assert done.evaluations == []
    resumed = _tag_train(_tag_accuracy, tmp_path, eval_every=4)  # eval_every is not part of the run
    assert resumed.resumed_from == 10 and resumed.steps == 10
    assert resumed.evaluations == [{"step": 10, **_tag_accuracy(done.model)}]
    _assert_same_weights(done.model, resumed.model)


@pytest.mark.parametrize("value", [0.5, None])
def test_eval_fn_must_return_a_dict(value):
    with pytest.raises(TypeError, match="eval_fn must return a dict"):
        _tag_train(lambda m: value, max_steps=2)
    with pytest.raises(ValueError, match="eval_every"):
        mux.TrainConfig(eval_every=-1)


# ---------------------------------------------------------------- plain progress lines for logs

def test_progress_lines_go_to_the_file_the_environment_names(tiny_digits, tmp_path, monkeypatch):
    import logging

    log = tmp_path / "progress.log"
    monkeypatch.setenv(parts.PROGRESS_FILE, str(log))
    monkeypatch.setenv(parts.PROGRESS_EVERY, "3")
    logger = logging.getLogger(parts.LOGGER)
    try:
        mux.train(_model(), tiny_digits[0], _cfg(max_steps=7, log_every=2, eval_every=5, description="tiny"), 2,
                  eval_fn=lambda m: {"accuracy": 0.5})
    finally:
        for handler in [h for h in logger.handlers if getattr(h, "mux_progress", None)]:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(logging.NOTSET)
    lines = log.read_text().splitlines()
    steps = [line.split("[tiny] ")[1] for line in lines]
    assert [s.split()[1] for s in steps] == ["3/7", "5/7", "6/7", "7/7", "7/7"], lines  # every 3, the last, evaluations
    assert "evaluation: accuracy 0.5000" in steps[1] and "evaluation: accuracy 0.5000" in steps[4]
    for text in (steps[0], steps[2], steps[3]):
        assert " loss " in text and " lr " in text and " steps/s ETA " in text
    assert steps[3].endswith("ETA 0:00:00")


def test_without_the_environment_training_prints_no_progress_line(tiny_digits, monkeypatch, capsys):
    monkeypatch.delenv(parts.PROGRESS_FILE, raising=False)
    mux.train(_model(), tiny_digits[0], _cfg(max_steps=3, log_every=1, progress=False), 2)
    captured = capsys.readouterr()
    assert "steps/s" not in captured.out + captured.err
