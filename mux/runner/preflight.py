"""``python -m mux.runner.course preflight CONFIG|FOLDER``: what a full-scale configuration will cost, checked first.

Offline (``--offline``: CPU, no data, seconds), for every configuration: each model the notebook trains
(its build cell's classes and sizes, built on the meta device, so nothing is allocated or downloaded),
with its parameter count; memory per GPU; disk for checkpoints; projected GPU-hours; the data paths and
Hub ids it needs. On the target machine (no ``--offline``): CUDA and native bf16, one record from
every data source, a few training steps of every model on synthetic data shaped like the
configuration's, with the GPU's and the loader's rates and the peak memory. Either way the figures
are set beside the configuration's ``resources`` and written as JSON (``--json F``).

Formulas (also written into the JSON under ``formulas``):

- memory per GPU = 16 P (fp32 weights 4 + gradients 4 + AdamW's two moments 8 bytes a parameter)
  + activations + 1 GiB (CUDA context and allocator). Activations, for a Transformer:
  34 s h L bytes per backbone pass in a micro-batch (Korthikanti et al. 2022, 16-bit activations,
  fused SDPA attention so no s^2 term; s tokens, h width, L layers), passes = batch x cost
  (cost: backbone passes an instance, 1/N for a multiplexed model); for DataMUX's MLP/CNN:
  8 x batch x (C H W + width x depth x spatial) bytes.
- disk = sum over trainings of 12 P bytes a checkpoint (fp32 weights 4 + AdamW moments 8; the
  scheduler and RNG states are negligible) x ``keep_checkpoints`` (``TrainConfig``'s 2, which the
  notebooks keep: :mod:`mux.training.checkpoints` deletes older ones), plus 4 P for every stage
  model a notebook saves (03's priming and pre-training stages).
- GPU-hours = sum over trainings of max(GPU time, loader time), x (1 + the overhead the estimate
  states, "plus N%"). GPU time = steps x batch x grad_accum x processes x cost / rate / 3600. The
  rate is *assumed*, read from the configuration's ``resources.estimate`` text ("2,000
  sequences/s", "3,300 images/s", "5-10 ms a step"), unless ``--rates F`` gives *measured*
  instances/s per model (the JSON a preflight on the target machine wrote, or ``{config: {model:
  instances_per_s}}``). The rate is that of the family's one-input model (BERT-base's MLM
  training, ViT-B/16, the single-input CaiT), and ``cost`` is each model's multiply-adds an
  instance over that model's, *counted* with :func:`mux.count_macs` on the models built on the
  meta device: the multiplexed encoder once per N instances, and what runs once per instance
  (the demultiplexer, a vocabulary head at every position, T-MUX's prefix, the contextual
  multiplexer's layers) in full; a teacher's forward adds what the model's ``extra`` says. Loader
  time = instances / (num_workers / the decoding time an image that the estimate states,
  "workers / 3.4 ms").
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import runs

__all__ = ["Training", "plan", "offline_report", "online_report", "preflight", "FORMULAS"]

GIB = 1024 ** 3
KEEP_CHECKPOINTS = 2  # TrainConfig.keep_checkpoints, which no notebook changes
FORMULAS = {
    "memory_gb": "(16 * params + activations) / 2**30 + 1; activations = 34 * tokens * width * layers * batch * cost "
                 "(Transformer, bf16, fused attention) or 8 * batch * (C*H*W + width*depth*spatial) (DataMUX)",
    "disk_gb": "sum over trainings of 12 * params * keep_checkpoints (2) + 4 * params per saved stage model, / 2**30",
    "gpu_hours": "sum over trainings of max(steps * batch * grad_accum * processes * cost / rate, instances / loader "
                 "rate) / 3600 * (1 + overhead); rate: the one-input model's, assumed from resources.estimate unless "
                 "measured (--rates); cost: counted multiply-adds an instance over the one-input model's (meta device)",
}
CLASSES = (("imagenet-1k", 1000), ("imagenet", 1000), ("tiny", 200), ("cifar-100", 100), ("cifar100", 100),
           ("cifar-10", 10), ("mnist", 10), ("digits", 10))
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32)}
BERT_BASE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "vocab_size": 30522,
             "max_position_embeddings": 512}


@dataclass
class Training:
    """One ``mux.train`` call of a notebook: which model, how long, at what batch, and its cost per instance."""

    kind: str  # the model, as the report names it (one rate measured per kind)
    n: int
    steps: int
    build: Callable[[], torch.nn.Module]
    data: dict  # synthetic data: {"image": (C, H, W), "classes": k} or {"tokens": L, "vocab": V, "classes": k}
    cost: float = 1.0  # backbone passes an instance, relative to the family's one-input model
    arch: dict = field(default_factory=dict)  # tokens, width, layers (Transformer) or the DataMUX sizes
    stage_saves: int = 0  # stage models the notebook saves after this training
    extra: float = 0.0  # work beside the model, in one-input training passes (a teacher's forward)
    reference: bool = False  # the one-input model whose rate the estimate states: counted, not trained


def _classes(config: runs.RunConfig, params: dict) -> int:
    name = (str(config.data.get("name", "")) + " " + str(params.get("dataset", ""))).lower()
    return next((k for key, k in CLASSES if key in name), 1000)


def _datamux(config, p) -> list[Training]:
    from .. import DataMUXClassifier, DataMUXConfig

    shape = SHAPES.get(p.get("dataset", "digits"), (3, 32, 32))
    classes = _classes(config, p)

    def one(backbone, n, mx="orthogonal", vanilla=False, seed=0):
        depth = p.get("mlp_depth", 2) if backbone == "mlp" else p.get("cnn_depth", 2)
        cfg = dict(n_mux=n, backbone=backbone, multiplexer=mx, in_shape=shape, num_classes=classes,
                   width=p.get("width", 64), depth=depth, mux_seed=seed, vanilla=vanilla)
        kind = f"{backbone} {'vanilla' if vanilla else mx} N={n}"
        return Training(kind, n, p.get("steps", 400), lambda: DataMUXClassifier(DataMUXConfig(**cfg)),
                        {"image": shape, "classes": classes},
                        arch={"datamux": True, "width": cfg["width"], "depth": depth,
                              "spatial": shape[1] * shape[2] if backbone == "cnn" else 1})

    plan = [one(bb, 1, vanilla=True) for bb in ("mlp", "cnn")]
    plan += [one(bb, n) for bb in ("mlp", "cnn") for n in p.get("n_values", [1, 2, 4, 8])]
    for s in p.get("seeds", [0, 1, 2])[1:]:  # the first seed's comparison models are among the above
        plan += [one("mlp", 1, vanilla=True, seed=s)]
        plan += [one("mlp", p.get("compare_n", 4), mx, seed=s)
                 for mx in p.get("multiplexers", ["orthogonal", "gaussian_hadamard", "binary_hadamard"])]
    return plan


def _text_sizes(p: dict, notes: list[str]) -> dict:
    backbone = p.get("backbone", "")
    if not backbone:
        vocab = BERT_BASE["vocab_size"] if p.get("tokenizer_name", "").startswith("bert-base") else p.get("vocab_size", 500)
        return {"hidden_size": p.get("hidden_size", 64), "num_layers": p.get("num_layers", 2),
                "num_heads": p.get("num_heads", 4), "vocab_size": vocab}
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(backbone, local_files_only=True)
        return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_position_embeddings}
    except Exception:  # noqa: BLE001 - not cached here: the sizes are assumed
        if "bert-base" not in backbone:
            notes.append(f"backbone {backbone!r} is not available here; assumed BERT-base sizes")
        else:
            notes.append(f"{backbone}: BERT-base sizes (transformers' BertConfig defaults), config not downloaded")
        return dict(BERT_BASE)


def _mux_plms(config, p) -> tuple[list[Training], list[str]]:
    from .. import MUXPLMConfig, MUXPLMModel, TMUXConfig, TMUXModel

    notes: list[str] = []
    sizes = _text_sizes(p, notes)
    L, mux_n, cn = p.get("max_length", 32), p.get("mux_n", [2, 4]), p.get("compare_n", 2)
    contextual = _contextual_cost(config)
    steps = {k: p.get(f"{k}_steps", d) for k, d in (("prime", 150), ("pretrain", 200), ("finetune", 80))}

    def one(n, task, mx="gaussian_hadamard", labels=0, steps_=1, saves=0, tmux=False):
        fields = dict(vocab_size=sizes["vocab_size"], n_mux=n, task=task, num_labels=labels, multiplexer=mx,
                      hidden_size=sizes["hidden_size"], num_layers=sizes["num_layers"], num_heads=sizes["num_heads"],
                      intermediate_size=sizes.get("intermediate_size", 0), max_length=L, vanilla=n == 1,
                      dropout=p.get("dropout", 0.0))
        if tmux:
            build = lambda: TMUXModel(TMUXConfig(**fields))  # noqa: E731
        else:
            fields["max_position_embeddings"] = sizes.get("max_position_embeddings", 0)
            build = lambda: MUXPLMModel(MUXPLMConfig(**fields))  # noqa: E731
        name = ("T-MUX" if tmux else "BERT" if n == 1 else "MUX-BERT") + (" contextual" if mx == "contextual" else "")
        cost = (contextual if mx == "contextual" else 1.0) / n
        return Training(f"{name} {task} N={n}", n, steps_, build, {"tokens": L, "vocab": sizes["vocab_size"],
                        "classes": max(labels, 2)}, cost, {"tokens": L, "width": sizes["hidden_size"],
                        "layers": sizes["num_layers"]}, saves)

    reference = one(1, "mlm", steps_=0)
    reference.reference = True
    plan = [reference]
    chains = [(n, "gaussian_hadamard") for n in mux_n] + [(cn, "contextual")]
    if not p.get("pretrained_dir"):
        plan += [one(n, "retrieval", mx, steps_=steps["prime"], saves=1) for n, mx in chains]
        plan += [one(1, "mlm", steps_=steps["prime"] + steps["pretrain"], saves=1)]
        plan += [one(n, "mlm", mx, steps_=steps["pretrain"], saves=1) for n, mx in chains]
        plan += [one(cn, "rtd", steps_=steps["pretrain"], saves=1)]
        if not p.get("backbone"):
            plan += [one(cn, "retrieval", steps_=steps["prime"] + steps["pretrain"], tmux=True)]
    for task in p.get("tasks", ["negation"]):
        k = 3 if "mnli" in task else 2
        plan += [one(n, "sentence", mx, k, steps["finetune"]) for n, mx in
                 [(1, "gaussian_hadamard"), *[(n, "gaussian_hadamard") for n in mux_n], (cn, "gaussian_hadamard"),
                  (cn, "contextual")]]
        if not p.get("backbone"):
            plan += [one(cn, "sentence", labels=k, steps_=steps["finetune"], tmux=True)]
    if any("mnli" not in t for t in p.get("tasks", [])):
        notes.append("classes of a task: 3 for MNLI, else 2 (the head is a negligible part of the model)")
    return plan, notes


def _contextual_cost(config) -> float:
    found = re.search(r"([\d.]+) times the cost", config.resources.get("estimate", ""))
    return float(found.group(1)) if found else 1.17


def _image_shape(p: dict) -> tuple[int, int, int]:
    dataset = p.get("dataset", "digits")
    return SHAPES[dataset] if dataset in SHAPES else (3, p.get("image_size", 224), p.get("image_size", 224))


def _vision(config, p) -> tuple[list[Training], list[str]]:
    from .. import (ConcatPlexerConfig, ConcatPlexerModel, ImageMultiplexerConfig, ImageMultiplexerModel,
                    PatchCodebook, ViTClassifier, VisionConfig)

    notes: list[str] = []
    shape, classes = _image_shape(p), _classes(config, p)
    if p.get("vit_name"):
        sizes = VisionConfig.from_timm(p["vit_name"]).to_dict()  # timm's sizes, on the meta device: no download
        sizes = {k: sizes[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")}
        sizes.update(timm_name=p["vit_name"])
    else:
        sizes = {k: p.get(k, d) for k, d in (("embed_dim", 64), ("depth", 4), ("num_heads", 4), ("patch_size", 2))}
    common = dict(sizes, num_classes=classes, image_size=shape[1], in_chans=shape[0])
    depth, cn, steps = sizes["depth"], p.get("compare_n", 2), p.get("steps", 160)
    data = {"image": shape, "classes": classes}
    arch = {"tokens": (shape[1] // sizes["patch_size"]) ** 2 + 1, "width": sizes["embed_dim"], "layers": depth}

    def one(kind, n, k=0, teacher_dim=None, cost_extra=0.0):
        if kind == "vit":
            return Training("vit N=1", 1, steps, lambda: ViTClassifier(VisionConfig(**common)), data, 1.0, arch)
        if kind == "im":
            cfg = ImageMultiplexerConfig(**common, n_mux=n, num_codes=p.get("num_codes", 32))
            patch = shape[0] * sizes["patch_size"] ** 2
            return Training(f"im N={n}", n, steps, lambda: ImageMultiplexerModel(cfg, tokenizer=PatchCodebook(
                torch.zeros(cfg.num_codes, patch), sizes["patch_size"], shape[0])), data, 1 / n, arch)
        cfg = ConcatPlexerConfig(**common, n_mux=n, concat_point=k, teacher_dim=teacher_dim)
        name = f"cp N={n} k={k}" + (" recipe" if teacher_dim else "")
        return Training(name, n, steps, lambda: ConcatPlexerModel(cfg, load_pretrained=False), data,
                        (k + (depth - k) / n) / depth, arch, extra=cost_extra)

    k = p.get("concat_point", 1)
    plan = [one("vit", 1)] + [one("im", cn), one("cp", cn, k)]
    for _ in p.get("seeds", [0, 1])[1:]:
        plan += [one("vit", 1), one("im", cn), one("cp", cn, k)]
    plan += [t for n in p.get("mux_n", [2, 4]) if n != cn for t in (one("im", n), one("cp", n, k))]
    plan += [one("cp", cn, kk) for kk in p.get("concat_points", [0, 1, 2]) if kk != k]
    teacher_dim = 512 if p.get("teacher") else sizes["embed_dim"]
    plan += [one("cp", cn, k, teacher_dim, cost_extra=1 / 3)]
    notes.append("the CLIP recipe adds a third of a ViT training step (the teacher's forward)" + ("; teacher feature size 512 assumed (CLIP ViT-B/16's projection)"
                                              if p.get("teacher") else ""))
    return plan, notes


def _mixvit(config, p) -> tuple[list[Training], list[str]]:
    from .. import MIMOViTConfig, MIMOViTModel, MixViTConfig, MixViTModel
    from ..models.mixvit import SingleCutMix

    shape, classes = _image_shape(p), _classes(config, p)
    if p.get("timm_name"):
        sizes = MixViTConfig.from_timm(p["timm_name"]).to_dict()
    else:  # the notebook's defaults where the configuration sets nothing
        sizes = {k: p.get(k, d) for k, d in (("backbone", "cait"), ("embed_dim", 64), ("depth", 3),
                                              ("class_depth", 1), ("num_heads", 4), ("patch_size", 4))}
    sizes = {k: sizes[k] for k in ("backbone", "embed_dim", "depth", "class_depth", "num_heads", "patch_size",
                                   "mlp_ratio", "timm_name") if k in sizes}
    common = dict(sizes, num_classes=classes, image_size=shape[1], in_chans=shape[0],
                  init_values=p.get("init_values", 0.1))
    m, steps = p.get("subnetworks", 2), p.get("steps", 200)
    arch = {"tokens": (shape[1] // sizes["patch_size"]) ** 2 + 1, "width": sizes["embed_dim"],
            "layers": sizes["depth"] + sizes["class_depth"]}

    def mixvit(subnetworks: int, source: str):
        return lambda: MixViTModel(MixViTConfig(**common, subnetworks=subnetworks, source=source), load_pretrained=False)

    builds = {"single": mixvit(1, "none"), "embedding": mixvit(m, "embedding"), "encoding": mixvit(m, "encoding"),
              "none": mixvit(m, "none"), "single_cutmix": lambda: SingleCutMix(mixvit(1, "none")(), m),
              "mimo": lambda: MIMOViTModel(MIMOViTConfig(**common, subnetworks=m), load_pretrained=False)}
    builds["mixmo"] = builds["mimo"]
    seeds = p.get("seeds", [0, 1, 2])
    kinds = [(kind, len(seeds)) for kind in p.get("models", ["single", "single_cutmix", "embedding"])]
    kinds += [(kind, 1) for kind in p.get("first_seed_models", ["none"]) if kind not in dict(kinds)]
    plan = [Training(kind, 1, steps, builds[kind], {"image": shape, "classes": classes, "mixvit": kind}, 1.0, arch)
            for kind, times in kinds for _ in range(times)]
    return plan, ["every MixViT kind costs one backbone pass an image (as the configurations' estimates assume)"]


PLANS = {"01_datamux.ipynb": lambda c, p: (_datamux(c, p), []), "03_mux_plms.ipynb": _mux_plms,
         "04_vision_mux.ipynb": _vision, "05_mixvit.ipynb": _mixvit}


def plan(config: runs.RunConfig, params: dict) -> tuple[list[Training], list[str]]:
    """The trainings the configuration's notebook runs with ``params``, and the assumptions made."""
    if config.notebook not in PLANS:
        raise runs.ConfigError(f"{config.name}: preflight knows the trainings of {', '.join(PLANS)}, "
                               f"not of {config.notebook}")
    trainings, notes = PLANS[config.notebook](config, params)
    if not any(t.reference for t in trainings):
        for t in trainings:  # the one-input model whose rate the estimate states (04: the ViT, 05: the single CaiT)
            if t.kind in ("vit N=1", "single"):
                t.reference = True
                break
    return trainings, notes


