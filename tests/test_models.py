import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import mux
from mux.demultiplexers import Demultiplexer
from mux.models.datamux import SpatialMean


def reference_demultiplexer(demux: mux.MLPDemultiplexer) -> nn.ModuleList:
    """N separate nn.Sequential(Linear, GELU, LayerNorm), loaded with ``demux``'s per-instance weights."""
    mlps = nn.ModuleList(nn.Sequential(nn.Linear(demux.d, demux.d), nn.GELU(), nn.LayerNorm(demux.d))
                         for _ in range(demux.n))
    with torch.no_grad():
        for i, mlp in enumerate(mlps):
            mlp[0].weight.copy_(demux.weight[i])
            mlp[0].bias.copy_(demux.bias[i])
            mlp[2].weight.copy_(demux.norm_weight[i])
            mlp[2].bias.copy_(demux.norm_bias[i])
    return mlps


def randomise_(demux: mux.MLPDemultiplexer) -> mux.MLPDemultiplexer:
    """Give every parameter random values (LayerNorm scale and shift start as 1 and 0)."""
    with torch.no_grad():
        for p in demux.parameters():
            p.normal_()
    return demux


def assert_instances_differ(demux: mux.MLPDemultiplexer, h: torch.Tensor) -> None:
    """Fail if two instance indices share parameters or give the same output for ``h``."""
    out = demux(h)  # (B, N, ..., d)
    for i in range(demux.n):
        for j in range(i + 1, demux.n):
            assert not torch.equal(demux.weight[i], demux.weight[j]), f"instances {i} and {j} share a weight"
            assert not torch.equal(demux.bias[i], demux.bias[j]), f"instances {i} and {j} share a bias"
            assert not torch.allclose(out[:, i], out[:, j]), f"instances {i} and {j} give the same output"


@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 8), d=st.integers(1, 24), b=st.integers(1, 3))
def test_mlp_demultiplexer_shapes(n, d, b):
    demux = mux.MLPDemultiplexer(n, d)
    assert isinstance(demux, Demultiplexer)
    assert demux(torch.randn(b, d)).shape == (b, n, d)
    assert demux(torch.randn(b, 5, d)).shape == (b, n, 5, d)
    assert demux(torch.randn(b, 2, 3, d)).shape == (b, n, 2, 3, d)
    shapes = {k: tuple(v.shape) for k, v in demux.named_parameters()}
    assert shapes == {"weight": (n, d, d), "bias": (n, d), "norm_weight": (n, d), "norm_bias": (n, d)}


@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 6), d=st.integers(2, 24), b=st.integers(1, 3), length=st.integers(1, 4),
       seed=st.integers(0, 1000))
@example(n=5, d=2, b=1, length=2, seed=406)  # a clean-clone run's failure at float32's default tolerance
def test_batched_demultiplexer_equals_a_loop_of_n_mlps(n, d, b, length, seed):
    torch.manual_seed(seed)
    demux = randomise_(mux.MLPDemultiplexer(n, d))
    mlps = reference_demultiplexer(demux)
    for h in (torch.randn(b, d), torch.randn(b, length, d)):  # (B, d) and (B, L, d)
        expected = torch.stack([mlp(h) for mlp in mlps], dim=1)  # (B, N, ..., d)
        # the batched product sums in another order than the loop; a LayerNorm over d = 2 features divides by a
        # tiny spread and magnifies that last-bit difference (3e-5 seen), still far below any miswiring
        torch.testing.assert_close(demux(h), expected, rtol=1e-4, atol=1e-4)


def test_batched_demultiplexer_gradients_equal_the_loop():
    torch.manual_seed(0)
    demux = randomise_(mux.MLPDemultiplexer(3, 6))
    mlps = reference_demultiplexer(demux)
    h = torch.randn(4, 2, 6)
    target = torch.randn(4, 3, 2, 6)
    (demux(h) - target).pow(2).sum().backward()
    (torch.stack([mlp(h) for mlp in mlps], dim=1) - target).pow(2).sum().backward()
    for i, mlp in enumerate(mlps):
        torch.testing.assert_close(demux.weight.grad[i], mlp[0].weight.grad)
        torch.testing.assert_close(demux.bias.grad[i], mlp[0].bias.grad)
        torch.testing.assert_close(demux.norm_weight.grad[i], mlp[2].weight.grad)
        torch.testing.assert_close(demux.norm_bias.grad[i], mlp[2].bias.grad)


