"""Tiny causal LMs built from configs and uneven batches for the Trainer-bridge tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdforge.constants import IGNORE_INDEX

VOCAB = 64


def tiny_llama(seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def uneven_examples(n: int = 8, seed: int = 0, k: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` examples of lengths 5..16 whose first tokens are a prompt (labels -100): the number
    of real targets differs a lot between examples. With ``k`` > 0 each carries a fake cached
    top-k (``teacher_ids``/``teacher_logprobs`` ``[T, k]``, log-probs of a random distribution)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 12
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: 1 + (i * 3) % (length - 2)] = IGNORE_INDEX  # prompt tokens: no target
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if k:
            logits = torch.randn(length, VOCAB, generator=g) * 2
            lp, top = torch.log_softmax(logits, -1).topk(k, dim=-1)
            item["teacher_ids"], item["teacher_logprobs"] = top, lp
        out.append(item)
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_tokenizer():
    """A word-level tokenizer over ``VOCAB`` ids (``[PAD]`` = 0, then ``w1`` .. ``w63``), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[PAD]", eos_token="w1")
