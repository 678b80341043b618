"""Fixtures for elicitation tests: a tiny local model folder and a scripted backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdforge.elicit.backends.base import Backend
from kdforge.elicit.types import GenerationRequest, GenerationResult

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
CORPUS = [
    "the movie was great fun and fresh",
    "a dull and boring film, rotten to the core",
    "answer: yes no positive negative fresh rotten",
    "think step by step then give the answer",
] * 25


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama (hidden 32) and a 300-token byte-level BPE tokenizer with a chat
    template, saved as a normal Hugging Face folder (loads with from_pretrained, offline)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                      pad_token_id=hf.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    GenerationConfig(bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                     pad_token_id=hf.pad_token_id, do_sample=True).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


class ScriptedBackend(Backend):
    """A deterministic in-process teacher for recipe logic: ``reply(request) -> text``.

    It is a real :class:`Backend` (the engine, store and recipes run unchanged); only the
    text comes from a function instead of a model, so tests can check parsing and voting.
    """

    name = "scripted"

    def __init__(self, reply, batch_size: int = 4) -> None:
        super().__init__()
        self.reply = reply
        self.batch_size = batch_size
        self.calls: list[str] = []

    async def generate_batch(self, requests: list[GenerationRequest]):
        out = []
        for r in requests:
            self.calls.append(r.id)
            text = self.reply(r)
            out.append(text if isinstance(text, BaseException) else GenerationResult(
                text=text, finish_reason="stop", prompt_tokens=3, completion_tokens=len(text.split())))
        return out


@pytest.fixture
def scripted():
    return ScriptedBackend
