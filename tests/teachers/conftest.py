"""Tiny teachers, tokenizers and corpora for the teacher tests (built from configs, seconds)."""

from __future__ import annotations

import threading

import pytest
import torch

from kdforge.teachers.cache.parallel import BuildGroup


def tiny_llama(vocab_size: int = 256, seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits so top-k mass is realistic (not uniform)
        model.lm_head.weight.mul_(40.0)
    return model.eval()


def train_tiny_tokenizer(vocab_size: int = 200, extra: str = ""):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    text = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife." + extra,
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
    ] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def teacher_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture
def sequences():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (20, 16), generator=g)


def run_ranks(world: int, fn) -> dict[int, BaseException | None]:
    """Run ``fn(group)`` for ranks 0..world-1 in threads; return each rank's exception (or None)."""
    barrier = threading.Barrier(world, timeout=60)
    errors: dict[int, BaseException | None] = {}

    def target(rank: int) -> None:
        try:
            fn(BuildGroup(rank, world, barrier.wait))
            errors[rank] = None
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[rank] = exc
            barrier.abort()  # like a launcher stopping the group when one process fails

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors
