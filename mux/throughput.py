"""What a forward pass costs: measured throughput (instances per second) and counted FLOPs.

:func:`flops_per_instance` counts operations per instance, part by part; operations are not
time, so :func:`measure_throughput` measures time.

The point of multiplexing is speed: N instances share one pass through the backbone. The
course reports that speed the way it is felt, in instances per second, measured.

What :func:`measure_throughput` measures
----------------------------------------
- The forward pass only: no data loading, no transfer to the device, no loss, no backward.
  It runs under ``torch.inference_mode()`` with the model in ``eval()`` mode (each model's
  training mode is restored afterwards).
- One forward call processes a flat batch of ``instances`` instances ``(instances, *example.shape)``,
  grouped by :func:`mux.multiplexed_forward` into ``ceil(instances / N)`` tuples of N (the
  last one padded with copies): a model with N = 4 sees a batch of ``instances / 4`` tuples,
  the vanilla model (N = 1) a batch of ``instances`` images. ``instances`` may also be a
  dict ``{name: instances}``, one count per model, e.g. ``128 * N`` so that every model
  runs 128 tuples per forward (the batch convention of PruMUX). The instances are random
  (a fixed seed; for integer inputs such as token ids, copies of ``example``) and are the
  same for every model (a model given fewer instances gets the first ones); they are put on
  each model's device before timing.
- Timing uses ``torch.utils.benchmark.Timer``: it synchronises the GPU before reading the
  clock, and it is given ``torch.get_num_threads()`` threads (the Timer's own default is 1
  thread, which is not how the notebook runs the model). Before the trials, each model's
  forward is timed once to choose ``repeats``, the number of forward calls that last about
  ``min_run_time`` seconds (at least 1); every trial of that model is then one
  ``Timer.timeit(repeats)``, the same work in every trial (the Timer first makes a few
  untimed calls of its own). A trial gives ``instances * repeats / seconds`` instances per
  second.
- Trials are interleaved: round 1 runs one trial of every model, then round 2, and so on,
  each round in its own seeded shuffled order (:func:`trial_order`). A change in the
  machine's load during the measurement (another process, a throttled CPU) then hits every
  model alike instead of the one that happened to be measured at that moment.
- The reported value is the median over the trials; ``spread`` is (max - min) / median of
  the trials, the relative width of the range they span (0.1: the trials lie within 10% of
  the median). A large spread says the machine was busy: measure again before comparing.
  :func:`throughput_ratios` divides every model's median by a baseline's (a speed-up).

Why time and not FLOPs
----------------------
``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point operations of matrix
products and convolutions only: element-wise operations (a Hadamard product ``v_i * x``,
GELU, the mean over N, LayerNorm) count as zero. A FLOP count would call the Gaussian- and
binary-Hadamard multiplexers free, and it cannot see memory traffic, kernel launches or how
well a batch fills the device. The notebook reports FLOPs and measured time side by side.

Timings depend on the machine and its load: they are reported, never asserted in tests.
"""
from __future__ import annotations

import math
import random
import statistics

import torch
from torch import Tensor, nn

from .env import device_of
from .grouping import check_n, multiplexed_forward