def macs_per_instance(t: Training) -> float:
    """Multiply-adds of one forward pass an instance of ``t``'s model (:func:`mux.count_macs`), counted on
    the meta device with one tuple of N synthetic instances shaped like the configuration's data."""
    from .. import count_macs

    with torch.device("meta"):
        model = t.build().eval()
        if "tokens" in t.data:
            inputs = {"input_ids": torch.zeros(1, t.n, t.data["tokens"], dtype=torch.long)}
        else:
            inputs = {"x": torch.zeros(1, t.n, *t.data["image"])}
    if "x" in inputs:
        return count_macs(model, inputs["x"])["total"] / t.n
    return count_macs(model, **inputs)["total"] / t.n


_MACS: dict = {}


def counted_costs(trainings: list[Training], notes: list[str]) -> dict[int, float]:
    """Each training's cost (``id(t)`` -> multiply-adds an instance over the reference model's, plus its
    ``extra``); the hand-written ``t.cost`` where counting fails (then said in ``notes``)."""
    def macs(t):
        key = (t.kind, t.n, json.dumps([t.data, t.arch], sort_keys=True, default=str))
        if key not in _MACS:  # the same model in sibling configurations is counted once
            _MACS[key] = macs_per_instance(t)
        return _MACS[key]

    reference = next((t for t in trainings if t.reference), None)
    try:
        base = macs(reference) if reference is not None else None
        costs = {id(t): (macs(t) / base if base else t.cost) + t.extra for t in trainings}
    except Exception as err:  # noqa: BLE001 - a model that cannot run on the meta device: the plan's own cost
        notes.append(f"multiply-adds could not be counted ({type(err).__name__}: {err}); costs are the plan's "
                     "backbone passes an instance")
        return {id(t): t.cost + t.extra for t in trainings}
    if reference is not None:
        notes.append(f"costs: counted multiply-adds an instance over {reference.kind}'s "
                     f"({base / 1e9:.2f} G a forward pass)")
    return costs


def loader_seconds_per_image(config: runs.RunConfig) -> float | None:
    """Decoding and augmenting time an image on one worker, as the estimate states it ("workers / 3.4 ms")."""
    found = re.search(r"workers\s*/\s*(\d+(?:\.\d+)?)\s*ms", config.resources.get("estimate", ""))
    return float(found.group(1)) / 1000 if found else None


def count_parameters(build: Callable[[], torch.nn.Module]) -> tuple[int, str]:
    """Parameters of the model ``build`` makes, built on the meta device (nothing allocated); on the CPU if a
    part of it cannot be built there (then said)."""
    try:
        with torch.device("meta"):
            model = build()
        where = "meta"
    except Exception:  # noqa: BLE001 - an operation without a meta kernel: build it for real
        model, where = build(), "cpu"
    return sum(t.numel() for t in model.parameters()), where


def assumed_rate(config: runs.RunConfig) -> dict:
    """The rate the configuration's ``resources.estimate`` assumes: instances/s, or seconds a step."""
    text = config.resources.get("estimate", "")
    overhead = re.search(r"plus (?:about )?(\d+(?:\.\d+)?)\s*%", text)
    out = {"overhead": float(overhead.group(1)) / 100 if overhead else 0.0, "source": "assumed (resources.estimate)"}
    step = re.search(r"(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*ms a step", text)
    rate = re.search(r"(\d[\d,]*(?:\.\d+)?)\s+(?:[\w/.-]+\s+){0,2}(images|sequences)/s", text)
    if step:
        out.update(seconds_per_step=(float(step.group(1)) + float(step.group(2))) / 2000, unit="s a step")
    elif rate:
        out.update(instances_per_s=float(rate.group(1).replace(",", "")), unit=f"{rate.group(2)}/s")
    else:
        out.update(unit=None, source="none stated in resources.estimate")
    return out


def memory_gb(params: int, t: Training, batch: int) -> float:
    """Memory per GPU of one training at micro-batch ``batch`` (:data:`FORMULAS`)."""
    a = t.arch
    if a.get("datamux"):
        c, h, w = t.data["image"]
        act = 8 * batch * (c * h * w + a["width"] * a["depth"] * a["spatial"])
    else:
        act = 34 * a["tokens"] * a["width"] * a["layers"] * batch * t.cost
    return (16 * params + act) / GIB + 1.0


def needs_of(config: runs.RunConfig, params: dict) -> dict:
    """The data paths (the parameters that hold ``{data_root}`` or ``{runs}``) and Hub ids the run reads."""
    paths = {k: v for k, v in config.parameters.items() if isinstance(v, str) and runs.PLACEHOLDER.search(v)}
    hub = [params[k] for k in ("tokenizer_name", "backbone", "teacher") if params.get(k)
           and not runs.PLACEHOLDER.search(str(config.parameters.get(k, "")))]
    for k in ("vit_name", "timm_name"):
        if params.get(k) and params.get("pretrained"):
            hub.append(f"timm/{params[k]} (pretrained weights)")
    if any(str(t).startswith("glue:") for t in params.get("tasks", [])) and not params.get("glue_data_dir"):
        hub.append("nyu-mll/glue")
    corpus = str(params.get("corpus", ""))
    hub += [{"wikipedia": "wikimedia/wikipedia", "bookcorpus": "bookcorpus/bookcorpus"}[c]
            for c in corpus.split("+") if c in ("wikipedia", "bookcorpus")]
    if params.get("dataset") in SHAPES and params.get("dataset") != "digits":
        hub.append(f"torchvision {params['dataset']} (downloaded into data_dir)")
    return {"data_paths": paths, "hub_ids": hub}


