"""Evaluation that counts every example, for any N and any dataset size.

**Grouping policy.** Examples are grouped into tuples of N through a fixed permutation of
the dataset drawn from ``order_seed`` (default 0), not in dataset order: many datasets are
sorted by class (``ImageFolder``, ImageNet's validation set), and tuples of consecutive
examples would then hold N examples of one class, which flatters a multiplexed model.
The last, incomplete tuple is completed with copies of the first examples of that order,
whose outputs are dropped; so every tuple, and every output, is the same whatever the
evaluation ``batch_size``. The outputs
are put back in dataset order, so the result is exactly one prediction per example, in
dataset order, whatever the permutation. ``order_seed=None`` groups in dataset order.

**Batches.** A dataset yields ``(x, label)`` pairs, or dicts of tensors with a ``labels``
key (text, batched by a ``collate_fn`` such as ``transformers.DataCollatorWithPadding``);
the dict minus ``labels`` is passed to the model as keyword arguments. The model returns
logits ``(B, N, C)`` (one label per example) or ``(B, N, L, C)`` (one per token), or a dict /
dataclass with a ``logits`` entry. Token-level outputs of different lengths are padded to
the longest, with label ``-100`` (ignored) in the padding, as ``transformers`` does.

**Ensembling** (MUX-PLMs, appendix E.1): ``ensemble=K`` runs the whole evaluation K times,
each time grouping through another seeded permutation, so every example is seen K times,
each time beside other companions and in another instance slot; the outputs are put back
in dataset order (un-permuted) and their logits averaged. It costs K passes: at K = N it
gives back the whole throughput gain of multiplexing, for accuracy.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .env import device_of
from .grouping import IGNORE_INDEX, check_n, logits_of, multiplexed_forward, split_batch

__all__ = ["evaluation_order", "predict_logits", "predict", "evaluate"]

def _to(inputs, device: torch.device, dtype: torch.dtype):
    """Move inputs to the model's device; floating inputs also take the model's dtype (e.g. bf16)."""

    def one(t):
        if not isinstance(t, Tensor):
            return t
        return t.to(device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return {k: one(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else one(inputs)


def _cat_padded(parts: list[Tensor], value: float) -> Tensor:
    """Concatenate along dim 0, padding dim 1 (tokens) to the longest part when they differ."""
    if parts[0].dim() < 2 or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts)
    longest = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        extra = p.new_full((p.shape[0], longest - p.shape[1], *p.shape[2:]), value)
        padded.append(torch.cat([p, extra], dim=1))
    return torch.cat(padded)


def evaluation_order(size: int, order_seed: int | None) -> Tensor:
    """The permutation through which ``size`` examples are grouped into tuples."""
    if order_seed is None:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(int(order_seed)))


def _ensemble_seed(order_seed: int | None, k: int) -> int | None:
    """The permutation seed of ensemble pass k: pass 0 is the plain evaluation's (dataset order for None)."""
    if k == 0:
        return order_seed
    base = 0 if order_seed is None else int(order_seed)
    return int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(base * 1009 + k)))


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset, n: int, batch_size: int = 256, device=None,
                   collate_fn=None, order_seed: int | None = 0, ensemble: int = 1) -> tuple[Tensor, Tensor]:
    """Return ``(logits, labels)`` for all M examples of ``data``, in dataset order.

    ``logits`` is ``(M, C)`` and ``labels`` ``(M,)`` for one label per example; for one
    label per token, ``(M, L, C)`` and ``(M, L)`` with ``L`` the longest sequence and
    ``IGNORE_INDEX`` in the padding. See the module docstring for the grouping policy and
    for ``ensemble`` (the mean logits of that many differently grouped passes).
    """
    check_n(n)
    check_n(batch_size, name="batch_size")
    check_n(ensemble, name="ensemble (passes to average)")
    if ensemble > 1:
        passes = [_predict_once(model, data, n, batch_size, device, collate_fn, _ensemble_seed(order_seed, k))
                  for k in range(ensemble)]
        width = max(p[0].shape[1] for p in passes) if passes[0][0].dim() > 2 else None
        logits = [_pad_length(p[0], width, 0.0) for p in passes]
        labels = _pad_length(passes[0][1], width, IGNORE_INDEX)
        return torch.stack(logits).mean(dim=0), labels
    return _predict_once(model, data, n, batch_size, device, collate_fn, order_seed)