@pytest.mark.parametrize("n,d", [(1, 8), (3, 8), (4, 33)])
def test_demultiplexer_init_is_that_of_n_linear_layers(n, d):
    """Same seed, same numbers as N nn.Linear(d, d) + nn.LayerNorm(d) built one after the other
    (the per-index loop this class replaces), so seeded models start where they used to."""
    torch.manual_seed(5)
    demux = mux.MLPDemultiplexer(n, d)
    after = torch.rand(1)
    torch.manual_seed(5)
    mlps = [nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d)) for _ in range(n)]
    assert torch.equal(torch.rand(1), after)  # the same amount of the global RNG was used
    assert torch.equal(demux.weight, torch.stack([m[0].weight for m in mlps]))
    assert torch.equal(demux.bias, torch.stack([m[0].bias for m in mlps]))
    assert torch.equal(demux.norm_weight, torch.ones(n, d)) and torch.equal(demux.norm_bias, torch.zeros(n, d))
    bound = d**-0.5  # kaiming_uniform(a=sqrt(5)) and the bias both stay within 1/sqrt(fan_in)
    assert demux.weight.abs().max() <= bound and demux.bias.abs().max() <= bound


def test_demultiplexer_instances_differ_after_init():
    torch.manual_seed(0)
    demux = mux.MLPDemultiplexer(4, 8)
    assert_instances_differ(demux, torch.randn(5, 8))
    assert_instances_differ(demux, torch.randn(5, 3, 8))


@pytest.mark.parametrize("part", ["weight", "bias", "all"])
def test_identical_instances_are_detected(part):
    """The check above must fail when instance indices share parameters (the defect the old
    test missed): copy instance 0 into instance 2, in part or in whole."""
    torch.manual_seed(0)
    demux = mux.MLPDemultiplexer(3, 8)
    with torch.no_grad():
        names = ["weight", "bias", "norm_weight", "norm_bias"] if part == "all" else [part]
        for name in names:
            getattr(demux, name)[2] = getattr(demux, name)[0]
    with pytest.raises(AssertionError, match="instances 0 and 2"):
        assert_instances_differ(demux, torch.randn(5, 8))


def test_identical_outputs_are_detected():
    """Distinct parameters are not enough: outputs that coincide must be caught too."""
    torch.manual_seed(0)
    demux = mux.MLPDemultiplexer(2, 8)
    with torch.no_grad():
        demux.norm_weight.zero_()  # every output becomes the shift alone ...
        demux.norm_bias.copy_(demux.norm_bias[0].expand(2, 8))  # ... and the shifts agree
    with pytest.raises(AssertionError, match="same output"):
        assert_instances_differ(demux, torch.randn(5, 8))


def test_demultiplexer_errors_and_context():
    demux = mux.MLPDemultiplexer(3, 8)
    with pytest.raises(ValueError, match=r"MLPDemultiplexer expects \(B, \.\.\., d=8\), got shape \(2, 7\)"):
        demux(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        demux(torch.randn(8))
    h = torch.randn(2, 8)
    assert torch.equal(demux(h, prefix=torch.randn(2, 3, 8)), demux(h))  # context it does not need is ignored


class PrefixDemultiplexer(Demultiplexer):
    """A toy demultiplexer that needs context: instance i = h + the state of prefix token i."""

    def demultiplex(self, h, prefix=None, **context):
        if prefix is None or prefix.shape != (h.shape[0], self.n, self.d):
            raise ValueError(f"PrefixDemultiplexer needs prefix=(B, N={self.n}, d={self.d})")
        return h.unsqueeze(1) + prefix.view(h.shape[0], self.n, *([1] * (h.dim() - 2)), self.d)


def test_base_class_passes_context_through():
    demux = PrefixDemultiplexer(3, 4)
    h, prefix = torch.randn(2, 5, 4), torch.randn(2, 3, 4)  # token-level: every position
    out = demux(h, prefix=prefix)
    assert out.shape == (2, 3, 5, 4)
    torch.testing.assert_close(out[:, 1, 2], h[:, 2] + prefix[:, 1])
    assert demux(h[:, 0], prefix=prefix).shape == (2, 3, 4)  # sentence-level: position 0 only
    with pytest.raises(ValueError, match="needs prefix"):
        demux(h)
    with pytest.raises(ValueError, match=r"expects \(B, \.\.\., d=4\)"):  # the base class checks h
        demux(torch.randn(2, 5), prefix=prefix)


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


def test_spatial_mean_equals_adaptive_avg_pool_on_cpu():
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for shape in [(2, 8, 4, 4), (3, 16, 7, 5), (2, 5, 1, 1), (4, 32, 16, 16)]:
        x = torch.randn(*shape, requires_grad=True)
        a, b = pool(x), SpatialMean()(x)
        assert torch.equal(a, b)
        ga, = torch.autograd.grad(a.square().sum(), x)
        gb, = torch.autograd.grad(b.square().sum(), x)
        assert torch.equal(ga, gb)
    with pytest.raises(ValueError, match=r"SpatialMean expects \(B, C, H, W\)"):
        SpatialMean()(torch.randn(2, 8))
    model = mux.DataMUXClassifier(n_mux=2, backbone="cnn", width=8)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_classifier_input_dtypes(backbone):
    torch.manual_seed(0)
    model = mux.DataMUXClassifier(n_mux=2, backbone=backbone, width=8).eval()
    x = torch.randn(3, 2, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        out64 = model(x.double())  # cast to the parameters' dtype
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, out)
    with pytest.raises(TypeError, match="floating-point images, got dtype torch.uint8"):
        model((x * 255).clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_classifier_trains_and_every_instance_gets_gradients(backbone):
    torch.manual_seed(0)
    n = 3
    model = mux.DataMUXClassifier(n_mux=n, backbone=backbone, width=16, num_classes=4)
    x, y = torch.randn(8, n, 1, 8, 8), torch.randint(0, 4, (8, n))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        for i in range(n):  # each instance index's own demultiplexer parameters are trained
            assert model.demux.weight.grad[i].abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- the vanilla (non-multiplexed) baseline ---------------------------------------------

class TinySplits:
    in_shape, num_classes = (1, 8, 8), 4


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 16, 16)])
def test_vanilla_shapes(backbone, in_shape):
    model = mux.DataMUXClassifier(n_mux=1, vanilla=True, backbone=backbone, in_shape=in_shape, width=8,
                                  num_classes=7)
    assert model(torch.randn(3, 1, *in_shape)).shape == (3, 1, 7)
    assert mux.multiplexed_forward(model, torch.randn(5, *in_shape), 1).shape == (5, 7)
    with pytest.raises(ValueError, match=r"expects \(B, N=1, C, H, W\)"):
        model(torch.randn(3, 2, *in_shape))