def offline_report(config: runs.RunConfig, params: dict, rates: dict | None = None) -> dict:
    """Every training's model, parameters, memory, disk and GPU-hours, beside the configuration's resources."""
    trainings, notes = plan(config, params)
    assumed, measured = assumed_rate(config), (rates or {}).get(config.name, {})
    batch, accum = params.get("batch_size", 128), params.get("grad_accum_steps", 1)
    procs = params.get("num_processes", 1)
    costs = counted_costs(trainings, notes) if "instances_per_s" in assumed or measured else {}
    per_image = loader_seconds_per_image(config)
    loader_rate = params.get("num_workers", 0) * procs / per_image if per_image else None
    rows, counted = [], {}
    for t in (t for t in trainings if t.steps > 0):
        if t.kind not in counted:
            counted[t.kind] = count_parameters(t.build)
        n_params, where = counted[t.kind]
        instances = t.steps * batch * accum * procs
        cost = costs.get(id(t), t.cost + t.extra)
        if t.kind in measured:
            hours, source = instances / measured[t.kind] / 3600, "measured"
        elif "seconds_per_step" in assumed:
            hours, source = t.steps * assumed["seconds_per_step"] / 3600, "assumed"
        elif "instances_per_s" in assumed:
            hours, source = instances * cost / assumed["instances_per_s"] / 3600, "assumed"
        else:
            hours, source = float("nan"), "unknown"
        if loader_rate and math.isfinite(hours) and instances / loader_rate / 3600 > hours:
            hours, source = instances / loader_rate / 3600, source + ", loader-bound"
        rows.append({"model": t.kind, "n": t.n, "steps": t.steps, "parameters": n_params, "built_on": where,
                     "cost_per_instance": round(cost, 4), "memory_gb": round(memory_gb(n_params, t, batch), 2),
                     "disk_gb": round((12 * KEEP_CHECKPOINTS + 4 * t.stage_saves) * n_params / GIB, 3),
                     "gpu_hours": hours, "rate": source})
    known = [r["gpu_hours"] for r in rows if math.isfinite(r["gpu_hours"])]
    hours = sum(known) * (1 + assumed["overhead"]) if len(known) == len(rows) else float(config.resources["gpu_hours"])
    sources = {r["rate"].split(",")[0] for r in rows}
    memory = max(r["memory_gb"] for r in rows)
    report = {"config": config.name, "notebook": config.notebook, "trainings": rows,
              "gpu_hours": round(hours, 2), "disk_gb": round(sum(r["disk_gb"] for r in rows), 2),
              "memory_gb": memory, "rate": assumed, "rate_source": "/".join(sorted(sources)),
              "resources": config.resources, "notes": notes, **needs_of(config, params), "problems": []}
    if len(known) != len(rows):
        report["notes"].append("no rate stated or measured: gpu_hours is the configuration's own resources.gpu_hours")
    if memory > config.resources["gpu_memory_gb"]:
        report["problems"].append(f"estimated {memory:.1f} GB a GPU exceeds resources.gpu_memory_gb "
                                  f"{config.resources['gpu_memory_gb']}")
    return report


