"""Losses: one home for every training objective of the course.

A loss function has the signature ``loss_fn(model, batch, n)`` and returns either one
scalar tensor, or a dict of named scalar tensors whose ``"loss"`` entry is the total that
is minimised (the other entries are logged beside it by :func:`mux.train`, e.g.
``{"loss": ce + retrieval, "ce": ce, "retrieval": retrieval}``).

``batch`` is what the data loader yields: ``(x, labels)`` pairs or a dict of tensors with
a ``labels`` entry (see :mod:`mux.evaluation`); ``n`` is the number of instances per tuple.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .grouping import (IGNORE_INDEX, check_positive, group, logits_of, multiplexed_forward, pad_to_multiple,
                       split_batch, ungroup)
from .multiplexers import tuple_mixup

__all__ = ["classification_loss", "is_soft_target", "cross_entropy_and_accuracy", "retrieval_loss",
           "TaskAndRetrievalLoss", "masked_lm_loss", "replaced_token_loss", "clip_contrastive_loss", "mixed_labels",
           "ConcatPlexerLoss", "MultiInputLoss"]


def is_soft_target(logits: Tensor, labels: Tensor) -> bool:
    """Whether ``labels`` are soft targets for ``logits``: floating-point, of the logits' shape ``(..., C)``
    with C >= 2 (a probability per class, e.g. Mixup/CutMix labels from ``data_utils.MixupCollate``)."""
    return labels.is_floating_point() and logits.shape[-1] >= 2 and tuple(labels.shape) == tuple(logits.shape)


def _soft_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over every position of ``-sum_c labels_c log softmax(logits)_c``; ``(..., C)`` both."""
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(0, -2).float())


def _refuse_misshapen_soft_labels(logits: Tensor, labels: Tensor) -> None:
    """A clear error for floating-point labels ``(..., K)`` beside logits ``(..., C)`` with K != C."""
    if labels.is_floating_point() and labels.dim() == logits.dim() and labels.dim() >= 2 \
            and labels.shape[:-1] == logits.shape[:-1] and labels.shape[-1] != logits.shape[-1]:
        raise ValueError(f"soft labels (probabilities over classes) need logits of their shape: labels "
                         f"{tuple(labels.shape)}, logits {tuple(logits.shape)}; e.g. data_utils.MixupCollate's "
                         "num_classes must be the model's number of classes")


