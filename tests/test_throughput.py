"""mux.throughput: the structure and the counting of the measurement, never the machine's speed."""
import math
import time

import pytest
import torch
from torch import nn

import mux
from mux.throughput import trial_order

FAST = dict(min_run_time=0.01)  # keep every trial short: these tests check bookkeeping, not speed


class Sleeper(nn.Module):
    """A multiplexed 'model' whose forward takes a fixed time: ``(B, N, d) -> (B, N, 2)``.

    It records its name in ``log`` at every call, and whether it ran in eval and inference mode."""

    def __init__(self, name: str, seconds: float, log: list | None = None):
        super().__init__()
        self.name, self.seconds, self.log = name, seconds, log if log is not None else []
        self.scale = nn.Parameter(torch.ones(1))
        self.modes = set()

    def forward(self, x):
        self.log.append(self.name)
        self.modes.add((self.training, torch.is_inference_mode_enabled()))
        time.sleep(self.seconds)
        return x[..., :2] * self.scale


def test_result_structure_and_modes():
    a, b = Sleeper("a", 0.001).eval(), Sleeper("b", 0.001).train()
    results = mux.measure_throughput({"vanilla": (a, 1), "N=4": (b, 4)}, torch.randn(6), instances=10, trials=3,
                                     **FAST)
    assert list(results) == ["vanilla", "N=4"]
    for name, n in (("vanilla", 1), ("N=4", 4)):
        r = results[name]
        assert set(r) == {"instances_per_second", "spread", "trials", "n", "instances", "tuples", "repeats"}
        assert r["repeats"] >= 1
        assert r["n"] == n and r["instances"] == 10 and r["tuples"] == math.ceil(10 / n)
        assert len(r["trials"]) == 3 and all(t > 0 for t in r["trials"])
        assert r["instances_per_second"] == sorted(r["trials"])[1]  # the median of 3
        assert r["spread"] == pytest.approx((max(r["trials"]) - min(r["trials"])) / r["instances_per_second"])
    assert a.modes == {(False, True)} and b.modes == {(False, True)}  # eval() and inference_mode
    assert b.training and not a.training  # training modes restored


def test_instances_per_second_counts_instances_not_tuples():
    """A forward of 30 ms over 64 instances: about 64 / 0.03 instances per second whatever N
    (one call handles all ceil(64 / N) tuples). Loose bounds: the machine may be busy."""
    seconds, instances = 0.03, 64
    models = {f"N={n}": (Sleeper(str(n), seconds), n) for n in (1, 4, 5)}
    results = mux.measure_throughput(models, torch.randn(3, 2, 2), instances=instances, trials=2, warmup=0,
                                     **FAST)
    expected = instances / seconds
    for name, r in results.items():
        assert expected / 3 < r["instances_per_second"] < expected * 1.5, (name, r)


def test_ratios_against_the_baseline():
    results = {"vanilla": {"instances_per_second": 100.0}, "N=2": {"instances_per_second": 190.0},
               "N=4": {"instances_per_second": 350.0}}
    ratios = mux.throughput_ratios(results, "vanilla")
    assert ratios == {"vanilla": 1.0, "N=2": pytest.approx(1.9), "N=4": pytest.approx(3.5)}
    measured = mux.measure_throughput({"a": (Sleeper("a", 0.001), 1), "b": (Sleeper("b", 0.001), 2)},
                                      torch.randn(4), instances=8, trials=2, **FAST)
    ratios = mux.throughput_ratios(measured, "b")
    assert ratios["b"] == 1.0
    assert ratios["a"] == measured["a"]["instances_per_second"] / measured["b"]["instances_per_second"]


def collapse(calls: list[str]) -> list[str]:
    """Consecutive repeats merged: a trial calls its model one or more times."""
    return [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]


def test_trials_are_interleaved_in_a_seeded_shuffled_order():
    names, trials, seed = ["a", "b", "c"], 4, 3
    order = trial_order(names, trials, seed)
    assert len(order) == trials and all(sorted(r) == names for r in order)  # every model once per round
    assert order == trial_order(names, trials, seed)  # seeded
    assert len({tuple(r) for r in trial_order(names, 20, seed)}) > 1  # shuffled, not one fixed order

    log = []
    models = {name: (Sleeper(name, 0.003, log), 2) for name in names}
    mux.measure_throughput(models, torch.randn(4), instances=6, trials=trials, warmup=2, seed=seed, **FAST)
    # first each model's warmup (and its calibration), in the order of the dict; then the rounds
    assert collapse(log) == collapse(names + [name for r in order for name in r])
    # not all trials of one model first: each model comes back in (nearly) every round
    runs = collapse(log)[len(names):]
    assert all(runs.count(name) >= trials - 1 for name in names)


