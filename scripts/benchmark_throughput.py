"""Measure multiplexed Transformers' inference throughput against a vanilla BERT of the same size, in one run.

    .venv/bin/python scripts/benchmark_throughput.py            # a GPU: BERT-base, N = 1 2 5 10 20 40
    .venv/bin/python scripts/benchmark_throughput.py --layers 2 --hidden-size 128 --heads 2 --seq-len 64   # a CPU

The models (``--model``, one or several, all in the same run):

- ``rsa``: MUX-PLMs (chapter 03), Gaussian-Hadamard multiplexer and RSA demultiplexer
  (:class:`mux.MUXPLMModel`): no prefix, the sentence head demultiplexes position 0 only;
- ``tmux``: T-MUX (chapter 02, :class:`mux.TMUXModel`): an index prefix of N tokens;
- ``contextual``: MUX-PLMs with the contextual multiplexer (two more Transformer layers,
  one over every instance's tokens, one across the N instances at each position) and the
  RSA demultiplexer.

For every model and every N of ``--n`` a sentence classifier (3 labels, as for MNLI) is
built, and beside them the non-multiplexed baseline of the same size (``vanilla=True``,
N = 1): plain BERT with no prefix, no multiplexer and no demultiplexer. All of them are
timed in the same run by :func:`mux.measure_throughput` (untimed warm-up calls,
then several trials with all models interleaved in a seeded shuffled order; the median of
the trials and their spread, (max - min) / median) and compared with
:func:`mux.throughput_ratios`: "vs vanilla" is how many times more instances per second
than the vanilla model.

What is measured, and what is not
---------------------------------
Measured: the forward pass only, in ``eval()`` mode under ``torch.inference_mode()``, of a
batch of integer token ids already on the device (one random sequence of ``--seq-len``
token ids, drawn from ``--seed``, copied to every instance; every token is real, so there
is no padding), in ``--precision``. Not measured: tokenization, data loading, the transfer
to the device, the loss, the backward pass, accuracy (the weights are untrained). T-MUX
puts N index tokens in front of every sequence, so its backbone sees ``seq-len + N``
tokens per sequence, the vanilla model and the RSA models ``seq-len``; the table shows it.

Batch convention
----------------
MUX-PLMs (Murahari et al., 2023) report throughput at "batch size 128" without saying
whether that counts sequences or instances; the follow-up PruMUX feeds 128 x N instances
per batch, i.e. 128 multiplexed sequences. The default, ``--batch 128 --batch-unit
sequences``, follows PruMUX: every model runs 128 sequences per forward, which are 128 x N
instances for the model with N and 128 for the vanilla model. With ``--batch-unit
instances`` every model gets the same number of instances per forward, ``--batch``, in
``ceil(batch / N)`` multiplexed sequences (the last one padded with copies, whose outputs
are computed but not counted).

On a CPU
--------
The defaults are BERT-base (12 layers, hidden size 768, 12 heads, sequence length 128);
on a CPU one forward of 128 sequences of that size takes tens of seconds, and every model is
called several times per trial (warm-up, the Timer's own untimed calls, the timed calls),
so a full run of N = 1 ... 40 takes hours there and needs many GB of memory at N = 40
(T-MUX embeds every instance before the mean). On a CPU use small flags, e.g.
``--layers 2 --hidden-size 128 --heads 2 --seq-len 64``. Timings depend on the machine and
its load: a spread above 0.1 prints a warning (measure again before comparing).

Output: a table on stdout and a JSON file (``--out``, default ``runs/throughput/throughput.json``)
with the configuration, the convention, the environment, every result, and the headline
ratios as flat keys ``throughput_ratio_<model>_n<N>`` (e.g. ``throughput_ratio_rsa_n10``).
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import mux

SPREAD_WARNING = 0.1  # a spread above this: the machine was busy
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_tmux(args: argparse.Namespace, n: int, vanilla: bool = False) -> tuple[nn.Module, int]:
    """A T-MUX sentence classifier with N = ``n`` (or, ``vanilla=True``, the plain BERT of the
    same size) and the number of tokens its backbone sees per sequence (``seq-len + N`` for
    T-MUX: the index prefix; ``seq-len`` for the vanilla model)."""
    config = mux.TMUXConfig(
        vocab_size=args.vocab_size, n_mux=n, task="sentence", num_labels=args.num_labels,
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        intermediate_size=args.intermediate_size, max_length=args.seq_len, dropout=0.0,
        multiplexer=args.multiplexer, mux_seed=args.seed, special_token_ids=(), vanilla=vanilla)
    return mux.TMUXModel(config), args.seq_len + config.prefix_length


def build_rsa(args: argparse.Namespace, n: int, vanilla: bool = False, multiplexer: str | None = None
              ) -> tuple[nn.Module, int]:
    """A MUX-PLM sentence classifier (RSA demultiplexer, no prefix) with N = ``n``, or the
    plain BERT of the same size (``vanilla=True``); its backbone sees ``seq-len`` tokens."""
    config = mux.MUXPLMConfig(
        vocab_size=args.vocab_size, n_mux=n, task="sentence", num_labels=args.num_labels,
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        intermediate_size=args.intermediate_size, max_length=args.seq_len, dropout=0.0,
        multiplexer=multiplexer or args.multiplexer, mux_seed=args.seed, special_token_ids=(), vanilla=vanilla)
    return mux.MUXPLMModel(config), args.seq_len


def build_contextual(args: argparse.Namespace, n: int, vanilla: bool = False) -> tuple[nn.Module, int]:
    """:func:`build_rsa` with the contextual multiplexer (``--multiplexer`` is not used)."""
    return build_rsa(args, n, vanilla, multiplexer="contextual")


# The models this script can time, by --model name: builder(args, n, vanilla=False) ->
# (model taking (B, N, L) token ids, tokens its backbone sees per sequence); the first
# model's builder(args, 1, vanilla=True) is the baseline (plain BERT for every builder).
MODELS = {"rsa": build_rsa, "tmux": build_tmux, "contextual": build_contextual}


def _int_at_least(minimum: int, what: str):
    """An argparse ``type``: an integer >= ``minimum``, refused with a message naming ``what``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {minimum}, got {text!r}") from None
        try:
            return mux.check_n(value, what, minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"min-run-time must be a number of seconds > 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", default=["rsa", "tmux"], choices=sorted(MODELS),
                   help="which multiplexed models to time (each at every N, beside one vanilla model)")
    p.add_argument("--n", type=_int_at_least(1, "N"), nargs="+", default=[1, 2, 5, 10, 20, 40],
                   help="the values of N (instances per multiplexed sequence)")
    p.add_argument("--layers", type=_int_at_least(1, "layers"), default=12)
    p.add_argument("--hidden-size", type=_int_at_least(1, "hidden-size"), default=768)
    p.add_argument("--heads", type=_int_at_least(1, "heads"), default=12)
    p.add_argument("--intermediate-size", type=_int_at_least(0, "intermediate-size"), default=0,
                   help="feed-forward width (0: 4 x hidden-size, 3072 for BERT-base)")
    p.add_argument("--vocab-size", type=_int_at_least(1, "vocab-size"), default=30522)
    p.add_argument("--seq-len", type=_int_at_least(1, "seq-len"), default=128,
                   help="tokens per instance (T-MUX's backbone sees N more: the index prefix)")
    p.add_argument("--num-labels", type=_int_at_least(2, "num-labels"), default=3,
                   help="classes of the sentence classification head (3: MNLI)")
    p.add_argument("--multiplexer", default="gaussian_hadamard",
                   choices=sorted(k for k in mux.MULTIPLEXERS if k != "contextual"),
                   help="the fixed multiplexer of rsa and tmux (--model contextual is the contextual one)")
    p.add_argument("--batch", type=_int_at_least(1, "batch"), default=128, help="per forward, in --batch-unit")
    p.add_argument("--batch-unit", default="sequences", choices=["sequences", "instances"],
                   help="sequences: every model runs --batch sequences per forward (batch x N instances for "
                        "the N-model, as in PruMUX); instances: every model gets --batch instances")
    p.add_argument("--trials", type=_int_at_least(1, "trials"), default=5, help="timed trials per model, interleaved")
    p.add_argument("--warmup", type=_int_at_least(0, "warmup"), default=1, help="untimed forwards per model first")
    p.add_argument("--min-run-time", type=_positive_seconds, default=0.2,
                   help="about how many seconds one trial lasts (at least one forward)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the token ids and the trial order")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", *DTYPES],
                   help="auto: fp32 on a CPU, bf16 on a GPU with native bf16, else fp16")
    p.add_argument("--out", default="runs/throughput/throughput.json", help="the JSON file of the results")
    return p


