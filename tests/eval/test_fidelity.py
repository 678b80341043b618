"""Fidelity metrics against hand-computed values and against each other."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import ShapeError, VocabMismatchError
from kdforge.eval.fidelity import FidelityAccumulator, fidelity
from kdforge.losses.signal import SparseTeacher


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_kl_and_js_match_hand_computed_values_on_two_token_distributions():
    p = [0.5, 0.5]
    q = [0.9, 0.1]
    out = fidelity(_logits([q]), _logits([p]))
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    m = [0.7, 0.3]
    js = 0.5 * sum(a * math.log(a / b) for a, b in zip(p, m)) + 0.5 * sum(
        a * math.log(a / b) for a, b in zip(q, m)
    )
    assert out["kl_to_teacher"] == pytest.approx(fwd, rel=1e-5)
    assert out["kl_from_teacher"] == pytest.approx(rev, rel=1e-5)
    assert out["js_to_teacher"] == pytest.approx(js, rel=1e-5)


def test_forward_and_reverse_kl_are_not_swapped():
    # teacher puts mass on a token the student nearly ignores: forward KL (teacher-weighted) large
    teacher = _logits([[0.5, 0.5 - 1e-6, 1e-6]])
    student = _logits([[0.98, 0.01, 0.01]])
    out = fidelity(student, teacher)
    expected_fwd = sum(
        p * math.log(p / q) for p, q in zip([0.5, 0.5 - 1e-6, 1e-6], [0.98, 0.01, 0.01])
    )
    assert out["kl_to_teacher"] == pytest.approx(expected_fwd, rel=1e-4)
    assert out["kl_to_teacher"] > out["kl_from_teacher"]


def test_identical_models_have_zero_divergence_and_full_agreement():
    x = torch.randn(3, 7, 19)
    out = fidelity(x, x.clone())
    assert out["agreement"] == 1.0
    for key in ("kl_to_teacher", "kl_from_teacher", "js_to_teacher"):
        assert abs(out[key]) < 1e-6


def test_agreement_counts_matching_argmax_positions():
    student = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]]])
    teacher = torch.tensor([[[4.0, 0, 0], [0, 0, 4.0], [0, 0, 4.0], [0, 4.0, 0]]])
    assert fidelity(student, teacher)["agreement"] == pytest.approx(0.5)


def test_masked_positions_are_ignored():
    torch.manual_seed(1)
    s = torch.randn(2, 6, 13)
    t = torch.randn(2, 6, 13)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :2] = True
    garbage_s = s.clone()
    garbage_s[~mask] = 1e4 * torch.randn_like(garbage_s[~mask])
    a = fidelity(s, t, mask)
    b = fidelity(garbage_s, t, mask)
    assert a == pytest.approx(b)
    assert a["n_tokens"] == 6
    ref = fidelity(s[mask], t[mask])
    assert a["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"], rel=1e-6)


def test_sample_reduction_averages_per_sequence_means():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    per = fidelity(s, t, mask, reduction="none")["kl_to_teacher"]
    expected = 0.5 * (per[0].mean() + per[1, 0])
    assert fidelity(s, t, mask, reduction="sample")["kl_to_teacher"] == pytest.approx(float(expected), rel=1e-6)
    assert torch.isnan(per[1, 1:]).all()


def test_sparse_teacher_with_full_k_equals_dense_teacher():
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 17), 3 * torch.randn(2, 5, 17)
    dense = fidelity(s, t)
    sparse = fidelity(s, SparseTeacher.from_logits(t, k=17))
    assert sparse == pytest.approx(dense, rel=1e-5, abs=1e-6)


def test_sparse_teacher_top_k_gives_a_lower_bound_and_exact_agreement():
    torch.manual_seed(4)
    s, t = torch.randn(4, 8, 50), 2 * torch.randn(4, 8, 50)
    dense = fidelity(s, t)
    sparse = fidelity(s, SparseTeacher.from_logits(t, k=5))
    assert sparse["agreement"] == dense["agreement"]
    for key in ("kl_to_teacher", "kl_from_teacher", "js_to_teacher"):
        assert 0 <= sparse[key] <= dense[key] + 1e-6


def test_sparse_padding_entries_with_minus_inf_do_not_double_count():
    torch.manual_seed(5)
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    sp = SparseTeacher.from_logits(t, k=4)
    ids = torch.cat([sp.ids, sp.ids[:, :1].expand(-1, 3)], dim=-1)
    lps = torch.cat([sp.logprobs, torch.full((3, 3), -math.inf)], dim=-1)
    padded = SparseTeacher(ids, lps, 11)
    assert fidelity(s, padded) == pytest.approx(fidelity(s, sp), rel=1e-6)


def test_chunking_does_not_change_the_result():
    torch.manual_seed(6)
    s, t = torch.randn(3, 10, 23), torch.randn(3, 10, 23)
    assert fidelity(s, t, chunk_size=4) == pytest.approx(fidelity(s, t, chunk_size=10_000), rel=1e-6)


def test_accumulator_over_batches_equals_one_call_on_concatenation():
    torch.manual_seed(7)
    s, t = torch.randn(4, 6, 12), torch.randn(4, 6, 12)
    acc = FidelityAccumulator(chunk_size=5)
    acc.update(s[:1], t[:1])
    acc.update(s[1:], t[1:])
    assert acc.compute() == pytest.approx(fidelity(s, t), rel=1e-6)


def test_bf16_logits_are_upcast():
    torch.manual_seed(8)
    s, t = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    out = fidelity(s.bfloat16(), t.bfloat16())
    assert out["kl_to_teacher"] == pytest.approx(fidelity(s, t)["kl_to_teacher"], rel=0.05)


def test_vocab_and_shape_mismatches_raise_clear_errors():
    with pytest.raises(VocabMismatchError, match="vocabulary"):
        fidelity(torch.randn(2, 10), torch.randn(2, 12))
    with pytest.raises(ShapeError, match="positions"):
        fidelity(torch.randn(2, 10), torch.randn(3, 10))
    with pytest.raises(ShapeError, match="mask"):
        fidelity(torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.ones(2, 4, dtype=torch.bool))


def test_only_real_positions_are_computed_and_results_match_the_full_computation(monkeypatch):
    # chat data scores ~1/3 of the positions: the vocabulary-wide divergences of the rest are skipped
    import importlib

    fid = importlib.import_module("kdforge.eval.fidelity")  # the package re-exports a function of that name
    torch.manual_seed(3)
    s, t = torch.randn(3, 7, 17), torch.randn(3, 7, 17)
    mask = torch.rand(3, 7) < 0.4
    mask[2] = False  # a sequence with no real position: skipped by the sample reduction
    sparse = SparseTeacher.from_logits(t.log_softmax(-1), 5)
    expected = {}
    for name, teacher in (("dense", t), ("sparse", sparse)):
        per = fid.fidelity_per_position(s, teacher)  # the full computation, masked afterwards
        m = mask.float()
        has = m.sum(-1) > 0
        expected[name] = {
            "token": {k: float((v * m).sum() / m.sum()) for k, v in per.items()},
            "sample": {k: float(((v * m).sum(-1)[has] / m.sum(-1)[has]).mean()) for k, v in per.items()},
        }
    seen: list[int] = []
    real = fid.fidelity_per_position

    def spy(student_logits, teacher, **kw):
        seen.append(student_logits.shape[:-1].numel())
        return real(student_logits, teacher, **kw)

    monkeypatch.setattr(fid, "fidelity_per_position", spy)
    for name, teacher in (("dense", t), ("sparse", sparse)):
        for reduction in ("token", "sample"):
            got = fidelity(s, teacher, mask, reduction=reduction)
            for k, v in expected[name][reduction].items():
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (name, reduction, k)
    assert 0 < int(mask.sum()) < 14 and seen == [int(mask.sum())] * 4
    with pytest.raises(ShapeError, match="positions"):
        fidelity(s, t[:2], mask)