def test_inputs_are_on_the_model_device_and_seeded():
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))

        def forward(self, x):
            seen.append(x.clone())
            return x

    mux.measure_throughput({"r": (Recorder().double(), 3)}, torch.zeros(2, 5, dtype=torch.float64),
                           instances=7, trials=1, warmup=1, **FAST)
    first = seen[0]
    assert first.shape == (3, 3, 2, 5) and first.dtype == torch.float64  # ceil(7/3) tuples of 3
    assert first.device == torch.device("cpu") and first.std() > 0.5  # random instances, not the zeros
    assert all(torch.equal(s, first) for s in seen)  # the same instances at every call
    ids = torch.tensor([3, 1, 4])
    seen.clear()
    mux.measure_throughput({"r": (Recorder(), 2)}, ids, instances=4, trials=1, warmup=1, **FAST)
    assert torch.equal(seen[0], ids.expand(2, 2, 3))  # integer inputs (token ids) are copies of the example


def test_a_real_datamux_model_and_its_vanilla_baseline():
    class Splits:
        in_shape, num_classes = (1, 8, 8), 10

    models = {"vanilla": (mux.DataMUXClassifier.for_data(Splits(), 1, vanilla=True, width=8), 1),
              "N=4": (mux.DataMUXClassifier.for_data(Splits(), 4, width=8), 4)}
    results = mux.measure_throughput(models, torch.randn(1, 8, 8), instances=32, trials=2, **FAST)
    assert all(r["instances_per_second"] > 0 for r in results.values())
    assert mux.throughput_ratios(results, "vanilla")["vanilla"] == 1.0


def test_instances_per_model_as_a_dict():
    """``instances={name: count}``: each model gets its own count (e.g. 128 * N, the same number
    of tuples for every N), the first instances of the same seeded draw."""
    seen = {}

    class Recorder(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen[self.name] = x.clone()
            return x

    counts = {"vanilla": 3, "N=2": 6, "N=4": 5}
    models = {name: (Recorder(name), n) for name, n in (("vanilla", 1), ("N=2", 2), ("N=4", 4))}
    results = mux.measure_throughput(models, torch.zeros(2), instances=counts, trials=2, warmup=0, **FAST)
    for name, r in results.items():
        assert r["instances"] == counts[name] and r["tuples"] == math.ceil(counts[name] / r["n"])
        assert r["instances_per_second"] > 0
    assert seen["vanilla"].shape == (3, 1, 2) and seen["N=2"].shape == (3, 2, 2) and seen["N=4"].shape == (2, 4, 2)
    flat = seen["N=2"].reshape(6, 2)
    assert torch.equal(seen["vanilla"].reshape(3, 2), flat[:3])  # the same instances, the first ones
    assert torch.equal(seen["N=4"].reshape(8, 2)[:5], flat[:5])

    with pytest.raises(ValueError, match=r"missing \['N=4'\]"):
        mux.measure_throughput(models, torch.zeros(2), instances={"vanilla": 3, "N=2": 6}, **FAST)
    with pytest.raises(ValueError, match=r"unknown \['N=8'\]"):
        mux.measure_throughput(models, torch.zeros(2), instances={**counts, "N=8": 8}, **FAST)
    with pytest.raises(ValueError, match=r"instances\['N=2'\] must be an integer >= 1, got 0"):
        mux.measure_throughput(models, torch.zeros(2), instances={**counts, "N=2": 0}, **FAST)


def test_bad_input_is_refused_with_a_clear_message():
    model = (Sleeper("a", 0.0), 1)
    x = torch.randn(4)
    with pytest.raises(ValueError, match="non-empty dict"):
        mux.measure_throughput({}, x)
    with pytest.raises(ValueError, match=r"instances must be an integer >= 1, got 0"):
        mux.measure_throughput({"a": model}, x, instances=0)
    with pytest.raises(ValueError, match=r"trials must be an integer >= 1"):
        mux.measure_throughput({"a": model}, x, trials=0)
    with pytest.raises(ValueError, match=r"warmup must be an integer >= 0"):
        mux.measure_throughput({"a": model}, x, warmup=-1)
    with pytest.raises(ValueError, match=r"must be a pair \(model, N\)"):
        mux.measure_throughput({"a": Sleeper("a", 0.0)}, x)
    with pytest.raises(ValueError, match=r"N of models\['a'\] must be an integer >= 1"):
        mux.measure_throughput({"a": (Sleeper("a", 0.0), 0)}, x)
    with pytest.raises(ValueError, match="example must be a tensor"):
        mux.measure_throughput({"a": model}, [1.0, 2.0])
    with pytest.raises(ValueError, match="min_run_time"):
        mux.measure_throughput({"a": model}, x, min_run_time=0)
    results = {"a": {"instances_per_second": 1.0}}
    with pytest.raises(ValueError, match=r"unknown baseline 'b'; expected one of \['a'\]"):
        mux.throughput_ratios(results, "b")
    with pytest.raises(ValueError, match="non-empty dict"):
        mux.throughput_ratios({}, "a")


def test_flops_per_instance_counts_each_part_per_instance():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)

        def forward(self, x):  # (B, N, 6) -> (B, N, 3)
            return self.second(self.first(x))

    counts = mux.flops_per_instance(Two(), 2, torch.zeros(6), parts=("first", "second", "absent"))
    assert counts == {"first": 2 * 6 * 4, "second": 2 * 4 * 3, "absent": 0}