def _cpu_has_native(precision: str) -> bool:
    """Whether this CPU computes ``precision`` natively (oneDNN: AVX512-BF16/AMX, AVX512-FP16)."""
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(p: argparse.ArgumentParser, requested: str, device: torch.device) -> str:
    """The precision to run in: ``requested``, or for ``auto`` fp32 on a CPU (and MPS), bf16 on
    a GPU with native bf16, else fp16. Refuses (argparse error) a precision the device would
    only emulate: that would time the emulation, not the precision."""
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if mux.env.cuda_has_native_bf16() else "fp16"
        if requested == "bf16" and not mux.env.cuda_has_native_bf16():
            p.error(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no native bf16; "
                    "use --precision fp16 or auto")
        return requested
    if requested == "auto":
        return "fp32"
    if device.type == "cpu" and requested != "fp32" and not _cpu_has_native(requested):
        p.error(f"--precision {requested}: this CPU has no native {requested} support (it would be emulated, "
                "slower than fp32, and the timing would say nothing about the precision); use --precision fp32 or auto")
    return requested


def convention_text(batch: int, unit: str) -> str:
    if unit == "sequences":
        return (f"{batch} sequences per forward for every model (PruMUX's reading of MUX-PLMs' 'batch size 128'): "
                f"the model with N runs {batch} multiplexed sequences = {batch} x N instances, "
                f"the vanilla model {batch} instances")
    return (f"{batch} instances per forward for every model: the model with N runs ceil({batch} / N) multiplexed "
            "sequences (the last one padded with copies, computed but not counted)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, precision: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name() if device.type == "cpu" else ""
    return {"device": str(device), "device_name": name, "precision": precision, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def table(rows: list[dict]) -> str:
    head = ("model", "N", "instances/forward", "sequences/forward", "backbone tokens", "instances/s", "spread",
            "vs vanilla")
    lines = [(r["name"], str(r["n"]), str(r["instances"]), str(r["sequences"]), str(r["backbone_tokens"]),
              f"{r['instances_per_second']:,.1f}", f"{r['spread']:.3f}", f"{r['ratio']:.2f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    ns = list(dict.fromkeys(args.n))  # each N once, in the order given
    if args.hidden_size % args.heads:
        p.error(f"--hidden-size ({args.hidden_size}) must be a multiple of --heads ({args.heads})")
    if not args.out.endswith(".json"):
        p.error(f"--out must name a .json file, got {args.out!r}")
    try:
        device = mux.pick_device(args.device)
    except ValueError as e:
        p.error(f"--device {args.device}: {e}")
    precision = resolve_precision(p, args.precision, device)
    dtype = DTYPES[precision]
    kinds = list(dict.fromkeys(args.model))

    # the baseline first, then one model per kind and N; each from the same seed
    specs = [("vanilla", kinds[0], 1, True)] + [(f"{kind} N={n}", kind, n, False) for kind in kinds for n in ns]
    models, backbone_tokens, kind_of = {}, {}, {}
    started = time.perf_counter()
    print(f"building {len(specs)} models on {device} ({precision}) ...", file=sys.stderr, flush=True)
    for name, kind, n, vanilla in specs:
        mux.seed_everything(args.seed)
        kind_of[name] = "vanilla" if vanilla else kind
        try:
            model, backbone_tokens[name] = MODELS[kind](args, n, vanilla=vanilla)
        except ValueError as e:
            p.error(f"cannot build {name}: {e}")
        models[name] = (model.to(device=device, dtype=dtype).eval(), n)

    g = torch.Generator().manual_seed(args.seed)
    low = 5 if args.vocab_size > 5 else 0  # avoid the special ids 0-4 ([PAD], [UNK], [CLS], [SEP], [MASK])
    example = torch.randint(low, args.vocab_size, (args.seq_len,), generator=g)
    per_sequence = args.batch_unit == "sequences"
    counts = {name: args.batch * n if per_sequence else args.batch for name, (_, n) in models.items()}

    print(f"measuring: {args.warmup} warm-up call(s), then {args.trials} trial(s) of about {args.min_run_time} s "
          f"per model, {len(models)} models interleaved ...", file=sys.stderr, flush=True)
    results = mux.measure_throughput(models, example, instances=counts, trials=args.trials, warmup=args.warmup,
                                     min_run_time=args.min_run_time, seed=args.seed)
    ratios = mux.throughput_ratios(results, "vanilla")
    seconds = time.perf_counter() - started

    rows = [{"name": name, "model": kind_of[name], "vanilla": name == "vanilla",
             "n": r["n"], "instances": r["instances"], "sequences": r["tuples"],
             "backbone_tokens": backbone_tokens[name], "instances_per_second": r["instances_per_second"],
             "spread": r["spread"], "trials": r["trials"], "repeats": r["repeats"], "ratio": ratios[name]}
            for name, r in results.items()]
    env = environment(device, precision)
    convention = convention_text(args.batch, args.batch_unit)
    busy = [r for r in rows if r["spread"] > SPREAD_WARNING]
    headline = {f"throughput_ratio_{r['model']}_n{r['n']}": r["ratio"] for r in rows if not r["vanilla"]}
    report = {
        **headline,
        "model": kinds,
        "config": {"layers": args.layers, "hidden_size": args.hidden_size, "heads": args.heads,
                   "intermediate_size": args.intermediate_size or 4 * args.hidden_size, "vocab_size": args.vocab_size,
                   "seq_len": args.seq_len, "num_labels": args.num_labels, "task": "sentence",
                   "multiplexer": args.multiplexer, "n": ns},
        "measurement": {"trials": args.trials, "warmup": args.warmup, "min_run_time": args.min_run_time,
                        "seed": args.seed, "forward_only": True, "seconds": seconds},
        "convention": {"batch": args.batch, "batch_unit": args.batch_unit, "text": convention},
        "environment": {**env, "requested_device": args.device, "requested_precision": args.precision},
        "results": rows,
        "busy": bool(busy),
        "args": vars(args),
    }
    out = Path(args.out)
    path = mux.write_metrics(out.parent, out.stem, report)

    print(table(rows))
    print(f"batch convention: {convention}")
    print(f"device: {env['device']} ({env['device_name']}), precision: {precision}, torch {env['torch']}, "
          f"threads: {env['threads']}; forward only (no tokenization, data loading or transfer); "
          f"{seconds:.0f} s in all -> {path}")
    if busy:
        print("warning: spread above " f"{SPREAD_WARNING} for " + ", ".join(f"{r['name']} ({r['spread']:.2f})" for r in busy)
              + ": the machine was busy; measure again before comparing", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
