"""Classification metrics checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.errors import ShapeError
from kdforge.eval.classification import (
    accuracy,
    classification_metrics,
    expected_calibration_error,
    kl_to_teacher,
    per_class_accuracy,
    predict_logits,
    reliability_bins,
    top1_agreement,
)


def logits_with_confidence(confidences, preds, num_classes=2):
    """Logits whose softmax has top-1 probability ``c`` on class ``pred`` (2 classes)."""
    rows = []
    for c, p in zip(confidences, preds):
        z = torch.zeros(num_classes)
        z[p] = math.log(c / (1 - c))  # 2-class softmax: p = sigmoid(z_p - z_other)
        rows.append(z)
    return torch.stack(rows)


def test_accuracy_counts_correct_rows_and_skips_ignore_index():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    assert accuracy(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.75)
    assert accuracy(logits, torch.tensor([0, -100, 0, 1])) == pytest.approx(1.0)
    assert accuracy(torch.tensor([1, 1]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert math.isnan(accuracy(logits, torch.full((4,), -100)))


def test_top1_agreement_is_fraction_of_equal_argmax():
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    teacher = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 9.0], [0.0, 2.0, 0.0]])
    assert top1_agreement(student, teacher) == pytest.approx(0.5)
    with pytest.raises(ShapeError):
        top1_agreement(student, teacher[:3])


def test_ece_matches_hand_computed_value():
    # 4 predictions at confidence 0.9 (3 correct) and 2 at 0.62 (1 correct), 15 bins:
    # bin of 0.9: |0.75 - 0.9| * 4/6 = 0.1 ; bin of 0.62: |0.5 - 0.62| * 2/6 = 0.04
    logits = logits_with_confidence([0.9] * 4 + [0.62] * 2, [0, 0, 0, 0, 1, 1])
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    assert expected_calibration_error(logits, labels, n_bins=15) == pytest.approx(0.1 + 0.04, abs=1e-5)


def test_ece_puts_different_confidences_in_different_bins():
    # one bin holding both: accuracy 1/2, mean confidence 0.75 -> |0.5 - 0.75| = 0.25;
    # separate bins: (|1 - 0.95| + |0 - 0.55|) / 2 = 0.30
    logits = logits_with_confidence([0.95, 0.55], [0, 0])
    assert expected_calibration_error(logits, torch.tensor([0, 1]), n_bins=15) == pytest.approx(0.30, abs=1e-5)
    assert expected_calibration_error(logits, torch.tensor([0, 1]), n_bins=1) == pytest.approx(0.25, abs=1e-5)


def test_perfectly_calibrated_bins_give_zero_ece():
    logits = logits_with_confidence([0.75] * 4, [0, 0, 0, 0])
    assert expected_calibration_error(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-6)


def test_reliability_bins_are_equal_width_right_closed():
    # confidence 0.62 = 9.3/15 belongs to bin 9 ((9/15, 10/15]), 0.9 = 13.5/15 to bin 13
    bins = reliability_bins(logits_with_confidence([0.62, 0.9, 0.9], [0, 1, 1]), torch.tensor([0, 1, 0]), n_bins=15)
    assert len(bins.count) == 15 and bins.lower[0] == 0.0 and bins.upper[-1] == 1.0
    assert bins.count[9] == 1 and bins.count[13] == 2 and sum(bins.count) == 3
    assert bins.accuracy[13] == pytest.approx(0.5) and bins.confidence[13] == pytest.approx(0.9, abs=1e-6)
    assert math.isnan(bins.accuracy[0])
    as_dict = bins.to_dict()
    assert as_dict["bin_accuracy"][0] is None and as_dict["bin_count"][13] == 2


def test_per_class_accuracy_is_recall_per_class_with_nan_for_absent_class():
    preds = torch.tensor([0, 0, 1, 1, 1])
    labels = torch.tensor([0, 1, 1, 1, 0])
    acc = per_class_accuracy(preds, labels, num_classes=3)
    assert acc[0] == pytest.approx(0.5) and acc[1] == pytest.approx(2 / 3) and math.isnan(acc[2])


def test_kl_to_teacher_is_zero_for_identical_and_positive_otherwise():
    z = torch.randn(5, 4)
    assert kl_to_teacher(z, z) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(teacher || student)
    assert kl_to_teacher(q.log(), p.log()) == pytest.approx(expected, abs=1e-6)


def test_classification_metrics_bundle_has_all_keys_and_works_in_bf16():
    logits = torch.randn(50, 10).bfloat16()
    labels = torch.randint(0, 10, (50,))
    out = classification_metrics(logits, labels, teacher_logits=logits.float())
    assert set(out) == {"accuracy", "ece", "nll", "per_class_accuracy", "reliability", "agreement", "kl_to_teacher"}
    assert out["agreement"] == pytest.approx(1.0)
    assert len(out["per_class_accuracy"]) == 10 and len(out["reliability"]["bin_count"]) == 15


def test_predict_logits_batches_and_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    model.train()
    x = torch.randn(10, 2, 2)
    out = predict_logits(model, x, batch_size=3)
    assert out.shape == (10, 3) and model.training
    model.eval()
    assert torch.allclose(out, model(x))


def test_wrong_label_shape_raises_shape_error():
    with pytest.raises(ShapeError):
        accuracy(torch.randn(4, 3), torch.tensor([0, 1]))
