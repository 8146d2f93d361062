"""Train and evaluate one DataMUX image classifier from the command line.

The notebook 01_datamux.ipynb teaches the model; this script runs the same package code as a
plain program, which is what a cluster job wants. One process, or several:

    .venv/bin/python scripts/train_datamux.py --dataset mnist --n-mux 4 --steps 5000 --out runs/mnist_n4
    .venv/bin/accelerate launch --num_processes 4 scripts/train_datamux.py --dataset mnist --n-mux 4 ...
    .venv/bin/torchrun --nproc_per_node 2 scripts/train_datamux.py --cpu ...   # two CPU processes (gloo)

Under several processes each one trains on its shard of every step's batch (``--batch-size``
is per process) and the main process evaluates and writes ``<out>/metrics.json``. Run the
same command again after an interruption: training resumes from ``<out>/checkpoints``.
"""
from __future__ import annotations

import argparse
import os
import sys

import mux
from data_utils import IMAGE_DATASETS, load_image_dataset


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=IMAGE_DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--backbone", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--multiplexer", default="orthogonal", choices=sorted(mux.MULTIPLEXERS))
    p.add_argument("--n-mux", type=int, default=2)
    p.add_argument("--vanilla", action="store_true", help="the non-multiplexed baseline: no multiplexer, no "
                   "demultiplexer (needs --n-mux 1)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (weight matrices only)")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: none)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-exact resume on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--out", required=True, help="folder for checkpoints/ and metrics.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    data = load_image_dataset(args.dataset, args.data_dir, seed=args.seed)
    model = mux.DataMUXClassifier.for_data(data, args.n_mux, seed=args.seed, backbone=args.backbone,
                                           multiplexer=args.multiplexer, width=args.width, depth=args.depth,
                                           vanilla=args.vanilla)
    cfg = mux.TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, cpu=args.cpu,
        weight_decay=args.weight_decay, grad_accum_steps=args.grad_accum_steps, max_grad_norm=args.max_grad_norm,
        num_workers=args.num_workers, deterministic=args.deterministic,
        checkpoint_dir=os.path.join(args.out, "checkpoints"), checkpoint_every=args.checkpoint_every,
        description=f"{args.backbone} N={args.n_mux}")
    result = mux.train(model, data.train, cfg, args.n_mux)
    if result.is_main_process:
        metrics = {"test": mux.evaluate(result.model, data.test, args.n_mux),
                   "val": mux.evaluate(result.model, data.val, args.n_mux) if len(data.val) else None,
                   "steps": result.steps, "resumed_from": result.resumed_from, "processes": result.num_processes,
                   "args": vars(args)}
        path = mux.write_metrics(args.out, "metrics", metrics)
        print(f"test accuracy {metrics['test']['accuracy']:.4f} on {metrics['test']['n_examples']} examples -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