def test_vanilla_needs_n_equal_to_one():
    for n in (2, 4):
        with pytest.raises(ValueError, match=rf"vanilla=True .* needs n_mux=1, got n_mux={n}"):
            mux.DataMUXConfig(n_mux=n, vanilla=True)
        with pytest.raises(ValueError, match="needs n_mux=1"):
            mux.DataMUXClassifier.for_data(TinySplits(), n, vanilla=True)
    with pytest.raises(ValueError, match="vanilla must be True or False"):
        mux.DataMUXConfig(n_mux=1, vanilla="yes")


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_vanilla_has_no_multiplexer_or_demultiplexer(backbone):
    model = mux.DataMUXClassifier.for_data(TinySplits(), 1, seed=0, vanilla=True, backbone=backbone, width=8)
    assert model.mux is None and model.demux is None
    assert not any(isinstance(m, (mux.Multiplexer, mux.Demultiplexer)) for m in model.modules())
    names = [k for k in model.state_dict()]  # parameters and buffers
    assert all(k.split(".")[0] in ("front", "backbone", "head") for k in names), names
    assert "(mux)" not in repr(model) and "(demux)" not in repr(model)
    datamux = mux.DataMUXClassifier.for_data(TinySplits(), 1, seed=0, backbone=backbone, width=8)
    extra = sum(p.numel() for p in datamux.demux.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in datamux.parameters()) - extra
    assert model.config.to_dict()["vanilla"] is True
    assert datamux.config.to_dict()["vanilla"] is False


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
@pytest.mark.parametrize("multiplexer", ["orthogonal", "gaussian_hadamard"])
def test_vanilla_starts_from_the_weights_of_the_datamux_model(backbone, multiplexer):
    """Same seed: front, backbone and head identical to those of the DataMUX N=1 model."""
    kw = dict(backbone=backbone, multiplexer=multiplexer, width=8)
    before = torch.get_rng_state()
    vanilla = mux.DataMUXClassifier.for_data(TinySplits(), 1, seed=7, vanilla=True, **kw)
    datamux = mux.DataMUXClassifier.for_data(TinySplits(), 1, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), before)  # a seed argument: the global RNG is left alone
    ours, theirs = vanilla.state_dict(), datamux.state_dict()
    shared = [k for k in theirs if k.split(".")[0] in ("front", "backbone", "head")]
    assert sorted(ours) == sorted(shared)
    for k in shared:
        assert torch.equal(ours[k], theirs[k]), k
    other = mux.DataMUXClassifier.for_data(TinySplits(), 1, seed=8, vanilla=True, **kw)
    assert not torch.equal(other.head.weight, vanilla.head.weight)  # the seed does matter


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_vanilla_forward_is_front_backbone_head(backbone):
    torch.manual_seed(0)
    model = mux.DataMUXClassifier(n_mux=1, vanilla=True, backbone=backbone, width=8).eval()
    x = torch.randn(4, 1, 1, 8, 8)
    with torch.no_grad():
        expected = model.head(model.backbone(model.front(x[:, 0])))
        torch.testing.assert_close(model(x), expected.unsqueeze(1))
        torch.testing.assert_close(model(x.double()), model(x))


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_vanilla_trains_and_evaluates_with_n_equal_to_one(backbone):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    model = mux.DataMUXClassifier.for_data(TinySplits(), 1, seed=0, vanilla=True, backbone=backbone, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mux.train(model, data, mux.TrainConfig(max_steps=5, batch_size=32, progress=False, cpu=True), 1)
    assert result.steps == 5
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    metrics = mux.evaluate(result.model, data, 1, device="cpu")
    assert metrics["n_examples"] == 64 and 0.0 <= metrics["accuracy"] <= 1.0