def _timer_class():
    """``torch.utils.benchmark.Timer``, imported on first use. Its import also imports
    ``torch.utils.cpp_extension``, which logs a warning about a missing CUDA runtime on some
    CPU machines; that warning says nothing about timing, so it is silenced for the import."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer

__all__ = ["measure_throughput", "throughput_ratios", "trial_order", "flops_per_instance", "count_macs"]


def trial_order(names: list[str], trials: int, seed: int = 0) -> list[list[str]]:
    """The order in which :func:`measure_throughput` runs the trials: one list per round,
    each a seeded random permutation of ``names`` (every model once per round)."""
    rng = random.Random(seed)
    return [rng.sample(list(names), len(names)) for _ in range(trials)]


def _check_models(models: object) -> dict[str, tuple[nn.Module, int]]:
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict {name: (model, N)}, e.g. "
                         f"{{'vanilla': (model_1, 1), 'N=4': (model_4, 4)}}; got {models!r}")
    checked = {}
    for name, entry in models.items():
        if not isinstance(name, str):
            raise ValueError(f"model names must be strings, got {name!r}")
        ok = isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], nn.Module)
        if not ok:
            raise ValueError(f"models[{name!r}] must be a pair (model, N) with an nn.Module and its N, "
                             f"got {type(entry).__name__}")
        checked[name] = (entry[0], check_n(entry[1], f"N of models[{name!r}]"))
    return checked


def _instances(example: Tensor, instances: int, seed: int) -> Tensor:
    """``(instances, *example.shape)``: random normal values for a floating-point ``example``
    (drawn on the CPU from ``seed``), copies of ``example`` otherwise (e.g. token ids)."""
    if torch.is_floating_point(example):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(instances, *example.shape, generator=g, dtype=example.dtype)
    return example.detach().cpu().expand(instances, *example.shape).clone()


def _check_instances(instances: object, names: list[str]) -> dict[str, int]:
    """``{name: instances per forward}`` from an integer (the same for every model) or a dict
    with one positive integer per model name, no name missing and none extra."""
    if not isinstance(instances, dict):
        return dict.fromkeys(names, check_n(instances, "instances"))
    missing = [name for name in names if name not in instances]
    extra = [name for name in instances if name not in names]
    if missing or extra:
        raise ValueError("instances as a dict needs one count per model, {name: instances}; "
                         + "; ".join(([f"missing {missing}"] if missing else []) + ([f"unknown {extra}"] if extra else []))
                         + f" (the models are {names})")
    return {name: check_n(instances[name], f"instances[{name!r}]") for name in names}


def measure_throughput(
    models: dict[str, tuple[nn.Module, int]],
    example: Tensor,
    instances: int | dict[str, int] = 512,
    trials: int = 5,
    warmup: int = 1,
    *,
    min_run_time: float = 0.2,
    seed: int = 0,
) -> dict[str, dict]:
    """Measured inference throughput of each model, in instances per second.

    ``models``: ``{name: (model, N)}``; each model takes ``(B, N, *example.shape)`` and
    returns ``(B, N, ...)`` (e.g. a ``DataMUXClassifier`` and its ``n_mux``).
    ``example``: ONE instance, e.g. ``(C, H, W)``; only its shape and dtype are used for a
    floating-point example (the instances are drawn from ``seed``).
    ``instances``: instances per forward call, grouped into ``ceil(instances / N)`` tuples:
    one integer for every model, or a dict ``{name: instances}`` with one integer per model
    (every name of ``models``, no other), e.g. ``{name: 128 * N}`` for 128 tuples each.
    ``trials``: timed trials per model, interleaved across models (module docstring).
    ``warmup``: untimed forward calls per model before the first trial (first calls pay for
    memory allocation, kernel selection and caches).
    ``min_run_time``: about how many seconds one trial lasts (it repeats the forward as
    often as fits, at least once; a model slower than that runs once per trial).
    ``seed``: seeds the instances and the order of the trials within each round.

    Returns ``{name: {"instances_per_second": median over trials, "spread": (max - min) /
    median, "trials": [instances/s of each trial, in round order], "n": N, "instances": instances
    per forward, "tuples": ceil(instances / N), "repeats": forward calls timed per trial}}``, in
    the order of ``models``.
    """
    models = _check_models(models)
    if not isinstance(example, Tensor):
        raise ValueError(f"example must be a tensor holding one instance, e.g. (C, H, W); got {type(example).__name__}")
    counts = _check_instances(instances, list(models))
    check_n(trials, "trials")
    check_n(warmup, "warmup", minimum=0)
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)) or not min_run_time > 0:
        raise ValueError(f"min_run_time must be a number of seconds > 0, got {min_run_time!r}")

    flat = _instances(example, max(counts.values()), seed)  # (instances, *example.shape) on the CPU
    inputs, timers, was_training = {}, {}, {}
    for name, (model, n) in models.items():
        x = inputs[name] = flat[: counts[name]].to(device_of(model))  # on the model's device, outside the timing
        timers[name] = _timer_class()(
            stmt="multiplexed_forward(model, x, n)",
            globals={"multiplexed_forward": multiplexed_forward, "model": model, "x": x, "n": n},
            num_threads=torch.get_num_threads(),
            label="throughput", sub_label=name,
        )
        was_training[name] = model.training

    per_trial: dict[str, list[float]] = {name: [] for name in models}
    repeats: dict[str, int] = {}
    try:
        for model, _ in models.values():
            model.eval()
        with torch.inference_mode():
            for name, (model, n) in models.items():
                for _ in range(warmup):
                    multiplexed_forward(model, inputs[name], n)
                one = timers[name].timeit(1).mean  # seconds for one forward (after 2 untimed calls)
                repeats[name] = max(1, math.ceil(min_run_time / one))
            for round_names in trial_order(list(models), trials, seed):
                for name in round_names:
                    seconds = timers[name].timeit(repeats[name]).mean  # per forward, over `repeats` calls
                    per_trial[name].append(counts[name] / seconds)
    finally:
        for name, (model, _) in models.items():
            model.train(was_training[name])

    results = {}
    for name, (_, n) in models.items():
        values = per_trial[name]
        median = statistics.median(values)
        results[name] = {
            "instances_per_second": median,
            "spread": (max(values) - min(values)) / median,
            "trials": values,
            "n": n,
            "instances": counts[name],
            "tuples": math.ceil(counts[name] / n),
            "repeats": repeats[name],
        }
    return results


def throughput_ratios(results: dict[str, dict], baseline: str) -> dict[str, float]:
    """Each model's median instances/s divided by that of ``baseline`` (1.0 for the baseline
    itself): how many times faster than the baseline, e.g. the vanilla model."""
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be the non-empty dict returned by measure_throughput")
    if baseline not in results:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {list(results)}")
    base = results[baseline]["instances_per_second"]
    return {name: r["instances_per_second"] / base for name, r in results.items()}


def flops_per_instance(model: nn.Module, n: int, example: Tensor, parts: tuple[str, ...], tuples: int = 8) -> dict:
    """Forward FLOPs per instance of each named part of ``model`` (its direct submodules).

    One forward pass of ``tuples`` tuples of N instances shaped like ``example`` (one
    instance), counted by :func:`count_macs` without norms and doubled (2 FLOPs per
    multiply-add, the convention of ``torch.utils.flop_counter``), divided by the number of
    instances. Matrix products, convolutions and attention products count; element-wise
    operations (activations, norms, Hadamard products) do not. A part the model lacks (e.g. a
    vanilla model's multiplexer) counts 0.
    """
    check_n(n)
    check_n(tuples, "tuples")
    x = torch.zeros(tuples, n, *example.shape, dtype=example.dtype, device=device_of(model))
    macs = count_macs(model, x, norms=False)["by_module"]
    return {part: 2 * macs.get(part, 0) / (tuples * n) for part in parts}


def _norm_macs(input_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore's count for a LayerNorm: 5 operations per element with an affine (scale, shift),
    4 without; doubled here because :func:`count_macs` halves the counter's total."""
    weight_shape = args[1] if len(args) > 1 else kwargs.get("weight")
    return 2 * math.prod(input_shape) * (5 if weight_shape is not None else 4)


def _cpu_attention_macs(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention kernel, counted as torch counts the GPU's (2 per multiply-add)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_macs(model: nn.Module, *inputs, norms: bool = True, **kwargs) -> dict:
    """Multiply-adds of one forward call ``model(*inputs, **kwargs)``, in the convention of fvcore.

    ``torch.utils.flop_counter.FlopCounterMode`` counts 2 operations per multiply-add of every
    matrix product, convolution and attention product (``scaled_dot_product_attention``
    included); halved, that is fvcore's count, the one papers such as ConcatPlexer report as
    "GFLOPs". fvcore also counts a LayerNorm as 5 operations per element (4 without affine
    parameters); ``norms=True`` adds those. Element-wise operations (GELU, softmax, additions)
    count zero in both.

    Works on the meta device (no memory, no arithmetic): build the model under
    ``torch.device("meta")`` to count a ViT-B without allocating it. Returns ``{"total":
    MACs, "by_module": {module path: MACs}}``, the paths relative to ``model``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_macs}  # torch counts it 0
    if norms:
        custom[torch.ops.aten.native_layer_norm] = _norm_macs
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(*inputs, **kwargs)
    prefix = type(model).__name__ + "."  # the counter names submodules "<model class>.<path>"
    by_module = {path.removeprefix(prefix): sum(counts.values()) / 2
                 for path, counts in counter.get_flop_counts().items() if path.startswith(prefix)}
    return {"total": counter.get_total_flops() / 2, "by_module": by_module}