def table(reports: list[dict]) -> str:
    """One line a configuration: projected and stated GPU-hours, memory, disk, models, problems."""
    head = f"{'configuration':34s} {'models':>6s} {'params (max)':>13s} {'GPU-h':>8s} {'stated':>7s} " \
           f"{'mem GB':>7s} {'stated':>6s} {'disk GB':>8s}  rate"
    lines = [head, "-" * len(head)]
    for r in reports:
        top = max(t["parameters"] for t in r["trainings"])
        lines.append(f"{r['config']:34s} {len(r['trainings']):6d} {top / 1e6:12.2f}M {r['gpu_hours']:8.2f} "
                     f"{r['resources']['gpu_hours']:7g} {r['memory_gb']:7.1f} {r['resources']['gpu_memory_gb']:6g} "
                     f"{r['disk_gb']:8.2f}  {r['rate_source']}" + "".join(f"\n    ! {p}" for p in r["problems"]))
    lines.append(f"total: {sum(r['gpu_hours'] for r in reports):.1f} GPU-hours projected "
                 f"({sum(r['resources']['gpu_hours'] for r in reports):g} stated), "
                 f"{sum(r['disk_gb'] for r in reports):.1f} GB of checkpoints")
    return "\n".join(lines)


def read_rates(path: str | Path | None) -> dict:
    """Measured instances/s per configuration and model: a preflight's JSON, or ``{config: {model: rate}}``."""
    if not path:
        return {}
    raw = json.loads(Path(path).read_text())
    if "configs" in raw:
        return {name: {m: v["instances_per_s"] for m, v in r.get("measured", {}).items()}
                for name, r in raw["configs"].items()}
    return raw


