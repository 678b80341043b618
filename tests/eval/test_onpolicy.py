"""On-policy fidelity (kdforge.eval.onpolicy): the teacher scoring the student's own continuations."""

import math
from types import SimpleNamespace

import pytest
import torch

from kdforge.errors import DataError
from kdforge.eval.onpolicy import (
    ONPOLICY_KEYS,
    onpolicy_fidelity,
    sample_continuations,
    score_continuations,
)
from kdforge.train.onpolicy import OnPolicyConfig

V = 6


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends only on the current one."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.config = SimpleNamespace(pad_token_id=0, eos_token_id=5)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


class FixedGenerator:
    def __init__(self, completions):
        self.completions = completions

    def __call__(self, model, prompts, config):
        return [torch.tensor(self.completions[i % len(self.completions)]) for i in range(len(prompts))]


def _table(seed: int) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed))


def test_teacher_and_student_nll_match_a_hand_computed_bigram_likelihood():
    teacher, student = BigramLM(_table(0)), BigramLM(_table(1))
    prompts = [torch.tensor([1, 2]), torch.tensor([3])]
    completions = [torch.tensor([4, 5]), torch.tensor([1, 1, 2])]
    out = score_continuations(student, teacher, prompts, completions, pad_token_id=0, eos_token_id=5)

    def nll(table):
        lp = torch.log_softmax(table, -1)
        # (previous token, generated token) pairs of the completions only
        pairs = [(2, 4), (4, 5), (3, 1), (1, 1), (1, 2)]
        return -sum(float(lp[a, b]) for a, b in pairs) / len(pairs)

    assert out["teacher_nll"] == pytest.approx(nll(_table(0)), rel=1e-5)
    assert out["student_nll"] == pytest.approx(nll(_table(1)), rel=1e-5)
    assert out["n_tokens"] == 5
    assert out["mean_length"] == pytest.approx(2.5)
    assert out["eos_rate"] == pytest.approx(0.5)          # only the first continuation ends with 5
    assert out["distinct_2"] == pytest.approx(3 / 3)      # (4,5), (1,1), (1,2): all distinct
    assert set(ONPOLICY_KEYS) <= set(out)


def test_reverse_kl_is_measured_on_the_generated_positions_only():
    t_table, s_table = _table(0), _table(1)
    teacher, student = BigramLM(t_table), BigramLM(s_table)
    out = score_continuations(student, teacher, [torch.tensor([1, 2])], [torch.tensor([3])], pad_token_id=0)
    # the single generated token 3 is predicted at the position of token 2
    lq, lp = torch.log_softmax(s_table[2], -1), torch.log_softmax(t_table[2], -1)
    assert out["kl_from_teacher"] == pytest.approx(float((lq.exp() * (lq - lp)).sum()), rel=1e-5)
    assert out["kl_to_teacher"] == pytest.approx(float((lp.exp() * (lp - lq)).sum()), rel=1e-5)
    assert out["agreement"] == float(lq.argmax() == lp.argmax())


def test_student_writing_what_the_teacher_prefers_gets_the_lower_teacher_nll():
    table = torch.full((V, V), -4.0)
    table[:, 4] = 4.0                                     # the teacher always expects token 4
    teacher = BigramLM(table)
    prompts = [torch.tensor([1, 2])] * 4
    cfg = OnPolicyConfig(max_new_tokens=3)
    good = onpolicy_fidelity(teacher, teacher, prompts, cfg, generate_fn=FixedGenerator([[4, 4, 4]]))
    bad = onpolicy_fidelity(teacher, teacher, prompts, cfg, generate_fn=FixedGenerator([[3, 1, 3]]))
    assert good["teacher_nll"] < 0.01 < 5.0 < bad["teacher_nll"]
    assert good["distinct_2"] == pytest.approx(1 / 8)   # one bigram (4,4) out of 8
    assert good["n_prompts"] == 4


def test_teacher_scored_against_itself_has_zero_divergence_and_full_agreement():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    out = onpolicy_fidelity(model, model, prompts, OnPolicyConfig(max_new_tokens=4), seed=1)
    assert out["kl_from_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert out["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert out["agreement"] == 1.0
    assert out["teacher_nll"] == pytest.approx(out["student_nll"], rel=1e-5)
    assert out["n_tokens"] >= 2 and math.isfinite(out["teacher_nll"])


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=2))
    prompts = [torch.tensor([5, 6]), torch.tensor([7, 8, 9]), torch.tensor([10])]
    cfg = OnPolicyConfig(max_new_tokens=8)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = sample_continuations(model, prompts, cfg, seed=4, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = sample_continuations(model, prompts, cfg, seed=4, batch_size=2)
    c = sample_continuations(model, prompts, cfg, seed=5, batch_size=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_one_completion_per_prompt_is_required():
    m = BigramLM(_table(0))
    with pytest.raises(DataError, match="completions"):
        score_continuations(m, m, [torch.tensor([1])], [], pad_token_id=0)
    with pytest.raises(DataError, match="no prompts"):
        sample_continuations(m, [], OnPolicyConfig())
