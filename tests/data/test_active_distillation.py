"""Robust active distillation: the budget is never exceeded (also through a budgeted teacher
source), the robust score prefers uncertain-but-teacher-confident points, rounds add up."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.data.select import (
    ActiveSelector,
    TeacherConfidenceModel,
    active_scores,
    select_queries,
    student_uncertainty,
)
from kdforge.errors import ConfigError
from kdforge.teachers import BudgetedTeacher, BudgetExceededError, QueryBudget
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_uncertainty_is_one_minus_margin_and_normalised_entropy():
    s = _logits([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(student_uncertainty(s), torch.tensor([0.5, 1.0, 1.0]), atol=1e-6)
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert student_uncertainty(s, "entropy")[0].item() == pytest.approx(h, abs=1e-6)
    assert student_uncertainty(s, "entropy")[2].item() == pytest.approx(1.0, abs=1e-6)


def test_robust_prefers_uncertain_points_the_teacher_is_confident_on():
    # 0: certain; 1: uncertain, teacher unsure (likely wrong); 2: uncertain, teacher confident; 3: mid
    s = _logits([[0.95, 0.03, 0.02], [0.45, 0.44, 0.11], [0.46, 0.42, 0.12], [0.6, 0.3, 0.1]])
    teacher_conf = torch.tensor([0.99, 0.40, 0.95, 0.9])
    u = student_uncertainty(s)
    scores = active_scores(s, "robust", teacher_confidence=teacher_conf)
    assert torch.allclose(scores, u * teacher_conf)  # the definition
    assert select_queries(s, 2, "robust", teacher_confidence=teacher_conf).tolist() == [2, 3]
    assert select_queries(s, 2, "uncertainty").tolist() == [1, 2]  # pure uncertainty takes the teacher's weak point
    assert select_queries(s, 2, "robust", teacher_confidence=teacher_conf, exclude=torch.tensor([2])).tolist() == [3, 1]


def test_confidence_model_learns_per_class_and_margin_bin_with_shrinkage():
    m = TeacherConfidenceModel(num_classes=2, bins=2, prior_weight=1.0)
    s_unsure, s_sure = _logits([[0.55, 0.45]]), _logits([[0.95, 0.05]])
    assert m.predict(s_unsure).item() == 1.0  # nothing seen yet
    m.update(s_unsure.repeat(3, 1), _logits([[0.5, 0.5]] * 3))  # teacher unsure where the student is unsure
    m.update(s_sure.repeat(3, 1), _logits([[1.0 - 1e-6, 1e-6]] * 3))
    mean = (3 * 0.5 + 3 * 1.0) / 6
    assert m.predict(s_unsure).item() == pytest.approx((3 * 0.5 + mean) / 4, abs=1e-5)
    assert m.predict(s_sure).item() == pytest.approx((3 * 1.0 + mean) / 4, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(pool=st.integers(1, 60), budget=st.integers(0, 80), rounds=st.integers(1, 6),
       strategy=st.sampled_from(["robust", "uncertainty", "random"]), seed=st.integers(0, 5))
def test_rounds_never_exceed_the_budget_and_never_repeat_a_point(pool, budget, rounds, strategy, seed):
    b = QueryBudget(max_queries=budget)
    sel = ActiveSelector(pool, b, rounds, 4, strategy=strategy, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        s = torch.randn(pool, 4, generator=g)
        idx = sel.select(s)
        sel.observe(idx, s, torch.randn(len(idx), 4, generator=g))
        assert b.queries <= budget
    assert len(set(sel.queried)) == len(sel.queried) == b.queries == min(budget, pool)


def test_token_budget_limits_the_round_and_charges_refuse_overspending():
    b = QueryBudget(max_queries=100, max_tokens=250)
    sel = ActiveSelector(50, b, 2, 3, strategy="uncertainty", tokens_per_query=40)
    assert len(sel.select(torch.randn(50, 3))) == 3  # 250 // 40 = 6 affordable, over 2 rounds
    sel.select(torch.randn(50, 3))
    assert b.tokens <= 250 and b.queries == 6
    with pytest.raises(BudgetExceededError, match="budget exceeded") as err:
        b.charge(1, 40)
    assert "Fix:" in str(err.value) and b.queries == 6  # a refused charge spends nothing
    with pytest.raises(ConfigError, match="finite budget"):
        ActiveSelector(5, QueryBudget(), 1, 3)


class _Echo(TeacherSource):
    provides = frozenset({"dense"})

    def signal(self, batch, task, *, features=None):
        return TeacherSignal(logits=torch.zeros(batch["input_ids"].shape[0], 3))


def test_budgeted_teacher_charges_rows_and_tokens_and_stops_before_the_call():
    b = QueryBudget(max_queries=5, max_tokens=20)
    src = BudgetedTeacher(_Echo(), b)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    src.signal(batch, None)
    assert (b.queries, b.tokens) == (2, 7)
    src.signal(batch, None)
    with pytest.raises(BudgetExceededError):
        src.signal(batch, None)  # 6 queries > 5
    assert (b.queries, b.tokens) == (4, 14)
    assert src.state_dict()["budget"]["queries"] == 4


def test_calibration_on_labelled_points_uses_the_teachers_correctness():
    m = TeacherConfidenceModel(num_classes=2, bins=1, prior_weight=0.0)
    s = _logits([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    t = _logits([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])  # confident everywhere
    m.update(s, t, labels=torch.tensor([0, 0, 1, 1]))  # ... but wrong on one of class 1's two points
    assert m.predict(s).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])
