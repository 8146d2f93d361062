import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mux


@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 8), d=st.integers(1, 24), b=st.integers(1, 3))
def test_mlp_demultiplexer_shapes(n, d, b):
    demux = mux.MLPDemultiplexer(n, d)
    assert demux(torch.randn(b, d)).shape == (b, n, d)
    assert demux(torch.randn(b, 5, d)).shape == (b, n, 5, d)
    assert len(demux.mlps) == n


def test_demultiplexer_heads_are_independent():
    demux = mux.MLPDemultiplexer(3, 8)
    out = demux(torch.randn(2, 8))
    assert not torch.allclose(out[:, 0], out[:, 1])
    with pytest.raises(ValueError, match=r"expects \(B, \.\.\., d=8\)"):
        demux(torch.randn(2, 7))


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 32, 32)])
def test_classifier_shapes(backbone, n, in_shape):
    model = mux.DataMUXClassifier(n_mux=n, backbone=backbone, in_shape=in_shape, width=16, num_classes=7)
    assert model(torch.randn(2, n, *in_shape)).shape == (2, n, 7)
    assert mux.multiplexed_forward(model, torch.randn(2 * n + 1, *in_shape), n).shape == (2 * n + 1, 7)


def test_classifier_rejects_wrong_input_and_config():
    model = mux.DataMUXClassifier(n_mux=4)
    with pytest.raises(ValueError, match=r"expects \(B, N=4, C, H, W\)"):
        model(torch.randn(8, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown backbone"):
        mux.DataMUXConfig(backbone="resnet")
    with pytest.raises(ValueError, match="unknown multiplexer"):
        mux.DataMUXConfig(multiplexer="dct")
    with pytest.raises(ValueError, match="in_shape"):
        mux.DataMUXConfig(in_shape=(8, 8))
    with pytest.raises(ValueError, match="N"):
        mux.DataMUXConfig(n_mux=0)


def test_multiplexer_is_saved_with_the_model(tmp_path):
    a = mux.DataMUXClassifier(n_mux=3, mux_seed=11)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = mux.DataMUXClassifier(n_mux=3, mux_seed=0)
    b.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(a.mux.weight, b.mux.weight)


def test_each_output_depends_on_its_own_instance():
    torch.manual_seed(0)
    model = mux.DataMUXClassifier(n_mux=2, width=16).eval()
    x = torch.randn(1, 2, 1, 8, 8)
    y = x.clone()
    y[:, 1] = torch.randn(1, 8, 8)
    # changing instance 1 changes the mixture, so both outputs may move, but output 1 must
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 1], model(y)[:, 1])


def test_for_data_sizes_the_model_and_is_seeded():
    class Splits:
        in_shape, num_classes = (3, 16, 16), 5

    a = mux.DataMUXClassifier.for_data(Splits(), 4, seed=3, backbone="cnn", width=8)
    b = mux.DataMUXClassifier.for_data(Splits(), 4, seed=3, backbone="cnn", width=8)
    assert a.config.in_shape == (3, 16, 16) and a.config.num_classes == 5 and a.config.mux_seed == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a(torch.randn(1, 4, 3, 16, 16)).shape == (1, 4, 5)