def _pad_length(t: Tensor, width: int | None, value: float) -> Tensor:
    """Pad dimension 1 (the tokens of a token task) to ``width``; identity when ``width`` is None."""
    if width is None or t.shape[1] == width:
        return t
    pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def _batches(model, data, n, batch_size, device, collate_fn, order_seed):
    """Yield ``(index, logits, labels)`` per batch: the dataset index of each output, on the CPU.

    Examples are grouped through :func:`evaluation_order`; the copies that complete the last tuple
    are dropped here, so every example is yielded exactly once (see the module docstring)."""
    size = len(data)
    if size == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = torch.device(device) if device is not None else device_of(model)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    order = evaluation_order(size, order_seed)
    # the last tuple is completed once, with copies of the first examples of the order, so that
    # every tuple (and every output) is the same whatever the batch size
    padded = torch.cat([order, order[torch.arange((-size) % n) % size]])
    per_batch = max(n, batch_size // n * n)  # whole tuples per batch
    loader = DataLoader(Subset(data, padded.tolist()), batch_size=per_batch, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    start = 0
    try:
        for batch in loader:
            inputs, y = split_batch(batch)
            out = logits_of(multiplexed_forward(model, _to(inputs, device, dtype), n)).float().cpu()
            y = torch.as_tensor(y).cpu()
            keep = min(len(out), size - start)  # the copies sit at the very end of the order
            if len(out) != len(y):
                raise RuntimeError(f"the model gave {len(out)} outputs for a batch of {len(y)} examples")
            if keep > 0:
                yield order[start:start + keep], out[:keep], y[:keep]
            start += len(out)
    finally:
        model.train(was_training)
    if start != len(padded):
        raise RuntimeError(f"evaluation produced {start} outputs for {len(padded)} grouped examples")


def _predict_once(model, data, n, batch_size, device, collate_fn, order_seed):
    index, logits, labels = [], [], []
    for i, out, y in _batches(model, data, n, batch_size, device, collate_fn, order_seed):
        index.append(i)
        logits.append(out)
        labels.append(y)
    index = torch.cat(index)
    logits, labels = _cat_padded(logits, 0.0), _cat_padded(labels, IGNORE_INDEX)
    back = torch.empty_like(index)
    back[index] = torch.arange(len(index))
    return logits[back], labels[back]


def predict(model: nn.Module, data: Dataset, n: int, batch_size: int = 256, device=None, collate_fn=None,
            order_seed: int | None = 0, ensemble: int = 1) -> Tensor:
    """Predicted class of every example (or token) of ``data``, in dataset order."""
    logits, _ = predict_logits(model, data, n, batch_size, device, collate_fn, order_seed, ensemble)
    return logits.argmax(dim=-1)


def evaluate(model: nn.Module, data: Dataset, n: int, batch_size: int = 256, device=None, collate_fn=None,
             order_seed: int | None = 0, ensemble: int = 1, per_item: bool = False) -> dict:
    """Accuracy and cross-entropy over every example: ``{"accuracy", "loss", "n_examples"}``.

    For token-level tasks both are over the labelled tokens (label != ``IGNORE_INDEX``),
    whose number is added as ``n_scored``. For a regression (floating-point labels, logits
    ``(M, 1)``): ``{"mse", "n_examples"}``. ``ensemble``: see the module docstring.

    ``per_item=True`` adds ``"per_item"``: a float array, in dataset order, of each example's
    accuracy (1 or 0; for a token task the share of its labelled tokens predicted right, NaN
    where it has none), what :func:`mux.stats.paired_difference` compares between two models.

    The sums are taken batch by batch, so memory does not grow with the dataset (a held-out MLM
    set of 1000 x 128 tokens over a 30,522-word vocabulary would need 15.6 GB of logits);
    with ``ensemble > 1`` the passes' logits are kept, to be averaged.
    """
    check_n(ensemble, name="ensemble (passes to average)")
    if ensemble > 1:
        logits, labels = predict_logits(model, data, n, batch_size, device, collate_fn, order_seed, ensemble)
        parts = [(torch.arange(len(labels)), logits, labels)]
    else:
        check_n(n)
        check_n(batch_size, name="batch_size")
        parts = _batches(model, data, n, batch_size, device, collate_fn, order_seed)
    total = _Sums(len(data), per_item)
    for index, logits, labels in parts:
        total.add(index, logits, labels)
    return total.result()


class _Sums:
    """Running sums of :func:`evaluate`: right answers, cross-entropy (or squared error), counts."""

    def __init__(self, size: int, per_item: bool):
        self.size, self.right, self.loss, self.scored, self.examples = size, 0, 0.0, 0, 0
        self.token_level, self.regression = False, False
        self.items = torch.full((size,), float("nan")) if per_item else None

    def add(self, index: Tensor, logits: Tensor, labels: Tensor) -> None:
        self.examples += len(labels)
        if labels.is_floating_point():
            self.regression = True
            self.loss += nn.functional.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum").item()
            return
        if logits.dim() != labels.dim() + 1:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
        self.token_level = labels.dim() > 1
        scored = labels != IGNORE_INDEX
        hit = (logits.argmax(-1) == labels) & scored
        self.right += int(hit.sum())
        self.scored += int(scored.sum())
        if scored.any():
            self.loss += nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
        if self.items is not None:
            dims = tuple(range(1, labels.dim()))
            counted = scored.sum(dims) if dims else scored.long()
            got = hit.sum(dims) if dims else hit.long()
            self.items[index] = torch.where(counted > 0, got / counted.clamp(min=1), torch.tensor(float("nan")))

    def result(self) -> dict:
        if self.examples != self.size:
            raise RuntimeError(f"evaluation produced {self.examples} outputs for {self.size} examples")
        if self.regression:
            return {"mse": self.loss / self.examples, "n_examples": self.examples}
        if self.scored == 0:
            raise ValueError("no example has a label to score (every label is IGNORE_INDEX)")
        result = {"accuracy": self.right / self.scored, "loss": self.loss / self.scored, "n_examples": self.examples}
        if self.token_level:
            result["n_scored"] = self.scored
        if self.items is not None:
            result["per_item"] = self.items.numpy()
        return result
