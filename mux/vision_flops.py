"""GFLOPs per image of ViT-B/16, ConcatPlexer (1)-(4) and the Image Multiplexer, beside the paper's Table 3.

    .venv/bin/python scripts/vision_flops.py                        # the table (seconds, no memory)
    .venv/bin/python scripts/vision_flops.py --json runs/vision_flops/flops.json
    .venv/bin/python scripts/vision_flops.py --speed --batch 16     # also images/s, measured

(``scripts/vision_flops.py`` runs :func:`main` of this module; notebook 04 calls
:func:`flops_table` directly.)

What is counted
---------------
One forward pass at 224 x 224 pixels and 1000 classes, per image: a pass of ConcatPlexer
with N images is divided by N. Counted by ``mux.count_macs`` in multiply-adds, the
convention of fvcore, which the paper used ("FLOPs" there are multiply-adds: ViT-B/16's
17.58): every matrix product, convolution and attention product, plus fvcore's 5 operations
per element of each LayerNorm; element-wise operations (GELU, softmax, additions) count zero.
The models are built on the meta device: no weights are allocated and no arithmetic is done.

- ``vit_b16``: ``timm``'s ``vit_base_patch16_224`` with a 1000-class head.
- ``concatplexer_1`` ... ``concatplexer_4``: :class:`mux.ConcatPlexerModel` on ViT-B/16 with
  (N, concat point) = (2, 1), (2, 3), (2, 6), (4, 1) (Table 1): patch embedding and k blocks per
  image at 196 tokens, the C-Multiplexer's convolution, 12 - k blocks per N images at 197
  tokens, N MLP demultiplexers on CLS and the head.
- ``image_multiplexer_n2``, ``_n4``: :class:`mux.ImageMultiplexerModel` with Table 1's DALL-E
  token length, 784 tokens (8 x 8-pixel patches), on the ViT-B backbone (768 wide, 12 blocks).
  The codes' embedding is a table lookup (0 multiply-adds); the dVAE encoder that would
  produce the codes is not counted (the paper reports no figure for these models: "its
  computational cost was prohibitively large").

With ``--speed`` the same ViT-B/16 and ConcatPlexers (random weights; ``--dtype`` fp32 by
default, ``--device`` cpu by default, e.g. ``--device cuda --dtype bf16 --batch 256``) are timed on
this machine by ``mux.measure_throughput`` (``--batch`` images per forward for every model,
interleaved trials, median and spread), and each speed-up over ViT-B/16 is printed beside
the speed-up its multiply-adds predict.

Output: the table on stdout; with ``--json PATH`` a flat dict of GFLOPs per image
(``vit_b16``, ``concatplexer_1`` ... ``concatplexer_4``, ``image_multiplexer_n2``,
``image_multiplexer_n4``), and with ``--speed`` also ``speedup_concatplexer_<i>``,
``flops_ratio_concatplexer_<i>`` and ``images_per_second_<model>``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import mux
from mux.models.concatplexer import TABLE1

__all__ = ["PAPER_TABLE3", "ROWS", "base_config", "build", "describe", "gflops_per_image", "flops_table",
           "print_flops", "measure_speed", "main"]

#: Table 3 of the ConcatPlexer paper: GFLOPs per image (fvcore, multiply-adds).
PAPER_TABLE3 = {"vit_b16": 17.58, "concatplexer_1": 9.81, "concatplexer_2": 11.26, "concatplexer_3": 13.45,
                "concatplexer_4": 5.81}


def base_config(image_size: int = 224, num_classes: int = 1000) -> mux.VisionConfig:
    """ViT-B/16's sizes, read from timm."""
    return mux.VisionConfig.from_timm("vit_base_patch16_224", num_classes=num_classes, in_chans=3,
                                      image_size=image_size)


def build(name: str, base: mux.VisionConfig):
    """``(model, N, example input of one tuple)`` for a row of the table (on the current device)."""
    c = base.to_dict()
    if name == "vit_b16":
        return mux.ViTClassifier(base), 1, torch.empty(1, 1, 3, base.image_size, base.image_size)
    if name.startswith("concatplexer_") and name.rsplit("_", 1)[1] in {str(i) for i in TABLE1}:
        n, k = TABLE1[int(name.rsplit("_", 1)[1])]
        model = mux.ConcatPlexerModel(mux.ConcatPlexerConfig(**c, n_mux=n, concat_point=k))
        return model, n, torch.empty(1, n, 3, base.image_size, base.image_size)
    if name.startswith("image_multiplexer_n") and name.rsplit("n", 1)[1].isdigit():
        n = int(name.rsplit("n", 1)[1])
        cfg = mux.ImageMultiplexerConfig(**{**c, "timm_name": None, "patch_size": 8}, n_mux=n, num_codes=8192)
        model = mux.ImageMultiplexerModel.empty(cfg)  # a codebook's size without its centroids: codes come ready
        return model, n, torch.zeros(1, n, cfg.num_patches, dtype=torch.long)  # codes: the lookup costs nothing
    raise ValueError(f"unknown model {name!r}; expected one of {list(ROWS)}")


