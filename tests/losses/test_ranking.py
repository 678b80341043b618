"""Margin-MSE (kdforge.losses.ranking) against its definition, its gradient and its invariances."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses import LOSSES, margin_mse, pair_scores


def test_margin_mse_by_hand_on_two_triples():
    # query 1: student margin 3 - 1 = 2, teacher margin 0.5 - (-0.5) = 1 -> (2 - 1)^2 = 1
    # query 2: student margin 0 - 2 = -2, teacher margin 4 - 1 = 3 -> (-2 - 3)^2 = 25
    s = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[0.5, -0.5], [4.0, 1.0]])
    assert margin_mse(s, t, reduction="none").tolist() == [1.0, 25.0]
    assert margin_mse(s, t).item() == 13.0 and margin_mse(s, t, reduction="sum").item() == 26.0


def test_several_negatives_average_the_squared_margin_errors():
    s = torch.tensor([[1.0, 0.0, 2.0]])  # margins 1, -1
    t = torch.tensor([[2.0, 0.0, 0.0]])  # margins 2, 2
    assert margin_mse(s, t, reduction="none").tolist() == [((1 - 2) ** 2 + (-1 - 2) ** 2) / 2]


def test_gradient_is_the_derivative_of_the_formula_and_matches_finite_differences():
    torch.manual_seed(0)
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64)
    margin_mse(s, t, reduction="sum").backward()
    e = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])  # [4, 2] margin errors
    want = torch.cat([(2 * e).sum(1, keepdim=True), -2 * e], dim=1) / 2  # mean over k = 2 negatives
    torch.testing.assert_close(s.grad, want.detach())
    assert torch.autograd.gradcheck(lambda x: margin_mse(x, t), (s.detach().clone().requires_grad_(),))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.lists(st.floats(-5, 5), min_size=6, max_size=6),
       st.floats(-100, 100), st.floats(-100, 100))
def test_adding_a_constant_to_one_querys_scores_changes_nothing(s, t, c_teacher, c_student):
    s = torch.tensor(s, dtype=torch.float64).view(2, 3)
    t = torch.tensor(t, dtype=torch.float64).view(2, 3)
    shift = torch.tensor([[c_teacher], [0.0]], dtype=torch.float64)  # only the first query's teacher scores
    ref = margin_mse(s, t, reduction="none")
    torch.testing.assert_close(margin_mse(s, t + shift, reduction="none"), ref)
    torch.testing.assert_close(margin_mse(s + c_student, t, reduction="none"), ref)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=8, max_size=8), st.floats(-50, 50))
def test_zero_when_the_student_margins_equal_the_teachers_and_positive_otherwise(t, offset):
    t = torch.tensor(t, dtype=torch.float64).view(4, 2)
    student = t + offset  # same margins, other scale origin
    assert margin_mse(student, t).item() == pytest.approx(0.0, abs=1e-12)
    moved = student.clone()
    moved[0, 1] += 1.0  # the first query's margin shrinks by 1
    assert margin_mse(moved, t, reduction="none")[0].item() == pytest.approx(1.0)


def test_mask_drops_queries_and_their_gradient():
    s = torch.tensor([[1.0, 0.0], [float("nan"), 9.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [float("nan"), 0.0], [0.0, 0.0]])
    m = torch.tensor([True, False, True])
    loss = margin_mse(s, t, mask=m)
    assert loss.item() == 1.0  # (1 + 1) / 2 real queries
    loss.backward()
    assert torch.all(s.grad[1] == 0)
    assert margin_mse(s, t, mask=m, reduction="none")[1].item() == 0.0


def test_bf16_scores_are_computed_in_float32_and_the_registry_entry():
    s, t = torch.randn(5, 2).bfloat16(), torch.randn(5, 2)
    assert margin_mse(s, t).dtype == torch.float32
    spec = LOSSES.get("margin_mse")
    assert spec.separable and not spec.sparse_ok and "Hofstätter" in spec.paper


def test_pair_scores_dot_and_cosine_feed_the_loss():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    docs = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]])  # [B=2, P=2, D=2]
    assert pair_scores(q, docs).tolist() == [[2.0, 0.0], [2.0, 0.0]]
    assert pair_scores(q, docs, score="cosine").tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # a student whose embeddings equal the teacher's up to a rotation has the teacher's cosine margins
    torch.manual_seed(1)
    rot, _ = torch.linalg.qr(torch.randn(2, 2))
    t = pair_scores(q, docs, score="cosine")
    assert margin_mse(pair_scores(q @ rot, docs @ rot, score="cosine"), t).item() == pytest.approx(0.0, abs=1e-6)


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ShapeError, match="differ"):
        margin_mse(torch.randn(3, 2), torch.randn(3, 3))
    with pytest.raises(ShapeError, match="k >= 1"):
        margin_mse(torch.randn(3, 1), torch.randn(3, 1))
    with pytest.raises(ShapeError, match="dense teacher"):
        margin_mse(torch.randn(3, 2), None)
    with pytest.raises(ConfigError, match="unknown score"):
        pair_scores(torch.randn(2, 4), torch.randn(2, 3, 4), score="l2")
    with pytest.raises(ShapeError, match=r"\[B, P, D\]"):
        pair_scores(torch.randn(2, 4), torch.randn(2, 4))