def classification_loss(model: nn.Module, batch, n: int) -> Tensor:
    """Cross-entropy of a multiplexed classifier over the real instances of a batch.

    One label per example (logits ``(M, C)``) or per token (logits ``(M, L, C)``, labels
    ``(M, L)`` with ``IGNORE_INDEX`` where nothing is scored). The copies that pad the last
    tuple of a batch are dropped before the loss, so every example counts once.
    Soft targets (floating-point labels of the logits' shape ``(M, C)`` or ``(M, L, C)``, C >= 2,
    e.g. Mixup/CutMix labels from ``data_utils.MixupCollate``) get the cross-entropy with
    probability targets, averaged over every example (or position: nothing is ignored); a one-hot
    soft target gives the loss of its integer label.
    A regression (floating-point labels ``(M,)``, logits ``(M, 1)``, e.g. STS-B) gets the
    mean squared error instead.
    """
    inputs, labels = split_batch(batch)
    logits = logits_of(multiplexed_forward(model, inputs, n))
    if is_soft_target(logits, labels):
        return _soft_cross_entropy(logits, labels)
    _refuse_misshapen_soft_labels(logits, labels)
    if labels.is_floating_point():
        if logits.shape[-1] != 1 or logits.shape[:-1] != labels.shape:
            raise ValueError(f"a regression (floating-point labels {tuple(labels.shape)}) needs logits of shape "
                             f"{(*labels.shape, 1)} (num_labels=1), got {tuple(logits.shape)}")
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def cross_entropy_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy over the scored positions (label != ``IGNORE_INDEX``).

    ``logits`` ``(..., C)``, ``labels`` ``logits.shape[:-1]``. The accuracy is detached: it is
    logged, not trained on. Soft targets (floating-point labels of the logits' shape, e.g. from
    ``data_utils.MixupCollate``) get the cross-entropy with probability targets over every
    position, and the accuracy counts a prediction right when it is the target's most probable
    class (for a Mixup label, the class with the larger share).
    """
    if is_soft_target(logits, labels):
        accuracy = (logits.detach().argmax(-1) == labels.argmax(-1)).float().mean()
        return _soft_cross_entropy(logits, labels), accuracy
    _refuse_misshapen_soft_labels(logits, labels)
    if labels.is_floating_point():
        raise ValueError(f"floating-point labels {tuple(labels.shape)} here must be soft targets of the logits' "
                         f"shape {tuple(logits.shape)} (a probability per class); class indices must be integers")
    flat_logits, flat_labels = logits.flatten(0, -2).float(), labels.flatten()
    scored = flat_labels != IGNORE_INDEX
    if not bool(scored.any()):
        raise ValueError("no position of this batch has a label to score (every label is IGNORE_INDEX)")
    ce = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    accuracy = (flat_logits[scored].argmax(-1) == flat_labels[scored]).float().mean().detach()
    return ce, accuracy


def _with_retrieval(inputs) -> dict:
    """The model's inputs with ``return_retrieval=True``: a dict batch (text) gains the flag, a
    tensor batch (images, codes) becomes ``{"x": inputs, "return_retrieval": True}``."""
    if isinstance(inputs, Tensor):
        return {"x": inputs, "return_retrieval": True}
    if not isinstance(inputs, Mapping):
        raise TypeError("token retrieval needs tensor or dict batches (input_ids, attention_mask, ...), "
                        f"got {type(inputs).__name__}")
    return {**inputs, "return_retrieval": True}


def retrieval_loss(model: nn.Module, batch, n: int) -> dict[str, Tensor]:
    """T-MUX's token-retrieval warm-up: recover every instance's token at every position.

    The model returns ``retrieval_logits`` ``(M, L, V)`` and ``retrieval_labels`` ``(M, L)``
    (each instance's own token ids, ``IGNORE_INDEX`` on padding and special tokens) when
    called with ``return_retrieval=True`` (:class:`mux.models.TMUXModel`). The loss is the
    cross-entropy over the vocabulary, averaged over every scored token of every instance;
    ``retrieval_acc`` (logged) is the fraction of those tokens retrieved exactly. A
    ``labels`` entry of the batch is not used.

    The authors' code scores, at each position, one instance drawn at random; scoring all N
    gives the same expected gradient with less noise, for a head that is run N times anyway.
    """
    inputs, _ = split_batch(batch) if isinstance(batch, Mapping) and "labels" in batch else (batch, None)
    out = multiplexed_forward(model, _with_retrieval(inputs), n)
    ce, accuracy = cross_entropy_and_accuracy(out["retrieval_logits"], out["retrieval_labels"])
    return {"loss": ce, "retrieval_acc": accuracy}


class TaskAndRetrievalLoss:
    """T-MUX fine-tuning: ``task_weight * task CE + retrieval_weight * retrieval CE``.

    The DataMUX authors fine-tuned with 0.9 and 0.1: the retrieval term keeps the instances
    separable while the task is learned. One forward pass gives both (``return_retrieval=True``).
    Logged terms: ``task``, ``retrieval`` (the two cross-entropies), ``task_acc``, ``retrieval_acc``.
    """

    def __init__(self, task_weight: float = 0.9, retrieval_weight: float = 0.1):
        for name, w in (("task_weight", task_weight), ("retrieval_weight", retrieval_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        self.task_weight, self.retrieval_weight = float(task_weight), float(retrieval_weight)

    def __call__(self, model: nn.Module, batch, n: int) -> dict[str, Tensor]:
        inputs, labels = split_batch(batch)
        out = multiplexed_forward(model, _with_retrieval(inputs), n)
        task, task_acc = cross_entropy_and_accuracy(out["logits"], labels)
        retrieval, retrieval_acc = cross_entropy_and_accuracy(out["retrieval_logits"], out["retrieval_labels"])
        total = self.task_weight * task + self.retrieval_weight * retrieval
        return {"loss": total, "task": task, "retrieval": retrieval, "task_acc": task_acc,
                "retrieval_acc": retrieval_acc}

    def __repr__(self) -> str:  # part of a run's identity in its checkpoints: keep it stable
        return f"TaskAndRetrievalLoss(task_weight={self.task_weight}, retrieval_weight={self.retrieval_weight})"


def masked_lm_loss(model: nn.Module, batch, n: int) -> dict[str, Tensor]:
    """MUX-BERT pre-training: cross-entropy of the original token at every masked position.

    ``batch``: from ``transformers``' ``DataCollatorForLanguageModeling`` (``labels`` ``(M, L)``:
    the original token id at the selected positions, ``IGNORE_INDEX`` elsewhere). The model
    returns logits ``(M, L, V)``: each instance demultiplexed at every position, scored where
    it was masked. Logged: ``mlm_acc``, the share of masked tokens predicted exactly.
    """
    inputs, labels = split_batch(batch)
    ce, accuracy = cross_entropy_and_accuracy(logits_of(multiplexed_forward(model, inputs, n)), labels)
    return {"loss": ce, "mlm_acc": accuracy}


def replaced_token_loss(model: nn.Module, batch, n: int) -> dict[str, Tensor]:
    """MUX-ELECTRA pre-training: replaced-token detection, a binary cross-entropy per token.

    ``batch``: ``labels`` ``(M, L)`` with 1 where the token was replaced, 0 where it is the
    original, ``IGNORE_INDEX`` on padding and special tokens (``data_utils.corpus``'s
    ``ReplacedTokenCollator``). The model returns one logit per token ``(M, L)`` (> 0: replaced).
    The loss averages over every scored token of every instance, as ELECTRA's discriminator
    loss does. Logged: ``rtd_acc`` (tokens classified right) and ``replaced_recall`` (the
    share of replaced tokens found; about 85% of tokens are originals, so accuracy alone
    flatters a detector that never says "replaced").
    """
    inputs, labels = split_batch(batch)
    logits = logits_of(multiplexed_forward(model, inputs, n)).float()
    if logits.shape != labels.shape:
        raise ValueError(f"replaced-token detection needs one logit per token {tuple(labels.shape)}, "
                         f"got {tuple(logits.shape)}")
    scored = labels != IGNORE_INDEX
    if not bool(scored.any()):
        raise ValueError("no position of this batch has a label to score (every label is IGNORE_INDEX)")
    target = labels[scored].float()
    loss = nn.functional.binary_cross_entropy_with_logits(logits[scored], target)
    said = logits[scored].detach() > 0
    accuracy = (said == target.bool()).float().mean()
    replaced = target.bool()
    recall = (said & replaced).float().sum() / replaced.float().sum().clamp(min=1)
    return {"loss": loss, "rtd_acc": accuracy, "replaced_recall": recall}


def clip_contrastive_loss(student: Tensor, teacher: Tensor, temperature: float = 0.07) -> Tensor:
    """ConcatPlexer's CLIP loss (eq. 4): a symmetric contrastive (InfoNCE) loss between the
    student's features ``(M, D)`` and the teacher's ``(M, D)`` for the same M images.

    Both are L2-normalised; ``logits[a, b] = cos(student_a, teacher_b) / temperature``; each
    image's own teacher feature is the right answer among the M of the batch, and each teacher
    feature's own student feature among the M students: the mean of the two cross-entropies,
    as CLIP's loss between images and texts. The paper writes ``Ctrs(CLIP(x), CLS_x)`` without
    more; this is the course's reading, with CLIP's initial temperature 0.07 kept fixed.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"the CLIP loss compares features (M, D) of the same M images: student "
                         f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}; the model's teacher_dim "
                         "must be the teacher's feature size")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = nn.functional.normalize(student.float(), dim=-1)
    t = nn.functional.normalize(teacher.float(), dim=-1)
    logits = s @ t.T / temperature
    target = torch.arange(len(s), device=s.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def mixed_labels(labels: Tensor, n: int, num_classes: int, alpha: float) -> Tensor:
    """The soft labels of eq. 5 for a flat batch of M labels grouped into tuples of N.

    The batch is padded and grouped as :func:`mux.multiplexed_forward` pads and groups it; in
    each tuple, instance i's label becomes ``alpha * onehot(y_i) + (1 - alpha) / (N - 1) *
    sum_{n != i} onehot(y_n)`` (:func:`mux.multiplexers.tuple_mixup`). Returns ``(M, num_classes)``.
    ``labels``: class indices ``(M,)``, or soft labels ``(M, num_classes)`` (e.g. Mixup's), which
    are mixed in place of the one-hot vectors.
    """
    padded, m = pad_to_multiple(labels, n)
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[-1] != num_classes:
            raise ValueError(f"soft labels must be (M, num_classes={num_classes}), got {tuple(labels.shape)}")
        onehot = padded.float()
    else:
        onehot = nn.functional.one_hot(padded, num_classes).float()
    return ungroup(tuple_mixup(group(onehot, n), alpha))[:m]


class ConcatPlexerLoss:
    """ConcatPlexer's training loss (section 3.3): ``ce + clip_weight * clip + smoothing_weight * smooth``.

    - ``ce``: cross-entropy of each image's demultiplexed prediction against its label.
    - ``clip`` (eq. 4, :func:`clip_contrastive_loss`): the demultiplexed CLS, through the
      model's feature head, against a frozen ``teacher`` 's features of the same image
      (a :class:`mux.models.concatplexer.FeatureTeacher`).
    - ``smooth`` (eq. 5): the prediction from the tuple-mixed tokens
      (``smoothing_alpha`` of an image's own tokens, the rest shared by the other N - 1)
      against the labels mixed with the same weights (:func:`mixed_labels`), a cross-entropy
      with probability targets. Needs N >= 2.

    Soft labels ``(M, C)`` (Mixup/CutMix from ``data_utils.MixupCollate``) are accepted: ``ce``
    is then the soft-target cross-entropy (``acc`` against each label's most probable class), and
    the smoothing term mixes the soft labels within each tuple as it mixes one-hot ones. The teacher
    of the CLIP term sees the same (mixed) images as the student.

    Our reading of eq. 5. The extracted equation shows ``M_i`` (a mix of the N images'
    high-level tokens T_n with weight alpha on T_i and (1 - alpha)/(N - 1) on each other) and
    ``M_i^GT`` (the same mix of the one-hot labels Y_n), then ``CE(M_i, M_i^GT)``. A
    cross-entropy between tokens and labels is not defined, so we read ``CE(M_i, M_i^GT)`` as
    the cross-entropy between the model's prediction for slot i when its input is M_i and
    the soft label M_i^GT: a mixup within the tuple. The paper lists three loss terms
    (classification, CLIP, smoothing), so the mixed pass is an extra term beside the clean
    one, not a replacement: the model runs from the C-Multiplexer on twice (the patchifier
    once). The paper gives no weights, alpha or temperature; the defaults here are the
    course's: weights 1 when a term is on, alpha = 0.8, temperature 0.07.
    """

    def __init__(self, clip_weight: float = 0.0, smoothing_weight: float = 0.0, smoothing_alpha: float = 0.8,
                 teacher: nn.Module | None = None, temperature: float = 0.07):
        for name, w in (("clip_weight", clip_weight), ("smoothing_weight", smoothing_weight),
                        ("temperature", temperature)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if not 0 <= smoothing_alpha <= 1:
            raise ValueError(f"smoothing_alpha (the weight an image keeps of its own tokens) must be in [0, 1], "
                             f"got {smoothing_alpha!r}")
        if clip_weight > 0 and teacher is None:
            raise ValueError("clip_weight > 0 needs a teacher (mux.models.FeatureTeacher.from_clip or .from_vit)")
        if temperature == 0:
            raise ValueError("temperature must be > 0, got 0")
        self.clip_weight, self.smoothing_weight = float(clip_weight), float(smoothing_weight)
        self.smoothing_alpha, self.temperature, self.teacher = float(smoothing_alpha), float(temperature), teacher

    def __call__(self, model: nn.Module, batch, n: int) -> dict[str, Tensor]:
        images, labels = split_batch(batch)
        inputs = {"x": images, "return_features": self.clip_weight > 0,
                  "smoothing_alpha": self.smoothing_alpha if self.smoothing_weight > 0 else None}
        out = multiplexed_forward(model, inputs, n)
        ce, accuracy = cross_entropy_and_accuracy(logits_of(out), labels)
        terms = {"ce": ce, "acc": accuracy}
        total = ce
        if self.clip_weight > 0:
            self.teacher.to(images.device)
            target = self.teacher(images)
            if target.shape[-1] != out["features"].shape[-1]:
                raise ValueError(f"the teacher {getattr(self.teacher, 'name', '')!r} gives {target.shape[-1]} features, "
                                 f"the model's feature head {out['features'].shape[-1]}: build the model with "
                                 f"teacher_dim={target.shape[-1]}")
            terms["clip"] = clip_contrastive_loss(out["features"], target, self.temperature)
            total = total + self.clip_weight * terms["clip"]
        if self.smoothing_weight > 0:
            soft = mixed_labels(labels, n, out["smooth_logits"].shape[-1], self.smoothing_alpha)
            terms["smooth"] = nn.functional.cross_entropy(out["smooth_logits"].float(), soft)
            total = total + self.smoothing_weight * terms["smooth"]
        return {"loss": total, **terms}

    def __repr__(self) -> str:  # part of a run's identity in its checkpoints: keep it stable
        teacher = getattr(self.teacher, "name", None) if self.teacher is not None else None
        return (f"ConcatPlexerLoss(clip_weight={self.clip_weight}, smoothing_weight={self.smoothing_weight}, "
                f"smoothing_alpha={self.smoothing_alpha}, teacher={teacher!r}, temperature={self.temperature})")


class MultiInputLoss:
    """Training loss of the multi-input multi-output models (chapter 05): MixViT, MIMO, MixMo.

    Train with ``n=1``: every image of the batch is the first input of one mixed example, and
    the other M - 1 inputs are the same batch in a random order each ("batch repetition" 1 of
    MixMo): a step costs B passes, as the single-input model's, and every image reaches every
    subnetwork once per epoch. Each example's M inputs are mixed by the model from the mask
    drawn here, and the loss is ``sum_i w_i * CE(y_i, p_i)``, averaged over the batch:

    - ``mixing="token_cutmix"`` (MixViT, eq. 1): CutMix masks voted per patch
      (:func:`mux.multiplexers.cutmix_sources`, ``alpha`` default 0.5 as the paper's);
      ``w_i`` = the share of the tokens taken from input i. Over the last ``final_fraction``
      of training the probability of taking every token from one input grows linearly from 0
      to 1 (appendix H, inherited from MixMo), so training ends on what inference sees.
    - ``mixing="sum"`` (MIMO): the M encodings summed, ``w_i = 1``.
    - ``mixing="mixmo"`` (MixMo): per example, with probability ``cut_prob`` (0.5, falling
      linearly to 0 over the last ``final_fraction``) a CutMix box on the token grid (weights 2
      inside the box for one input, 2 outside for the other), else the linear mix with weights
      ``2 lambda`` and ``2 (1 - lambda)``: MixMo multiplies both by its 2 inputs, so the mixture
      has the scale of the sum used at inference. lambda and the branch are drawn per example
      here (MixMo draws lambda per batch); ``lambda ~ Beta(alpha, alpha)``
      (``alpha`` default 2, MixMo's); ``w_i`` = input i's share (root r = 1, as MixViT uses).

    :func:`mux.train` calls :meth:`set_step` before every step, which is how the loss knows
    where training is. Randomness comes from torch's global RNG (seeded, checkpointed and
    restored by ``mux.train``). Logged: ``ce`` (the weighted loss) and ``acc`` (each example
    scored on the input with the largest weight).

    Labels: integer classes, or soft labels ``(B, C)`` from ``data_utils.MixupCollate``. The MixViT
    paper trains every model, MixViT included, with Mixup/CutMix of the training images as DeiT
    does; the inputs a MixViT mixes are then already Mixup images, each with its soft label, and
    each subnetwork's cross-entropy is taken against its own input's soft label (accuracy against
    that label's most probable class).
    """

    MIXINGS = {"token_cutmix": 0.5, "sum": None, "mixmo": 2.0}

    def __init__(self, mixing: str = "token_cutmix", alpha: float | None = None, final_fraction: float = 1 / 12,
                 cut_prob: float = 0.5):

        if mixing not in self.MIXINGS:
            raise ValueError(f"unknown mixing {mixing!r}; expected one of {list(self.MIXINGS)}")
        self.mixing = mixing
        self.alpha = None if mixing == "sum" else check_positive(
            "alpha (of Beta(alpha, alpha))", self.MIXINGS[mixing] if alpha is None else alpha)
        if not 0 <= final_fraction <= 1 or not 0 <= cut_prob <= 1:
            raise ValueError(f"final_fraction and cut_prob must lie in [0, 1], got {final_fraction!r}, {cut_prob!r}")
        self.final_fraction, self.cut_prob, self.progress = float(final_fraction), float(cut_prob), 0.0

    def set_step(self, step: int, max_steps: int) -> None:
        """Called by :func:`mux.train` before each step: ``step`` steps are done, the next is ``step + 1``."""
        self.progress = (step + 1) / max(max_steps, 1)

    def ramp(self) -> float:
        """0 before the last ``final_fraction`` of training, then rising linearly to 1 at its end."""
        if self.final_fraction == 0:
            return 0.0
        return min(max((self.progress - (1 - self.final_fraction)) / self.final_fraction, 0.0), 1.0)

    def mix(self, batch: int, m: int, config) -> tuple[Tensor | None, Tensor]:
        """``(sources, w)``: the model's per-position mixing weights ``(B, M, L)`` and the loss weights ``(B, M)``."""
        from .multiplexers import cutmix_sources

        if self.mixing == "sum":
            return torch.ones(batch, m, (config.image_size // config.patch_size) ** 2), torch.ones(batch, m)
        if self.mixing == "token_cutmix":
            sources = cutmix_sources(batch, m, config.image_size, config.patch_size, self.alpha,
                                     one_source_prob=self.ramp())
            return sources, sources.mean(dim=-1)
        grid = config.image_size // config.patch_size
        cut = cutmix_sources(batch, m, grid, 1, self.alpha)  # a box on the token grid
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((batch,))
        pair = torch.rand(batch, m).argsort(dim=1)[:, :2]
        share = torch.zeros(batch, m).scatter(1, pair, torch.stack([lam, 1 - lam], dim=1))
        linear = (2 * share)[:, :, None].expand_as(cut)
        use_cut = (torch.rand(batch) < self.cut_prob * (1 - self.ramp()))[:, None, None]
        sources = torch.where(use_cut, 2 * cut, linear)  # both branches scaled by 2, as MixMo scales by its 2 inputs
        return sources, torch.where(use_cut[:, :, 0], cut.mean(dim=-1), share)

    def __call__(self, model: nn.Module, batch, n: int) -> dict[str, Tensor]:
        if n != 1:
            raise ValueError(f"train multi-input models with n=1 (got n={n}): the loss draws each example's other "
                             "inputs from the batch itself")
        inner = getattr(model, "module", model)
        m = getattr(inner, "subnetworks", 1)
        if m < 2:
            raise ValueError(f"{type(inner).__name__} has {m} subnetwork: mixing needs M >= 2 inputs "
                             "(train the single-input baseline with mux.classification_loss)")
        images, labels = split_batch(batch)
        soft = labels.is_floating_point()
        if soft and (labels.dim() != 2 or labels.shape[0] != images.shape[0]):
            raise ValueError(f"{self!r} takes integer class labels (B,) or soft labels (B, C), got floating-point "
                             f"labels of shape {tuple(labels.shape)}")
        if images.dim() == 5:  # (B, 1, C, H, W) as evaluation groups them
            images = images[:, 0]
        b = images.shape[0]
        order = torch.stack([torch.arange(b)] + [torch.randperm(b) for _ in range(m - 1)], dim=1)  # (B, M)
        order = order.to(labels.device)
        sources, weights = self.mix(b, m, inner.config)
        logits = model(images[order], sources=sources.to(images.device))  # (B, M, C)
        targets = labels[order]  # (B, M), or (B, M, C) soft
        ce = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1).float() if soft
                                         else targets.flatten(), reduction="none").view(b, m)
        loss = (weights.to(ce.device) * ce).sum(dim=1).mean()
        main = weights.argmax(dim=1).to(labels.device)
        picked = logits.gather(1, main[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        classes = targets.argmax(-1) if soft else targets
        accuracy = (picked.argmax(-1) == classes.gather(1, main[:, None])[:, 0]).float().mean().detach()
        return {"loss": loss, "ce": loss.detach(), "acc": accuracy}

    def __repr__(self) -> str:  # part of a run's identity in its checkpoints: keep it stable
        return (f"MultiInputLoss(mixing={self.mixing!r}, alpha={self.alpha}, final_fraction={self.final_fraction}, "
                f"cut_prob={self.cut_prob})")
