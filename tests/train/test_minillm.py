"""MiniLLM on the engine: teacher-mixed sampling (a GKD generation backend) and end-to-end training."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses.minillm import mixture_log_probs
from kdforge.train import (
    CausalLMTask,
    Distiller,
    LossTerm,
    MiniLLMConfig,
    TeacherMixedGenerator,
    TrainConfig,
    minillm_objective,
    minillm_setup,
)
from kdforge.train.minillm import sample_mixed
from kdforge.train.onpolicy import HFGenerator, build_batch

from ._tiny import TokenDataset, pad_collate, tiny_llama

PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]


def test_sampled_tokens_log_probs_equal_the_mixture_of_full_forward_passes():
    # the KV-cached, left-padded loop sees what a plain forward over prompt + sample sees
    student, teacher = tiny_llama(2), tiny_llama(1, head_scale=4.0)
    torch.manual_seed(0)
    outs, lps = sample_mixed(student, teacher, PROMPTS, 0.3, MiniLLMConfig(max_new_tokens=6).on_policy(),
                             return_logprobs=True)
    batch = build_batch(PROMPTS, outs, 0, "cpu")
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mix = mixture_log_probs(torch.log_softmax(student(**kw).logits.double(), -1),
                                torch.log_softmax(teacher(**kw).logits.double(), -1), 0.3)
    for i, (p, o) in enumerate(zip(PROMPTS, outs)):
        assert 1 <= o.numel() <= 6
        want = mix[i, p.numel() - 1: p.numel() - 1 + o.numel()].gather(-1, o[:, None]).squeeze(-1)
        assert lps[i].tolist() == pytest.approx(want.tolist(), abs=1e-5)


def _peaked(seed, token, vocab=64):
    """A tiny LM whose every next-token distribution is (almost) all on ``token``: a zero head with a bias."""
    model = tiny_llama(seed, vocab=vocab)
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 50.0
    model.lm_head = head
    return model


def test_alpha_one_samples_the_teacher_and_alpha_zero_the_student():
    student, teacher = _peaked(2, token=40), _peaked(1, token=50)
    cfg = MiniLLMConfig(max_new_tokens=4, eos_token_id=63).on_policy()
    assert all(o.tolist() == [50] * 4 for o in sample_mixed(student, teacher, PROMPTS, 1.0, cfg))
    assert all(o.tolist() == [40] * 4 for o in sample_mixed(student, teacher, PROMPTS, 0.0, cfg))
    torch.manual_seed(1)
    mixed = torch.cat(sample_mixed(student, teacher, PROMPTS * 20, 0.5, cfg))
    share = float((mixed == 50).double().mean())
    assert set(mixed.tolist()) == {40, 50} and 0.35 < share < 0.65


def test_generator_with_alpha_zero_is_gkds_student_sampling(monkeypatch):
    calls = []
    monkeypatch.setattr(HFGenerator, "__call__", lambda self, m, p, c: calls.append(m) or [torch.tensor([3])] * len(p))
    student = tiny_llama(2)
    gen = TeacherMixedGenerator(tiny_llama(1), alpha=0.0)
    assert gen(student, PROMPTS, MiniLLMConfig().on_policy()) == [torch.tensor([3])] * 3 and calls == [student]
    with pytest.raises(ConfigError, match="alpha"):
        TeacherMixedGenerator(student, alpha=-0.1)


def test_setup_samples_every_batch_at_temperature_one_and_the_objective_gets_alpha():
    cfg = MiniLLMConfig(alpha=0.3, length_norm=False, max_new_tokens=9)
    kw = minillm_setup(cfg, "teacher")
    assert kw["on_policy"].lmbda == 1.0 and kw["on_policy"].temperature == 1.0 and kw["on_policy"].top_k is None
    assert kw["on_policy"].max_new_tokens == 9 and kw["generate_fn"].alpha == 0.3
    terms = minillm_objective([LossTerm("minillm", 1.0), LossTerm("cross_entropy", 0.0)], cfg)
    assert terms[0].params == {"alpha": 0.3, "length_norm": False} and terms[1].params == {}
    with pytest.raises(ConfigError, match="needs a"):
        minillm_objective([LossTerm("reverse_kl", 1.0)], cfg)
    with pytest.raises(ConfigError, match="alpha once"):
        minillm_objective([LossTerm("minillm", 1.0, {"alpha": 0.5})], cfg)
    with pytest.raises(ConfigError, match="temperature 1"):
        minillm_objective([LossTerm("minillm", 1.0, {"temperature": 2.0})], cfg)


def _reverse_kl_on_own_samples(student, teacher, seed=123):
    """Mean per-token KL(q || p) on the student's own continuations of fixed prompts (the quantity
    MiniLLM minimises), same prompts and random stream before and after training."""
    from kdforge.losses import reverse_kl

    prompts = [torch.tensor([3 + i, 10 + i]) for i in range(16)]
    cfg = MiniLLMConfig(max_new_tokens=8).on_policy()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    outs = sample_mixed(student, teacher, prompts, 0.0, cfg)
    torch.random.set_rng_state(state)
    batch = build_batch(prompts, outs, 0, "cpu")
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s, t = student(**kw).logits[:, :-1], teacher(**kw).logits[:, :-1]
    return float(reverse_kl(s, t, mask=batch["labels"][:, 1:] != -100))


def test_minillm_training_lowers_the_reverse_kl_to_the_teacher_on_the_students_own_samples():
    # 64 sequences a step: the long-term policy-gradient term is noisy, and at batch 8 its noise
    # (about twice the norm of the single-step gradient, nearly orthogonal to it) stalls this toy
    teacher, student = tiny_llama(1, head_scale=8.0), tiny_llama(2)
    before = _reverse_kl_on_own_samples(student, teacher)
    cfg = MiniLLMConfig(alpha=0.2, max_new_tokens=8)
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=minillm_objective([LossTerm("minillm", 1.0)], cfg),
                  config=TrainConfig(max_steps=40, batch_size=64, lr=1e-2, progress=False, log_every=5, seed=0),
                  train_data=TokenDataset(n=128), **minillm_setup(cfg, teacher))
    d.train()
    after = _reverse_kl_on_own_samples(d.unwrapped_student, teacher)
    assert after < 0.5 * before, (before, after)
