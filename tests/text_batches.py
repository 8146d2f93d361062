"""Token batches for the Transformer tests (T-MUX, MUX-PLMs), without a tokenizer."""
import torch

V = 40  # vocabulary of the tokenizer-free models
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # the ids train_wordpiece_tokenizer gives them
SPECIAL = (PAD, UNK, CLS, SEP, MASK)


def sentences(lengths, width=None, seed=0) -> dict:
    """A flat batch like a collator's: ``[CLS] words [SEP]`` then [PAD], with the attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for i, k in enumerate(lengths):
        ids[i, :k] = torch.randint(len(SPECIAL), V, (k,), generator=g)
        ids[i, 0], ids[i, k - 1] = CLS, SEP
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_lengths(m, seed=0, low=2, high=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (m,), generator=g).tolist()
