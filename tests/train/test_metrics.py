import math

import torch

from kdforge.losses.signal import SparseTeacher
from kdforge.train import fidelity_sums


def test_fidelity_sums_match_hand_computed_kl_agreement_and_nll_over_real_positions():
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    labels[1, 3] = -100
    mask = labels != -100
    out = fidelity_sums(s, t, mask, labels)
    p, logq = torch.softmax(t, -1), torch.log_softmax(s, -1)
    kl = (p * (p.log() - logq)).sum(-1)
    assert out["count"].item() == 7
    assert math.isclose(out["kl_to_teacher"].item(), kl[mask].sum().item(), rel_tol=1e-5)
    agree = (s.argmax(-1) == t.argmax(-1))[mask].sum().item()
    assert out["agreement"].item() == agree
    nll = -logq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].sum()
    assert math.isclose(out["nll"].item(), nll.item(), rel_tol=1e-5)


def test_sparse_teacher_with_k_equal_vocab_gives_the_dense_kl():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, dtype=torch.bool)
    dense = fidelity_sums(s, t, mask)
    sparse = fidelity_sums(s, SparseTeacher.from_logits(t, 5), mask)
    for key in ("kl_to_teacher", "agreement"):
        assert math.isclose(dense[key].item(), sparse[key].item(), rel_tol=1e-4, abs_tol=1e-6)