ROWS = ("vit_b16", "concatplexer_1", "concatplexer_2", "concatplexer_3", "concatplexer_4",
        "image_multiplexer_n2", "image_multiplexer_n4")


def gflops_per_image(name: str, base: mux.VisionConfig) -> float:
    with torch.device("meta"):
        model, n, x = build(name, base)
        return mux.count_macs(model, x)["total"] / n / 1e9


def describe(name: str) -> str:
    if name == "vit_b16":
        return "ViT-B/16"
    if name.startswith("concatplexer_"):
        i = int(name.rsplit("_", 1)[1])
        n, k = TABLE1[i]
        return f"ConcatPlexer({i}) N={n}, k={k}"
    return f"Image Multiplexer N={name.rsplit('n', 1)[1]}, 784 tokens"


def flops_table(image_size: int = 224, num_classes: int = 1000) -> dict[str, float]:
    base = base_config(image_size, num_classes)
    return {name: gflops_per_image(name, base) for name in ROWS}


def print_flops(flops: dict[str, float]) -> None:
    print(f"{'model':36s} {'GFLOPs/image':>13s} {'paper':>7s} {'diff':>7s}")
    for name, value in flops.items():
        paper = PAPER_TABLE3.get(name)
        tail = f"{paper:7.2f} {100 * (value / paper - 1):+6.2f}%" if paper else f"{'-':>7s} {'':>7s}"
        print(f"{describe(name):36s} {value:13.2f} {tail}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_speed(flops: dict[str, float], batch: int, trials: int, min_run_time: float, image_size: int,
                  num_classes: int, device: str = "cpu", dtype: str = "fp32") -> dict[str, float]:
    base = base_config(image_size, num_classes)
    torch.manual_seed(0)
    names = [n for n in ROWS if not n.startswith("image_multiplexer")]
    models = {}
    for name in names:
        model, n, _ = build(name, base)
        models[name] = (model.to(device, DTYPES[dtype]), n)
    example = torch.empty(3, image_size, image_size, dtype=DTYPES[dtype])
    print(f"\nspeed: {batch} images per forward, {dtype}, on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else f" ({torch.get_num_threads()} threads)"))
    results = mux.measure_throughput(models, example, instances=batch, trials=trials, min_run_time=min_run_time)
    out = {}
    print(f"\n{'model':36s} {'images/s':>9s} {'spread':>7s} {'speed-up':>9s} {'by FLOPs':>9s} {'ratio':>6s}")
    for name in names:
        r = results[name]
        speedup = r["instances_per_second"] / results["vit_b16"]["instances_per_second"]
        predicted = flops["vit_b16"] / flops[name]
        out[f"images_per_second_{name}"] = r["instances_per_second"]
        if name != "vit_b16":
            out[f"speedup_{name}"], out[f"flops_ratio_{name}"] = speedup, predicted
        print(f"{describe(name):36s} {r['instances_per_second']:9.2f} {r['spread']:7.2f} {speedup:9.2f} "
              f"{predicted:9.2f} {speedup / predicted:6.2f}")
    if max(r["spread"] for r in results.values()) > 0.1:
        print("warning: a spread above 0.1: the machine was busy; measure again before comparing")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the flat dict of results here")
    parser.add_argument("--speed", action="store_true", help="also measure images/s against ViT-B/16")
    parser.add_argument("--batch", type=int, default=16, help="images per forward call (--speed)")
    parser.add_argument("--trials", type=int, default=3, help="timed trials per model (--speed)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per trial, about (--speed)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where --speed runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of --speed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flops = flops_table(args.image_size, args.num_classes)
    print_flops(flops)
    result = dict(flops)
    if args.speed:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is visible here")
        result.update(measure_speed(flops, args.batch, args.trials, args.min_run_time, args.image_size,
                                    args.num_classes, args.device, args.dtype))
        result.update(speed_device=args.device, speed_dtype=args.dtype, speed_batch=args.batch)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
