"""MUX-PLMs: multiplexed pre-trained language models (Murahari et al., 2023).

    N token sequences -> per-instance BERT embeddings -> multiplexer (Gaussian-Hadamard, or
      the contextual multiplexer) -> BERT encoder (one pass for all N, no prefix)
      -> RSA demultiplexer (N learned keys) -> a head for the training stage -> N outputs

What changes from T-MUX (:mod:`mux.models.tmux`):

- **No prefix.** The RSA demultiplexer (:class:`mux.demultiplexers.RSADemultiplexer`) keeps N
  learned keys of its own, so sequences keep their length: an N = 10 model reads 128 tokens
  where T-MUX reads 138, and the whole context is the text's.
- **Sentence tasks demultiplex position 0 only** (each instance's ``[CLS]``): N small MLPs
  on one vector instead of on every position.
- **Three training stages**, one model class, the stage chosen by ``task``:

  1. ``"retrieval"``: token retrieval, T-MUX's warm-up (``mux.retrieval_loss``): recover every
     instance's input token at every position. It primes the model to separate the N.
  2. ``"mlm"`` (MUX-BERT) or ``"rtd"`` (MUX-ELECTRA): pre-training. MLM predicts the original
     token at the masked positions of every instance (15%, 80/10/10: the ``transformers``
     collator); RTD says, at every real position of every instance, whether the token was
     replaced (15% replaced by uniformly random tokens; no generator network, as the paper).
  3. ``"sentence"`` or ``"token"``: fine-tuning on a downstream task (``num_labels=1`` for a
     regression such as STS-B).

  :meth:`MUXPLMModel.save` writes a stage's model to a folder; the next stage starts from
  it with :meth:`MUXPLMModel.load_stage` (a path or a model), which refuses a model of
  another N, vocabulary, size or multiplexer, or of a stage that is not an earlier one.

Heads, shared by the N instances: ``lm_head``, tied to the word embeddings (retrieval and
MLM: both name a token of the vocabulary, so the retrieval priming carries over to MLM),
``rtd_head`` (one logit per token) and ``head`` (the task's classes). Inputs and outputs are
T-MUX's: ``forward(input_ids (B, N, L), attention_mask, token_type_ids, return_retrieval)``
returns a dict with ``logits``: ``(B, N, L, V)`` for retrieval and MLM, ``(B, N, L)`` for RTD,
``(B, N, C)`` for a sentence task, ``(B, N, L, C)`` for a token task; ``return_retrieval=True``
adds ``retrieval_logits`` and ``retrieval_labels`` as in T-MUX.

A pre-trained BERT checkpoint (a hub id or a folder, e.g. MiniLM) can start the backbone:
:meth:`MUXPLMModel.build` with ``backbone=...`` takes the checkpoint's sizes and copies its
embeddings and encoder; the multiplexer, demultiplexer and heads start fresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..demultiplexers import RSADemultiplexer
from ..grouping import attention_padding, check_n, union_mask
from ..multiplexers import make_multiplexer, mix_in_blocks
from .common import SavedByFolder, copy_shared_weights, seeded
from .tmux import TMUXConfig, TMUXModel

__all__ = ["MUXPLMConfig", "MUXPLMModel", "STAGES"]

#: the training stage of each task: 1 priming, 2 pre-training, 3 fine-tuning
STAGES = {"retrieval": 1, "mlm": 2, "rtd": 2, "sentence": 3, "token": 3}


@dataclass
class MUXPLMConfig(TMUXConfig):
    """Everything that defines a MUX-PLM; saved with every checkpoint.

    The fields of :class:`mux.TMUXConfig` (``task`` is one of :data:`STAGES`), plus:
    """

    demux_layers: int = 2  # layers of the RSA demultiplexer's MLP (the authors: 2-3)
    max_position_embeddings: int = 0  # rows of the position table; 0: max_length (a checkpoint's may be larger)
    backbone: str = ""  # the pre-trained checkpoint the backbone started from ("": random initialisation)
    hidden_act: str = "gelu"  # the backbone's activation (a checkpoint's own, with from_backbone)
    layer_norm_eps: float = 1e-12  # the backbone's LayerNorm epsilon (likewise)

    tasks = tuple(STAGES)

    def __post_init__(self):
        super().__post_init__()
        check_n(self.demux_layers, name="demux_layers")
        check_n(self.max_position_embeddings, name="max_position_embeddings", minimum=0)
        if self.max_position_embeddings and self.max_position_embeddings < self.max_length:
            raise ValueError(f"max_length ({self.max_length}) exceeds the position table "
                             f"(max_position_embeddings={self.max_position_embeddings})")

    def _check_labels(self) -> None:
        if self.task == "sentence":  # 1: a regression (STS-B), else classes
            check_n(self.num_labels, name="num_labels (1 for a regression, else the classes of the sentence task)")
        elif self.task == "token":
            check_n(self.num_labels, name="num_labels (classes of the token task)", minimum=2)

    @property
    def stage(self) -> int:
        return STAGES[self.task]

    @property
    def prefix_length(self) -> int:
        return 0  # no prefix: the RSA keys are parameters

    def bert_config(self):
        """The ``transformers.BertConfig`` of the backbone (SDPA attention)."""
        config = super().bert_config()
        config.max_position_embeddings = self.max_position_embeddings or self.max_length
        config.hidden_act, config.layer_norm_eps = self.hidden_act, self.layer_norm_eps
        return config

    @classmethod
    def from_backbone(cls, name_or_path: str, tokenizer, **fields) -> "MUXPLMConfig":
        """A configuration whose sizes are those of a pre-trained BERT checkpoint (hub id or folder).

        ``fields`` set the rest (``n_mux``, ``task``, ``max_length`` up to the checkpoint's
        position table, ...). Raises a ValueError for a checkpoint that is not BERT-style or
        whose vocabulary is not ``tokenizer``'s.
        """
        from transformers import AutoConfig

        pretrained = AutoConfig.from_pretrained(str(name_or_path))
        if pretrained.model_type != "bert":
            raise ValueError(f"{name_or_path} is a {pretrained.model_type!r} checkpoint; MUXPLMModel's backbone is "
                             "BERT (model_type 'bert': BERT, MiniLM, ...), whose embeddings and encoder it runs apart")
        if pretrained.vocab_size != len(tokenizer):
            raise ValueError(f"{name_or_path} embeds {pretrained.vocab_size} tokens but the tokenizer has {len(tokenizer)}: "
                             "use the checkpoint's own tokenizer (AutoTokenizer.from_pretrained on the same name)")
        if getattr(pretrained, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{name_or_path} uses {pretrained.position_embedding_type!r} position embeddings; "
                             "MUXPLMModel's backbone has absolute ones")
        sizes = dict(hidden_size=pretrained.hidden_size, num_layers=pretrained.num_hidden_layers,
                     num_heads=pretrained.num_attention_heads, intermediate_size=pretrained.intermediate_size,
                     type_vocab_size=pretrained.type_vocab_size,
                     max_position_embeddings=pretrained.max_position_embeddings,
                     hidden_act=pretrained.hidden_act, layer_norm_eps=pretrained.layer_norm_eps)
        clash = {k: (fields[k], v) for k, v in sizes.items() if k in fields and fields[k] != v}
        if clash:
            raise ValueError("these sizes are the checkpoint's and cannot be changed: " + ", ".join(
                f"{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in clash.items()))
        fields = {**sizes, **fields, "backbone": str(name_or_path)}
        return cls.for_tokenizer(tokenizer, **fields)


class MUXPLMModel(SavedByFolder, TMUXModel):
    """MUX-BERT / MUX-ELECTRA: ``(B, N, L)`` token ids -> a dict with ``logits`` (module docstring).

    Shares T-MUX's input checks (:meth:`check_tokenizer`, :meth:`retrieval_labels`, refusal
    of sequences longer than ``max_length``) and its vanilla baseline (``vanilla=True``,
    N = 1: BERT with the same heads, which starts from the weights of the N = 1 model).
    """

    config_class = MUXPLMConfig
    saved_format, saved_what = "mux-plm", "MUX-PLM"

    def saved_notes(self) -> dict:
        return {"stage": self.config.stage}  # which training stage the saved folder is

    def __init__(self, config: MUXPLMConfig | None = None, **kwargs):
        nn.Module.__init__(self)
        from transformers import BertModel

        self.config = config if config is not None else MUXPLMConfig(**kwargs)
        c = self.config
        if not isinstance(c, MUXPLMConfig):
            raise TypeError(f"MUXPLMModel needs a MUXPLMConfig, got {type(c).__name__}")
        d = c.hidden_size
        self.backbone = BertModel(c.bert_config(), add_pooling_layer=False)
        # built in the same order for every task and for the vanilla model, so that the same
        # seed gives the same starting weights to the parts they share
        multiplexer = make_multiplexer(c.multiplexer, c.n_mux, d, seed=c.mux_seed, num_heads=c.num_heads,
                                       intermediate_size=c.intermediate_size or 4 * d, dropout=c.dropout)
        demultiplexer = RSADemultiplexer(c.n_mux, d, layers=c.demux_layers)
        rtd_head = nn.Linear(d, 1)
        head = nn.Linear(d, max(c.num_labels, 1))
        self.mux = None if c.vanilla else multiplexer
        self.demux = None if c.vanilla else demultiplexer
        self.dropout = nn.Dropout(c.dropout)
        self.lm_head = nn.Linear(d, c.vocab_size)
        self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight  # tied, as in BERT's MLM head
        self.rtd_head = rtd_head if c.task == "rtd" else None
        self.head = head if c.task in ("sentence", "token") else None

    # -- forward ------------------------------------------------------------------------------
    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor,
               first_only: bool = False) -> Tensor:
        """Embed, multiplex, run the encoder once, demultiplex: ``(B, N, L)`` -> ``(B, N, L, d)``,
        or ``(B, N, d)`` (position 0 only) with ``first_only=True``."""
        from transformers.masking_utils import create_bidirectional_mask

        bert = self.backbone
        if self.config.vanilla:  # one sentence per pass: BERT as it is
            h = bert(input_ids=input_ids[:, 0], attention_mask=attention_padding(attention_mask[:, 0]),
                     token_type_ids=token_type_ids[:, 0]).last_hidden_state.unsqueeze(1)  # (B, 1, L, d)
            return h[:, :, 0] if first_only else h
        mixed = self.embed_and_mix(input_ids, attention_mask, token_type_ids)  # (B, L, d)
        attend = create_bidirectional_mask(config=bert.config, inputs_embeds=mixed,
                                           attention_mask=attention_padding(union_mask(attention_mask)))
        h = bert.encoder(mixed, attention_mask=attend).last_hidden_state  # (B, L, d)
        return self.demux(h[:, 0] if first_only else h)  # (B, N, d) or (B, N, L, d)

    def embed_and_mix(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        """BERT's embeddings of every instance, then the multiplexer: ``(B, N, L)`` -> ``(B, L, d)``, the
        instances embedded and mixed a block of about ``block_elements`` numbers (T-MUX's) at a time
        (:func:`mux.multiplexers.mix_in_blocks`)."""
        bert = self.backbone

        def embed(tuples: slice, instances: slice) -> Tensor:
            ids = input_ids[tuples, instances]
            out = bert.embeddings(input_ids=ids.flatten(0, 1), token_type_ids=token_type_ids[tuples, instances].flatten(0, 1))
            return out.view(*ids.shape, -1)

        return mix_in_blocks(self.mux, embed, attention_mask, self.config.hidden_size, self.block_elements)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                return_retrieval: bool = False) -> dict[str, Tensor]:
        attention_mask, token_type_ids = self._inputs(input_ids, attention_mask, token_type_ids)
        task = self.config.task
        first_only = task == "sentence" and not return_retrieval
        z = self.encode(input_ids, attention_mask, token_type_ids, first_only=first_only)
        out = {}
        if task == "sentence":
            out["logits"] = self.head(self.dropout(z if first_only else z[:, :, 0]))  # (B, N, C)
        elif task == "token":
            out["logits"] = self.head(self.dropout(z))  # (B, N, L, C)
        elif task == "rtd":
            out["logits"] = self.rtd_head(z).squeeze(-1)  # (B, N, L): > 0 means "replaced"
        else:  # retrieval, mlm: which token of the vocabulary?
            out["logits"] = self.lm_head(z)  # (B, N, L, V)
        if return_retrieval:
            out["retrieval_logits"] = out["logits"] if task == "retrieval" else self.lm_head(z)
            out["retrieval_labels"] = self.retrieval_labels(input_ids, attention_mask)
        return out

    # -- construction, stages -----------------------------------------------------------------
    @classmethod
    def build(cls, tokenizer, n_mux: int, seed: int = 0, backbone: str | None = None, **fields) -> "MUXPLMModel":
        """A model for ``tokenizer``'s vocabulary, its weights drawn from ``seed``.

        ``backbone``: a pre-trained BERT checkpoint (hub id or folder) whose embeddings and
        encoder the model starts from (its sizes are taken; see :meth:`MUXPLMConfig.from_backbone`).
        ``fields``: other :class:`MUXPLMConfig` fields (``task``, ``num_labels``, ``multiplexer``...).
        """
        if backbone is None:
            with seeded(seed):
                return cls(MUXPLMConfig.for_tokenizer(tokenizer, n_mux=n_mux, mux_seed=seed, **fields))
        with seeded(seed):
            model = cls(MUXPLMConfig.from_backbone(backbone, tokenizer, n_mux=n_mux, mux_seed=seed, **fields))
        return model.load_backbone(backbone)

    def load_backbone(self, name_or_path: str) -> "MUXPLMModel":
        """Copy the embeddings and encoder of a pre-trained BERT checkpoint into ``self.backbone``."""
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the pooler's weights are left out on purpose: no load report for them
        try:
            pretrained = BertModel.from_pretrained(str(name_or_path), add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing, unexpected = self.backbone.load_state_dict(pretrained.state_dict(), strict=False)
        unexpected = [k for k in unexpected if not k.startswith("pooler.")]
        if missing or unexpected:
            raise ValueError(f"{name_or_path} does not fit this backbone: missing {missing}, unexpected {unexpected}")
        return self

    def load_stage(self, previous) -> "MUXPLMModel":
        """Start this stage from the model of an earlier one (a :class:`MUXPLMModel` or a folder
        written by :meth:`save`): every weight the two share is copied; this stage's own head
        starts fresh.

        Raises a ValueError naming what differs when ``previous`` has another N, vocabulary,
        size, multiplexer or demultiplexer, or is not from an earlier stage (retrieval ->
        MLM or RTD -> fine-tuning; a stage may be skipped).
        """
        where = "the given model" if isinstance(previous, MUXPLMModel) else str(previous)
        if not isinstance(previous, MUXPLMModel):
            previous = MUXPLMModel.load(previous)
        mine, theirs = self.config, previous.config
        if theirs.stage >= mine.stage:
            raise ValueError(f"{where} is a stage-{theirs.stage} model ({theirs.task!r}); a {mine.task!r} model "
                             f"(stage {mine.stage}) starts from an earlier stage: retrieval (1), then mlm or rtd (2), "
                             "then sentence or token (3)")
        return copy_shared_weights(self, previous, fresh=("head.", "rtd_head."),
                                   free=("task", "num_labels", "dropout", "backbone"), source_name=where)

    def extra_repr(self) -> str:
        c = self.config
        if c.vanilla:
            return f"vanilla: no multiplexer, no demultiplexer, task={c.task}"
        return f"n_mux={c.n_mux}, task={c.task} (stage {c.stage}), multiplexer={c.multiplexer}"
