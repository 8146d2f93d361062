"""The training loop's run-time switches: a tracker, TF32, torch.compile and evaluation only,
each from a TrainConfig field or from the environment a full-scale run sets."""
import struct
from pathlib import Path

import pytest
import torch

import mux
from mux.training import checkpoints, config


def _model(n=2):
    mux.seed_everything(0)
    return mux.DataMUXClassifier(n_mux=n, width=32)


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=16, lr=3e-3, seed=0, progress=False, log_every=2, cpu=True)
    base.update(kw)
    return mux.TrainConfig(**base)


def _accuracy(test_set):
    return lambda model: {"acc": mux.evaluate(model, test_set, 2)["accuracy"]}


def _same_weights(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"parameter {k} differs")


def _scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file (TFRecord framing: length, its CRC, the record, its CRC)."""
    from tensorboardX.proto import event_pb2

    found, data, at = {}, event_file.read_bytes(), 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_the_switches_default_to_the_environment(monkeypatch):
    monkeypatch.setenv(config.TRACKER, "tensorboard")
    monkeypatch.setenv(config.TF32, "1")
    monkeypatch.setenv(config.COMPILE, "inductor")
    monkeypatch.setenv(config.EVALUATE_ONLY, "true")
    cfg = mux.TrainConfig(checkpoint_dir="somewhere")
    assert (cfg.tracker, cfg.tf32, cfg.compile, cfg.evaluate_only) == ("tensorboard", True, "inductor", True)
    monkeypatch.setenv(config.TF32, "perhaps")
    with pytest.raises(ValueError, match="MUX_TF32 must be 1/0"):
        mux.TrainConfig()
    monkeypatch.delenv(config.TF32)
    with pytest.raises(ValueError, match="evaluate_only=True loads the run's final checkpoint: it needs a checkpoint_dir"):
        mux.TrainConfig()  # MUX_EVALUATE_ONLY is still set, and nothing says where the checkpoint is


def test_switches_are_not_part_of_the_run_identity():
    for name in ("tracker", "tracker_dir", "compile", "evaluate_only"):
        assert name in checkpoints.NOT_PART_OF_THE_RUN
    assert "tf32" not in checkpoints.NOT_PART_OF_THE_RUN  # TF32 changes the numbers: a resume must match it


def test_tensorboard_tracker_gets_every_logged_loss_and_evaluation(tiny_digits, tmp_path):
    pytest.importorskip("tensorboardX")
    train_set, test_set = tiny_digits
    cfg = _cfg(tracker="tensorboard", tracker_dir=str(tmp_path / "tb"), description="digits_n2")
    result = mux.train(_model(), train_set, cfg, n=2, eval_fn=_accuracy(test_set), )
    (event_file,) = (tmp_path / "tb" / "digits_n2").glob("events.out.tfevents.*")
    scalars = _scalars(event_file)
    assert [s for s, _ in scalars["train/loss"]] == [h["step"] for h in result.history] == [2, 4, 6]
    for (step, logged), h in zip(scalars["train/loss"], result.history):
        assert logged == pytest.approx(h["loss"], rel=1e-6)
    assert scalars["eval/acc"] == [(6, pytest.approx(result.evaluations[-1]["acc"]))]


def test_tracker_defaults_beside_the_checkpoints(tiny_digits, tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = _cfg(tracker="tensorboard", checkpoint_dir=str(tmp_path / "checkpoints" / "vanilla"), description="vanilla")
    mux.train(_model(), tiny_digits[0], cfg, n=2)
    assert list((tmp_path / "checkpoints" / "tracker" / "vanilla").glob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_refused_with_what_to_install(tiny_digits):
    pytest.importorskip("tensorboardX")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install wandb"):
        mux.train(_model(), tiny_digits[0], _cfg(tracker="tensorboard,wandb"), n=2)


def test_tf32_is_on_while_training_and_put_back_after(tiny_digits):
    seen = []

    def loss(model, batch, n):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return mux.classification_loss(model, batch, n)

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        mux.train(_model(), tiny_digits[0], _cfg(tf32=True), n=2, loss_fn=loss)
        assert seen and all(s == (True, True) for s in seen)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        seen.clear()
        mux.train(_model(), tiny_digits[0], _cfg(), n=2, loss_fn=loss)
        assert seen and all(s[0] is False for s in seen)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_compiled_training_gives_the_same_weights_and_a_plain_model(tiny_digits, tmp_path):
    # the "eager" backend runs torch.compile's capture without generating code: seconds, and the same arithmetic
    plain = mux.train(_model(), tiny_digits[0], _cfg(), n=2).model
    compiled = mux.train(_model(), tiny_digits[0], _cfg(compile="eager", checkpoint_dir=str(tmp_path / "c")), n=2)
    assert type(compiled.model) is mux.DataMUXClassifier
    _same_weights(plain, compiled.model)
    loaded = mux.load_weights(_model(), tmp_path / "c")  # the checkpoint holds the module, not the compiled wrapper
    _same_weights(plain, loaded)


def test_evaluate_only_loads_the_final_checkpoint_and_trains_nothing(tiny_digits, tmp_path):
    train_set, test_set = tiny_digits
    folder = tmp_path / "run"
    trained = mux.train(_model(), train_set, _cfg(checkpoint_dir=str(folder)), n=2)
    saved = sorted(p.name for p in folder.iterdir())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    updates = []
    hook = register_optimizer_step_post_hook(lambda *args: updates.append(1))
    try:
        result = mux.train(_model(), train_set, _cfg(checkpoint_dir=str(folder), evaluate_only=True), n=2,
                           eval_fn=_accuracy(test_set))
    finally:
        hook.remove()
    assert not updates
    _same_weights(trained.model, result.model)
    assert result.steps == 6 and result.evaluations[-1]["step"] == 6
    assert result.evaluations[-1]["acc"] == mux.evaluate(trained.model, test_set, 2)["accuracy"]
    assert sorted(p.name for p in folder.iterdir()) == saved  # nothing written


def test_evaluate_only_refuses_a_run_that_has_not_finished(tiny_digits, tmp_path):
    import shutil

    folder = tmp_path / "half"
    mux.train(_model(), tiny_digits[0], _cfg(checkpoint_dir=str(folder), checkpoint_every=3), n=2)
    shutil.rmtree(checkpoints.latest_checkpoint(folder))  # as if stopped after step 3
    with pytest.raises(ValueError, match=r"holds no final checkpoint of this run \(newest: step 3 of 6\)"):
        mux.train(_model(), tiny_digits[0], _cfg(checkpoint_dir=str(folder), evaluate_only=True), n=2)
    with pytest.raises(ValueError, match=r"newest: step 0 of 6"):
        mux.train(_model(), tiny_digits[0], _cfg(checkpoint_dir=str(tmp_path / "empty"), evaluate_only=True), n=2)
