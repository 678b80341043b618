"""Feature terms in an Objective: config validation, bind (layer maps, projectors), task capture."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.features import FeatureTerms
from kdforge.train import CausalLMTask, LossTerm, Objective

from .test_taps import tiny_llama

ALL_TERMS = [
    {"name": "hidden_mse", "weight": 1.0, "params": {"projector": "linear"}},
    {"name": "cosine_hidden", "weight": 1.0},
    {"name": "attention_kl", "weight": 1.0, "params": {"layers": "uniform"}},
    {"name": "value_relation_kl", "weight": 1.0},
    {"name": "cka", "weight": 1.0, "params": {"layers": [1, 2]}},
]


def _batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    labels = ids.masked_fill(attn == 0, -100)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


# -- config ------------------------------------------------------------------------------------------
def test_a_feature_loss_name_makes_a_feature_term_with_validated_params():
    term = LossTerm("hidden_mse", 1.0, {"layers": "uniform", "projector": "linear"})
    assert term.source == "feature"
    with pytest.raises(ConfigError, match="projecter: unknown key") as info:
        LossTerm("hidden_mse", 1.0, {"projecter": "linear"})
    assert "projector" in str(info.value)
    with pytest.raises(ConfigError, match="layers"):
        LossTerm("attention_kl", 1.0, {"layers": "sometimes"})
    with pytest.raises(ConfigError, match="student_modules"):
        LossTerm("hidden_mse", 1.0, {"student_modules": ["a"]})


def test_a_misspelt_feature_loss_suggests_the_right_name():
    with pytest.raises(ConfigError, match="did you mean 'hidden_mse'"):
        LossTerm("hiden_mse", 1.0)
    with pytest.raises(ConfigError, match="unknown feature loss"):
        LossTerm("fitnets", 1.0, source="feature")


def test_feature_terms_need_a_teacher_and_refuse_chunked_mode():
    obj = Objective([{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 0.5}])
    assert obj.needs_teacher and [t.key for t in obj.feature_terms] == ["hidden_mse"]
    with pytest.raises(ConfigError, match="live teacher"):
        obj.bind(tiny_llama(), None)
    with pytest.raises(ConfigError, match="chunked"):
        Objective([{"name": "forward_kl", "weight": 1.0}, {"name": "cka", "weight": 0.5}], chunked=True)
    assert Objective([{"name": "forward_kl", "weight": 1.0}]).bind(tiny_llama(), tiny_llama()) == {}


# -- bind ---------------------------------------------------------------------------------------------
def test_bind_builds_one_projector_per_pair_only_where_widths_differ():
    student, teacher = tiny_llama(layers=2, hidden=16, heads=2, kv=2), tiny_llama(layers=4, hidden=32)
    obj = Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"layers": "uniform"}},
                     {"name": "cka", "weight": 1.0}])
    extras = obj.bind(student, teacher)
    terms = extras["features"]
    assert isinstance(terms, FeatureTerms) and obj.bind(student, teacher)["features"] is terms
    assert sorted(terms.projectors) == ["hidden_mse_0", "hidden_mse_1"]
    assert terms.projectors["hidden_mse_0"].weight.shape == (32, 16)
    assert terms.plans[0].pairs == ((1, 2), (2, 4)) and terms.plans[1].pairs == ((2, 4),)
    same = Objective([{"name": "hidden_mse", "weight": 1.0}]).bind(tiny_llama(), tiny_llama())["features"]
    assert len(same.projectors) == 0  # auto: identity when the widths match
    with pytest.raises(ConfigError, match="projector identity"):
        Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"projector": "identity"}}]).bind(student, teacher)


def test_bind_switches_models_to_eager_attention_only_for_attention_terms():
    student, teacher = tiny_llama(), tiny_llama()
    student.set_attn_implementation("sdpa")
    teacher.set_attn_implementation("sdpa")
    Objective([{"name": "hidden_mse", "weight": 1.0}]).bind(student, teacher)
    assert student.config._attn_implementation == "sdpa"
    Objective([{"name": "attention_kl", "weight": 1.0}]).bind(student, teacher)
    assert student.config._attn_implementation == "eager" == teacher.config._attn_implementation


def test_value_relation_heads_default_to_the_gcd_of_the_kv_head_counts():
    student, teacher = tiny_llama(hidden=32, heads=4, kv=2), tiny_llama(hidden=48, heads=6, kv=3)
    terms = Objective([{"name": "value_relation_kl", "weight": 1.0}]).bind(student, teacher)["features"]
    assert terms.plans[0].params.relation_heads == 1
    assert terms.plans[0].pairs == (("model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.v_proj"),)


# -- the task captures and computes --------------------------------------------------------------------
def test_a_student_equal_to_its_teacher_has_zero_feature_loss_on_every_term():
    teacher = tiny_llama(layers=2)
    student = copy.deepcopy(teacher)
    obj = Objective([{"name": "forward_kl", "weight": 1.0}, *ALL_TERMS])
    extras = obj.bind(student, teacher)
    out = CausalLMTask().forward(student, teacher, _batch([[3, 4, 5, 6, 7], [8, 9, 10]]), extras=extras)
    value = obj(out, out.num_positions)
    for term in ALL_TERMS:
        assert value.terms[term["name"]].item() == pytest.approx(0.0, abs=1e-5), term["name"]


def test_padding_tokens_do_not_contribute_to_feature_terms():
    teacher, student = tiny_llama(layers=2, seed=1), tiny_llama(layers=2, seed=2)
    obj = Objective([{"name": "hidden_mse", "weight": 1.0}, {"name": "value_relation_kl", "weight": 1.0},
                     {"name": "attention_kl", "weight": 1.0}])
    extras = obj.bind(student, teacher)
    task = CausalLMTask()
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    together = task.forward(student, teacher, _batch(rows), extras=extras).extra_terms
    apart = [task.forward(student, teacher, _batch([r]), extras=extras).extra_terms for r in rows]
    for key in together:
        assert together[key].item() == pytest.approx(sum(a[key].item() for a in apart), rel=1e-4, abs=1e-6), key


class _Spy(nn.Module):
    """Records the keyword arguments of each forward of the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **kwargs):
        self.calls.append(sorted(kwargs))
        return self.model(**kwargs)


