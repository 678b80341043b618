"""User mistakes give kdforge errors naming the problem and the fix; module wrappers; registry."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError, NonFiniteError, ShapeError, VocabMismatchError
from kdforge.losses import (
    LOSSES,
    DistillationLoss,
    ForwardKL,
    GeneralizedJSD,
    SparseTeacher,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
)

EXPECTED_NAMES = {"forward_kl", "reverse_kl", "generalized_jsd", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl",
                  "adaptive_kl", "dkd", "cross_entropy", "taid"}


def test_registry_holds_the_contracted_names_with_descriptions():
    assert set(LOSSES.names()) >= EXPECTED_NAMES
    for entry in LOSSES.entries():
        assert entry.description


def test_vocab_mismatch_names_both_sizes_and_suggests_slicing():
    with pytest.raises(VocabMismatchError, match=r"(?s)49216.*49152.*slice"):
        forward_kl(torch.randn(2, 49152), torch.randn(2, 49216))


def test_sparse_teacher_vocab_mismatch_is_a_vocab_error():
    sparse = SparseTeacher.from_logits(torch.randn(2, 12), 3)
    with pytest.raises(VocabMismatchError):
        forward_kl(torch.randn(2, 10), sparse)


def test_position_mismatch_is_a_shape_error():
    with pytest.raises(ShapeError, match="positions"):
        reverse_kl(torch.randn(2, 5, 10), torch.randn(2, 6, 10))
    with pytest.raises(ShapeError, match="mask"):
        forward_kl(torch.randn(2, 5, 10), torch.randn(2, 5, 10), mask=torch.ones(2, 4, dtype=torch.bool))


def test_non_tensor_or_integer_inputs_are_shape_errors():
    with pytest.raises(ShapeError):
        forward_kl(torch.randint(0, 5, (2, 5)), torch.randn(2, 5))
    with pytest.raises(ShapeError):
        forward_kl(torch.randn(2, 5), [1, 2, 3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_student_logits_raise_non_finite_error_with_a_fix(bad):
    s = torch.randn(2, 6)
    s[1, 2] = bad
    with pytest.raises(NonFiniteError, match=r"(?s)student logits.*Fix"):
        forward_kl(s, torch.randn(2, 6))


def test_non_finite_teacher_logits_raise_non_finite_error():
    t = torch.randn(2, 6)
    t[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="teacher"):
        generalized_jsd(torch.randn(2, 6), t)


def test_nan_at_masked_positions_is_ignored():
    s = torch.randn(2, 6)
    s[1] = float("nan")
    out = forward_kl(s, torch.randn(2, 6), mask=torch.tensor([True, False]))
    assert torch.isfinite(out)


def test_bad_options_are_config_errors_listing_choices():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ConfigError, match="mean"):
        forward_kl(s, t, reduction="avg")
    with pytest.raises(ConfigError, match="tail_bucket"):
        forward_kl(s, SparseTeacher.from_logits(t, 2), sparse_policy="drop")
    with pytest.raises(ConfigError):
        forward_kl(s, t, temperature=0.0)
    with pytest.raises(ConfigError):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ConfigError, match="did you mean 'forward_kl'"):
        LOSSES.get("foward_kl")


def test_cross_entropy_needs_integer_labels_in_range():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ShapeError, match="labels"):
        cross_entropy(s)
    with pytest.raises(ShapeError, match="outside"):
        cross_entropy(s, labels=torch.full((2, 3), 7))


def test_cross_entropy_matches_torch_with_ignore_index():
    s = torch.randn(2, 4, 9)
    y = torch.randint(0, 9, (2, 4))
    y[0, :2] = -100
    expected = torch.nn.functional.cross_entropy(s.reshape(-1, 9), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(s, labels=y), expected)
    torch.testing.assert_close(cross_entropy(s, None, labels=y, reduction="sum"), expected * 6)
    assert cross_entropy(s, labels=torch.full((2, 4), -100)).item() == 0.0


def test_module_wrappers_equal_the_functions_and_accept_overrides():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(ForwardKL(temperature=2.0)(s, t), forward_kl(s, t, temperature=2.0))
    crit = GeneralizedJSD(beta=0.2, reduction="sum")
    torch.testing.assert_close(crit(s, t, beta=0.7), generalized_jsd(s, t, beta=0.7, reduction="sum"))
    assert "beta=0.2" in repr(crit)
    torch.testing.assert_close(DistillationLoss("reverse_kl")(s, t), reverse_kl(s, t))
    with pytest.raises(ConfigError):
        DistillationLoss("nope")


@pytest.mark.parametrize("sparse", [False, True])
def test_nan_is_never_silently_dropped_even_without_the_finite_check(sparse):
    s = torch.randn(3, 6)
    s[0, 0] = float("nan")
    t = torch.randn(3, 6)
    teacher = SparseTeacher.from_logits(t, 3) if sparse else t
    for name in LOSSES.names():
        if sparse and not LOSSES.get(name).sparse_ok:  # dkd, the embedding losses: a dense teacher only
            continue
        out = LOSSES.get(name)(s, teacher, labels=torch.tensor([1, 2, 3]), check_finite=False)
        assert torch.isnan(out), name
        with pytest.raises(NonFiniteError):
            LOSSES.get(name)(s, teacher, labels=torch.tensor([1, 2, 3]))