def _synthetic(t: Training, size: int):
    """A dataset shaped like the configuration's, and the training's loss (text: the sentence task's)."""
    from torch.utils.data import TensorDataset

    from .. import MultiInputLoss, TaskAndRetrievalLoss, classification_loss

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, t.data["classes"], (size,), generator=g)
    if "tokens" in t.data:
        ids = torch.randint(5, t.data["vocab"], (size, t.data["tokens"]), generator=g)
        rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
        return rows, classification_loss, lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}
    images = torch.rand((size, *t.data["image"]), generator=g)
    losses = {"embedding": MultiInputLoss("token_cutmix", 0.5), "encoding": MultiInputLoss("token_cutmix", 0.5),
              "none": MultiInputLoss("token_cutmix", 0.5), "single_cutmix": MultiInputLoss("token_cutmix", 0.5),
              "mimo": MultiInputLoss("sum"), "mixmo": MultiInputLoss("mixmo", 2.0)}
    loss = losses.get(t.data.get("mixvit"), TaskAndRetrievalLoss(0.9, 0.1) if t.kind.startswith("im ")
                      else classification_loss)
    return TensorDataset(images, labels), loss, None


def measure(t: Training, params: dict, steps: int, device: str) -> dict:
    """``steps`` training steps of ``t``'s model at the configured batch, workers and precision, on synthetic data."""
    from .. import TrainConfig, train

    batch, accum = params.get("batch_size", 128), params.get("grad_accum_steps", 1)
    data, loss, collate = _synthetic(t, batch * accum * steps)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, grad_accum_steps=accum, progress=False, cpu=device == "cpu",
                      num_workers=params.get("num_workers", 0), mixed_precision=params.get("mixed_precision", "auto"),
                      description=f"preflight {t.kind}")
    torch.manual_seed(0)
    model = t.build()
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(model, data, cfg, t.n, loss, collate_fn=collate)
    seconds = time.perf_counter() - started
    out = {"steps": steps, "seconds": round(seconds, 3), "instances_per_s": batch * accum * steps / seconds,
           "device": result.device}
    if result.device.startswith("cuda"):
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=params.get("num_workers", 0),
                                         collate_fn=collate)
    started, count = time.perf_counter(), 0
    for b in loader:
        count += batch
    out["loader_instances_per_s"] = count / max(time.perf_counter() - started, 1e-9)
    return out


