"""The training data: a seeded new order every epoch, whole tuples of N per batch, exact resume.

The order of epoch ``e`` is a permutation drawn from a seed derived from ``(seed, e)`` with
NumPy's ``SeedSequence`` (so seed 0 / epoch 1 and seed 1 / epoch 0 differ); a resumed run
skips the batches its epoch already used. Data-loader workers take their seeds from a
generator reseeded per epoch, never from the global RNG.
"""
from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from .config import TrainConfig

__all__ = ["epoch_seed", "EpochShuffleSampler", "build_loader", "micro_batches"]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for ``(seed, epoch, stream)``: distinct triples give unrelated seeds."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """A new random order of ``size`` indices every epoch, fixed by ``(seed, epoch)``.

    Every process draws the same order (Accelerate then gives each one its share of every
    step's batches); :meth:`set_epoch` selects the epoch.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = int(size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def build_loader(data, cfg: TrainConfig, n: int, collate_fn) -> tuple[DataLoader, EpochShuffleSampler, torch.Generator]:
    """The training DataLoader: seeded shuffling per epoch, whole tuples per batch.

    ``data`` is a dataset of instances, or a DataLoader that brings its dataset, ``batch_size``
    (a multiple of N), ``collate_fn`` and workers; its sampler is replaced by the seeded one
    (exact resume needs it)."""
    if isinstance(data, DataLoader):
        loader = data
        if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or \
                type(loader.batch_sampler) is not BatchSampler:
            raise ValueError("train() replaces the DataLoader's sampler by its seeded shuffle; a DataLoader with a "
                             "custom sampler or batch_sampler is not supported (pass the dataset and collate_fn)")
        if loader.batch_size is None or loader.batch_size % n:
            raise ValueError(f"the DataLoader's batch_size ({loader.batch_size}) must be a multiple of N={n}: "
                             "a batch holds whole tuples")
        if collate_fn is not None:
            raise ValueError("pass collate_fn either in the DataLoader or to train(), not both")
        dataset, per_batch, collate_fn = loader.dataset, loader.batch_size, loader.collate_fn
        workers, extra = loader.num_workers, dict(pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                                                  persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            extra["prefetch_factor"] = loader.prefetch_factor
    else:
        dataset, per_batch, workers, extra = data, max(n, cfg.batch_size // n * n), cfg.num_workers, {}
    if len(dataset) == 0:
        raise ValueError("train_data is empty")
    sampler = EpochShuffleSampler(len(dataset), cfg.seed)
    generator = torch.Generator()  # worker seeds come from here, not from the global RNG
    loader = DataLoader(dataset, batch_size=per_batch, sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                        generator=generator, **extra)
    return loader, sampler, generator


def micro_batches(accelerator: Accelerator, loader, sampler: EpochShuffleSampler, generator: torch.Generator,
                  seed: int, position: int):
    """Every micro-batch of the prepared ``loader`` from number ``position`` on, across epochs."""
    epoch, skip = divmod(position, len(loader))
    while True:
        sampler.set_epoch(epoch)
        loader.set_epoch(epoch)
        generator.manual_seed(epoch_seed(seed, epoch, stream=1))
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0