def test_plain_kd_requests_no_hidden_states_and_feature_terms_do():
    student = _Spy(tiny_llama())
    teacher = tiny_llama()
    batch = _batch([[3, 4, 5, 6]])
    CausalLMTask().forward(student, teacher, batch)
    assert student.calls[-1] == ["attention_mask", "input_ids"]
    obj = Objective([{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 1.0}])
    extras = {"features": Objective([{"name": "hidden_mse", "weight": 1.0}]).bind(student.model, teacher)["features"]}
    out = CausalLMTask().forward(student, teacher, batch, extras=extras)
    assert "output_hidden_states" in student.calls[-1]
    assert obj(out, out.num_positions).terms["hidden_mse"] >= 0


def test_a_cached_teacher_with_feature_terms_is_a_config_error_naming_the_fix():
    student, teacher = tiny_llama(), tiny_llama()
    extras = Objective([{"name": "hidden_mse", "weight": 1.0}]).bind(student, teacher)
    batch = _batch([[3, 4, 5]])
    batch["teacher_ids"] = torch.zeros(1, 3, 2, dtype=torch.long)
    batch["teacher_logprobs"] = torch.zeros(1, 3, 2)
    with pytest.raises(ConfigError, match="teacher cache") as info:
        CausalLMTask().forward(student, teacher, batch, extras=extras)
    assert "online teacher" in info.value.fix


def test_an_unbound_feature_term_is_a_config_error_naming_bind():
    student, teacher = tiny_llama(), tiny_llama()
    obj = Objective([{"name": "forward_kl", "weight": 1.0}, {"name": "cka", "weight": 1.0}])
    out = CausalLMTask().forward(student, teacher, _batch([[3, 4, 5]]))
    with pytest.raises(ConfigError, match="cka") as info:
        obj(out, out.num_positions)
    assert "objective.bind(student, teacher)" in info.value.fix


def test_the_features_extra_name_is_reserved():
    with pytest.raises(ConfigError, match="reserved"):
        CausalLMTask().forward(tiny_llama(), tiny_llama(), _batch([[3, 4]]), extras={"features": nn.Linear(2, 2)})


def test_hidden_mse_normalize_is_a_validated_hidden_mse_only_option_that_reaches_the_loss():
    from kdforge.features import hidden_mse

    with pytest.raises(ConfigError, match="normalize: unknown key"):
        LossTerm("cosine_hidden", 1.0, {"normalize": True})
    teacher, student = tiny_llama(layers=2, seed=1), tiny_llama(layers=2, seed=2)
    obj = Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"normalize": True, "layers": "last"}}])
    batch = _batch([[3, 4, 5, 6]])
    out = CausalLMTask().forward(student, teacher, batch, extras=obj.bind(student, teacher))
    with torch.no_grad():
        hs = student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        ht = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    mask = torch.tensor([[True, True, True, False]])
    expected = hidden_mse(hs, ht, mask, reduction="sum", normalize=True)
    assert out.extra_terms["hidden_mse"].item() == pytest.approx(expected.item(), rel=1e-5)
