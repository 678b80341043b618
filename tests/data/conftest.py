"""Fixtures of the data-layer tests: a tiny byte-level BPE tokenizer trained here, chat templates,
and a private ``datasets`` cache (nothing is written under the user's home)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

#: ChatML-like, no generation markers (masks come from prefix rendering)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: the same rendering, with the assistant part wrapped in {% generation %} markers
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: a template that renders the last assistant turn differently from earlier ones
NON_INCREMENTAL = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: "
                   "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")

_CORPUS = [
    "hello there, how are you today?", "I am fine, thank you very much.", "what is two plus two?",
    "four is the answer.", "tell me a story about a cat", "once upon a time a cat sat on a mat",
    "the quick brown fox jumps over the lazy dog", "It is a truth universally acknowledged",
]


def make_tokenizer(*, chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    import datasets.config

    # outside tmp_path: a data folder under test must not see the cache's own files
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