def probe_data(config: runs.RunConfig, params: dict) -> dict:
    """One record from every data path (a file under it) and Hub id (its metadata); what failed, said."""
    found = {}
    for name in needs_of(config, params)["data_paths"]:
        where = Path(str(params[name]))
        first = next((p for p in where.rglob("*") if p.is_file()), None) if where.is_dir() else None
        if first is not None:
            first.open("rb").read(64)
        found[name] = f"read {first}" if first else f"missing: '{where}' holds no file"
    for hub_id in needs_of(config, params)["hub_ids"]:
        try:
            import huggingface_hub

            repo = hub_id.split(" ")[0].removeprefix("timm/")
            kind = "dataset" if hub_id in ("nyu-mll/glue", "wikimedia/wikipedia", "bookcorpus/bookcorpus") else "model"
            if not hub_id.startswith("torchvision"):
                huggingface_hub.HfApi().repo_info(("timm/" if hub_id.startswith("timm/") else "") + repo,
                                                  repo_type=kind)
            found[hub_id] = "reachable"
        except Exception as err:  # noqa: BLE001 - reported
            found[hub_id] = f"missing: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return found


def online_report(config: runs.RunConfig, params: dict, steps: int, device: str, data: bool = True) -> dict:
    """:func:`offline_report`, then on this machine: the GPU, the data, and ``steps`` steps of every model kind."""
    from ..env import cuda_has_native_bf16, gpu_problem

    report = offline_report(config, params)
    if device != "cpu":
        problem = gpu_problem()
        report["cuda"] = {"problem": problem, "native_bf16": None if problem else cuda_has_native_bf16(),
                          "torch_cuda": torch.version.cuda}
        if problem:
            report["problems"].append(problem)
            return report
    if data:
        report["data"] = probe_data(config, params)
        report["problems"] += [f"{k}: {v}" for k, v in report["data"].items() if v.startswith("missing")]
    trainings, _ = plan(config, params)
    kinds = {t.kind: t for t in trainings}
    report["measured"] = {}
    for kind, t in kinds.items():
        sentence = kind.replace(" retrieval ", " sentence ").replace(" mlm ", " sentence ").replace(" rtd ", " sentence ")
        if sentence != kind and sentence in kinds:
            continue  # the same backbone as the sentence model, measured there
        report["measured"][kind] = measure(t, params, steps, device)
    rates = {k: v["instances_per_s"] for k, v in report["measured"].items()}
    for kind in kinds:
        for other in (" retrieval ", " mlm ", " rtd "):
            if other in kind and kind.replace(other, " sentence ") in rates:
                rates[kind] = rates[kind.replace(other, " sentence ")]
    projected = offline_report(config, params, {config.name: rates})
    report.update(gpu_hours=projected["gpu_hours"], rate_source=projected["rate_source"],
                  trainings=projected["trainings"])
    return report


def preflight(target, *, offline: bool = True, smoke: bool = False, overrides: dict | None = None,
              data_root: str = "data", runs_folder: str = "runs", steps: int = 50, device: str = "cuda",
              rates: str | None = None, data: bool = True, notebooks=runs.NOTEBOOKS, log=print) -> dict:
    """Check every configuration against its notebook (a mismatch raises :class:`~mux.runner.runs.ConfigError`),
    then report each one; returns ``{"configs": {name: report}, "gpu_hours": total, "disk_gb": total, ...}``."""
    configs = [runs.load_config(p) for p in runs.config_files(target)]
    for config in configs:
        runs.check_config(config, notebooks, overrides)
    measured, reports = read_rates(rates), []
    for config in configs:
        params = runs.resolve_parameters(config, data_root, runs_folder, smoke, overrides)
        if offline:
            reports.append(offline_report(config, params, measured))
        else:
            reports.append(online_report(config, params, steps, device, data))
    log(table(reports))
    return {"configs": {r["config"]: r for r in reports}, "formulas": FORMULAS, "offline": offline,
            "gpu_hours": round(sum(r["gpu_hours"] for r in reports), 2),
            "disk_gb": round(sum(r["disk_gb"] for r in reports), 2),
            "stated_gpu_hours": sum(r["resources"]["gpu_hours"] for r in reports),
            "problems": {r["config"]: r["problems"] for r in reports if r["problems"]}}
