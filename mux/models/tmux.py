"""T-MUX: a Transformer that reads N sentences in one pass (Murahari et al., 2022, section 3).

    N token sequences -> per-instance embeddings (with an index prefix) -> multiplexer
      (fixed phi_i, mean over N) -> BERT encoder (one pass for all N)
      -> index demultiplexer -> shared heads -> N outputs

The pieces, in the order of :meth:`TMUXModel.forward`:

1. **Index prefix.** Instance i gets N + 1 leading tokens: N slots holding a filler token,
   except slot i, which holds instance i's index token; then its own ``[CLS]`` (the
   tokenizer already put it there). The N + 1 index/filler tokens are rows of a small
   table of their own, ``prefix_embeddings`` (N + 1, d), not entries of the tokenizer's
   vocabulary. Sequences become N tokens longer: at large N that costs throughput.
2. **Per-instance embeddings.** Word (or prefix) embedding + position + token type,
   LayerNorm and dropout: ``transformers``' ``BertEmbeddings`` run on each instance, so the
   same token at the same position embeds the same way in every instance.
3. **Multiplexer** (:mod:`mux.multiplexers`): fixed phi_i per instance, mean over N.
   Padding positions of an instance contribute zero.
4. **Backbone**: ``transformers``' ``BertEncoder`` (SDPA attention), on the mixture. Its
   attention mask is the union of the instances' masks (:func:`mux.grouping.union_mask`):
   a position is attended where at least one instance has a real token, and a position
   where every instance is padding is never attended.
5. **Index demultiplexer** (:class:`mux.demultiplexers.IndexDemultiplexer`): the states at
   the N index slots are the N keys; instance i's state at position t is
   ``MLP([key_i ; h_t])``.
6. **Heads**, shared by the N instances: ``sentence`` classification from the
   demultiplexed ``[CLS]`` (position N of the mixture), ``token`` classification at every
   text position, and ``retrieval`` (token retrieval: which token did instance i have at
   position t?) over the vocabulary, its weight tied to the word embeddings as in BERT's
   masked-language-model head.

Vanilla baseline (``vanilla=True``, N = 1): the same BERT embeddings, encoder and heads,
with no prefix, no multiplexer and no demultiplexer; built in the same order, so with the
same seed its shared parts start from the weights of the T-MUX model with N = 1.

Inputs and outputs. ``forward(input_ids, attention_mask=None, token_type_ids=None,
return_retrieval=False)`` takes ``(B, N, L)`` tensors (a ``transformers`` collator's batch,
grouped by :func:`mux.multiplexed_forward`) and returns a dict:

- ``logits``: ``(B, N, C)`` for a sentence task, ``(B, N, L, C)`` for a token task,
  ``(B, N, L, V)`` for ``task="retrieval"`` (the warm-up);
- with ``return_retrieval=True`` also ``retrieval_logits`` ``(B, N, L, V)`` and
  ``retrieval_labels`` ``(B, N, L)``: each instance's own token ids, with
  ``IGNORE_INDEX`` (-100) on padding and on the special tokens of ``special_token_ids``
  ([CLS], [SEP], ...: the same in every sentence, nothing to retrieve).

Sequences longer than ``max_length`` tokens are refused, not truncated (the caller chose
the truncation when tokenizing: ``data_utils.load_text_task(..., max_length=...)``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..demultiplexers import IndexDemultiplexer
from ..grouping import IGNORE_INDEX, attention_padding, check_n, union_mask
from ..multiplexers import MULTIPLEXERS, make_multiplexer, mix_in_blocks
from .common import copy_shared_weights, seeded

__all__ = ["TMUXConfig", "TMUXModel", "TASKS"]

TASKS = ("retrieval", "sentence", "token")


@dataclass
class TMUXConfig:
    """Everything that defines a T-MUX model; saved with every checkpoint."""

    vocab_size: int  # rows of the word embedding table: the tokenizer's len()
    n_mux: int = 2  # N: instances per forward pass
    task: str = "retrieval"  # "retrieval" (warm-up), "sentence" or "token" classification
    num_labels: int = 0  # classes of the task head (ignored for "retrieval")
    hidden_size: int = 128  # d
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 0  # 0: 4 * hidden_size, as in BERT
    max_length: int = 64  # longest input (text tokens, [CLS] and [SEP] included)
    dropout: float = 0.1  # hidden and attention dropout of the BERT layers, and before the task head
    multiplexer: str = "gaussian_hadamard"  # a key of mux.MULTIPLEXERS
    mux_seed: int = 0  # seed of the fixed multiplexing transforms
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = ()  # never retrieval targets ([CLS], [SEP], ...); padding never is
    type_vocab_size: int = 2  # token types (sentence A / B of a pair)
    vanilla: bool = False  # True: the non-multiplexed baseline, no prefix/mux/demux (needs n_mux=1)

    def __post_init__(self):
        check_n(self.n_mux)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_length", "type_vocab_size"):
            check_n(getattr(self, name), name=name)
        check_n(self.intermediate_size, name="intermediate_size", minimum=0)
        if self.task not in self.tasks:
            raise ValueError(f"unknown task {self.task!r}; expected one of {list(self.tasks)}")
        self._check_labels()
        if self.multiplexer not in MULTIPLEXERS:
            raise ValueError(f"unknown multiplexer {self.multiplexer!r}; expected one of {sorted(MULTIPLEXERS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if not isinstance(self.vanilla, bool):
            raise ValueError(f"vanilla must be True or False, got {self.vanilla!r}")
        if self.vanilla and self.n_mux != 1:
            raise ValueError(f"vanilla=True is the non-multiplexed baseline: it needs n_mux=1, got n_mux={self.n_mux}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        self.special_token_ids = tuple(sorted({int(i) for i in self.special_token_ids}))
        bad = [i for i in (*self.special_token_ids, self.pad_token_id) if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary (size {self.vocab_size})")

    tasks = TASKS  # the tasks this configuration knows (a class attribute, not a field)

    def _check_labels(self) -> None:
        if self.task != "retrieval":
            check_n(self.num_labels, name=f"num_labels (classes of the {self.task} task)", minimum=2)

    @property
    def prefix_length(self) -> int:
        """Tokens added in front of every instance: N index slots (none for the vanilla model)."""
        return 0 if self.vanilla else self.n_mux

    def bert_config(self):
        """The ``transformers.BertConfig`` of the backbone (SDPA attention)."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            # vanilla (N = 1) keeps the row of T-MUX N = 1's one index slot, unused, so that the
            # two draw the same initial weights from the same seed
            max_position_embeddings=self.max_length + self.n_mux, type_vocab_size=self.type_vocab_size,
            hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
            pad_token_id=self.pad_token_id, attn_implementation="sdpa",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_tokenizer(cls, tokenizer, **fields) -> "TMUXConfig":
        """A configuration whose vocabulary, padding and special tokens are ``tokenizer``'s."""
        return cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   special_token_ids=tuple(tokenizer.all_special_ids), **fields)


class TMUXModel(nn.Module):
    """T-MUX: ``(B, N, L)`` token ids -> a dict with ``logits`` (see the module docstring).

    Use :func:`mux.multiplexed_forward` (or ``mux.train`` / ``mux.evaluate``) to run it on a
    flat batch of any size. ``model.backbone`` is a ``transformers.BertModel`` without pooler
    whose embeddings embed each instance and whose encoder processes the mixture.
    """

    #: numbers (instances x (N + L) x d) embedded at once when the multiplexer is separable
    block_elements = 2**20

    def __init__(self, config: TMUXConfig | None = None, **kwargs):
        super().__init__()
        from transformers import BertModel

        self.config = config if config is not None else TMUXConfig(**kwargs)
        c = self.config
        d = c.hidden_size
        self.backbone = BertModel(c.bert_config(), add_pooling_layer=False)
        # Built in this order for both models (see mux.models.datamux): the vanilla model draws
        # the prefix table and the demultiplexer too and discards them, so with the same seed
        # its backbone and heads start from the weights of the T-MUX model with N = 1.
        prefix = nn.Embedding(c.n_mux + 1, d)  # rows 0..N-1: index tokens; row N: the filler
        nn.init.normal_(prefix.weight, std=self.backbone.config.initializer_range)
        multiplexer = make_multiplexer(c.multiplexer, c.n_mux, d, seed=c.mux_seed)
        demultiplexer = IndexDemultiplexer(c.n_mux, d)
        self.prefix_embeddings = None if c.vanilla else prefix
        self.mux = None if c.vanilla else multiplexer
        self.demux = None if c.vanilla else demultiplexer
        # prefix_ids[i] = the N slot tokens of instance i: the filler (N) everywhere but slot i
        ids = torch.full((c.n_mux, c.n_mux), c.n_mux, dtype=torch.long)
        ids[torch.arange(c.n_mux), torch.arange(c.n_mux)] = torch.arange(c.n_mux)
        self.register_buffer("prefix_ids", ids, persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.retrieval_head = nn.Linear(d, c.vocab_size)
        self.retrieval_head.weight = self.backbone.embeddings.word_embeddings.weight  # tied, as in BERT's MLM head
        self.head = nn.Linear(d, c.num_labels) if c.task != "retrieval" else None

    # -- checks -----------------------------------------------------------------------------
    def _check(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None) -> None:
        c = self.config
        if input_ids.dim() != 3 or input_ids.shape[1] != c.n_mux:
            raise ValueError(f"{type(self).__name__} expects input_ids (B, N={c.n_mux}, L), got shape {tuple(input_ids.shape)}; "
                             "group a flat batch with mux.group or mux.multiplexed_forward")
        if input_ids.is_floating_point():
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[2] > c.max_length:
            raise ValueError(f"sequences of {input_ids.shape[2]} tokens are longer than this model's max_length="
                             f"{c.max_length}: the model refuses rather than truncates; tokenize with truncation=True, "
                             f"max_length={c.max_length} (data_utils.load_text_task(..., max_length=...))")
        if input_ids.numel() and input_ids.device.type != "meta" and (  # meta: shapes only (cost counting)
                int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={c.vocab_size}), got ids from {int(input_ids.min())} "
                             f"to {int(input_ids.max())}: was the data tokenized by another tokenizer than the model's?")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a ValueError unless ``tokenizer``'s vocabulary is the one this model embeds."""
        if len(tokenizer) != self.config.vocab_size or tokenizer.pad_token_id != self.config.pad_token_id:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens (pad id {tokenizer.pad_token_id}); this model "
                             f"embeds {self.config.vocab_size} (pad id {self.config.pad_token_id}): use the tokenizer "
                             "the model was built for")

    def retrieval_labels(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token-retrieval targets ``(B, N, L)``: each instance's token ids, with ``IGNORE_INDEX``
        on padding and on ``config.special_token_ids``."""
        ignore = attention_mask == 0
        if self.config.special_token_ids:
            special = torch.tensor(self.config.special_token_ids, device=input_ids.device)
            ignore = ignore | torch.isin(input_ids, special)
        return input_ids.masked_fill(ignore, IGNORE_INDEX)

    # -- forward ------------------------------------------------------------------------------
    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor,
               first_only: bool = False) -> Tensor:
        """Embed, multiplex, run the encoder and demultiplex: ``(B, N, L)`` -> ``(B, N, L, d)``.

        Position 0 of every output row is the instance's ``[CLS]``; the prefix is dropped.
        ``first_only=True`` demultiplexes position 0 alone, ``(B, N, 1, d)``: all a sentence
        head reads (the same values as ``encode(...)[:, :, :1]``, without the work of the rest).
        """
        from transformers.masking_utils import create_bidirectional_mask

        c, bert = self.config, self.backbone
        b, n, length = input_ids.shape
        if c.vanilla:  # one sentence per pass: BERT as it is
            h = bert(input_ids=input_ids[:, 0], attention_mask=attention_padding(attention_mask[:, 0]),
                     token_type_ids=token_type_ids[:, 0]).last_hidden_state
            return h[:, :1].unsqueeze(1) if first_only else h.unsqueeze(1)  # (B, 1, L or 1, d)
        mask = torch.cat([attention_mask.new_ones(b, n, n), attention_mask], dim=2)  # prefix slots are real

        def embed(tuples: slice, instances: slice) -> Tensor:  # (b', k, N + L, d): prefix, then the words
            words = bert.embeddings.word_embeddings(input_ids[tuples, instances])  # (b', k, L, d)
            prefix = self.prefix_embeddings(self.prefix_ids[instances]).expand(*words.shape[:2], n, c.hidden_size)
            tokens = torch.cat([prefix.to(words.dtype), words], dim=2)  # (b', k, N + L, d)
            types = token_type_ids[tuples, instances]
            types = torch.cat([types.new_zeros(*types.shape[:2], n), types], dim=2)
            out = bert.embeddings(inputs_embeds=tokens.flatten(0, 1), token_type_ids=types.flatten(0, 1))
            return out.view(*tokens.shape)

        # every instance embedded and mixed, a block of instances at a time (mux.multiplexers.mix_in_blocks)
        mixed = mix_in_blocks(self.mux, embed, mask, c.hidden_size, self.block_elements)  # (B, N + L, d)
        attend = create_bidirectional_mask(config=bert.config, inputs_embeds=mixed, attention_mask=attention_padding(union_mask(mask)))
        h = bert.encoder(mixed, attention_mask=attend).last_hidden_state  # (B, N + L, d)
        text = h[:, n:n + 1] if first_only else h[:, n:]  # the [CLS] state alone, or every text position
        return self.demux(text, prefix=h[:, :n])  # keys: the N index slots -> (B, N, L or 1, d)

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None):
        """Check the inputs; fill a missing mask with ones and missing token types with zeros."""
        self._check(input_ids, attention_mask, token_type_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return mask, torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                return_retrieval: bool = False) -> dict[str, Tensor]:
        attention_mask, token_type_ids = self._inputs(input_ids, attention_mask, token_type_ids)
        c = self.config
        first_only = c.task == "sentence" and not return_retrieval  # a sentence head reads [CLS] alone
        z = self.encode(input_ids, attention_mask, token_type_ids, first_only=first_only)  # (B, N, L or 1, d)
        out = {}
        if c.task == "sentence":
            out["logits"] = self.head(self.dropout(z[:, :, 0]))  # (B, N, C) from each instance's [CLS]
        elif c.task == "token":
            out["logits"] = self.head(self.dropout(z))  # (B, N, L, C)
        if c.task == "retrieval" or return_retrieval:
            retrieval = self.retrieval_head(z)  # (B, N, L, V)
            if c.task == "retrieval":
                out["logits"] = retrieval
            if return_retrieval:
                out["retrieval_logits"] = retrieval
                out["retrieval_labels"] = self.retrieval_labels(input_ids, attention_mask)
        return out

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, tokenizer, n_mux: int, seed: int = 0, **fields) -> "TMUXModel":
        """A model for ``tokenizer``'s vocabulary. ``seed`` seeds the fixed transforms and,
        torch's generator (:func:`mux.models.common.seeded`), the initial weights; ``fields``: other
        :class:`TMUXConfig` fields (``task``, ``num_labels``, ``hidden_size``, ``vanilla``...)."""
        with seeded(seed):
            return cls(TMUXConfig.for_tokenizer(tokenizer, n_mux=n_mux, mux_seed=seed, **fields))

    def load_warmup(self, warmup: "TMUXModel") -> "TMUXModel":
        """Start from a retrieval warm-up: copy every weight ``warmup`` shares with this model
        (all but the task head). The two must agree on everything but the task; else a
        ValueError names what differs."""
        return copy_shared_weights(self, warmup, fresh=("head.",), free=("task", "num_labels", "dropout"),
                                   source_name="the warm-up model")

    def extra_repr(self) -> str:
        c = self.config
        return "vanilla: no prefix, no multiplexer, no demultiplexer" if c.vanilla else f"n_mux={c.n_mux}, task={c.task}"
