"""Per-position fidelity (kdforge.losses.fidelity) is the losses' own divergences at T = 1."""

from __future__ import annotations

import math

import torch

from kdforge.losses import SparseTeacher, forward_kl, jsd, reverse_kl
from kdforge.losses.fidelity import FIDELITY_KEYS, fidelity_per_position
from kdforge.losses.signal import sample_tail


def test_fidelity_equals_the_registered_losses_per_position_for_dense_and_sparse_teachers():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 21, generator=g), torch.randn(3, 4, 21, generator=g) * 2
    for teacher in (t, SparseTeacher.from_logits(t, 5)):
        per = fidelity_per_position(s, teacher, chunk_size=5)
        assert set(per) == set(FIDELITY_KEYS) and all(v.shape == (3, 4) for v in per.values())
        torch.testing.assert_close(per["kl_to_teacher"], forward_kl(s, teacher, reduction="none"))
        torch.testing.assert_close(per["kl_from_teacher"], reverse_kl(s, teacher, reduction="none"))
        torch.testing.assert_close(per["js_to_teacher"], jsd(s, teacher, reduction="none"))
        torch.testing.assert_close(per["agreement"], (s.argmax(-1) == t.argmax(-1)).float())


def test_a_sampled_tail_teacher_counts_by_its_exact_top_k_entries():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 6, 30, generator=g), torch.randn(1, 6, 30, generator=g) * 2
    sampled, _ = sample_tail(t, 4, 8, [3])
    per = fidelity_per_position(s, sampled)
    top = fidelity_per_position(s, SparseTeacher.from_logits(t, 4))
    for key in FIDELITY_KEYS:
        torch.testing.assert_close(per[key], top[key])
        assert torch.isfinite(per[key]).all()
    assert float(per["js_to_teacher"].max()) <= math.log(2) + 1e-6


def test_the_unguarded_path_for_finite_logits_equals_the_safe_kernels_and_zeros_take_the_safe_one():
    from kdforge.losses.divergences import fkl_kernel, gjsd_kernel, rkl_kernel
    from kdforge.losses.fidelity import fidelity_chunk

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(16, 50, generator=g) * 30, torch.randn(16, 50, generator=g) * 30  # near one-hot rows
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    fast = fidelity_chunk(s, t)  # finite log-probabilities: the kernels' unguarded path
    torch.testing.assert_close(fast["kl_to_teacher"], fkl_kernel(logq, logp, safe=True))
    torch.testing.assert_close(fast["kl_from_teacher"], rkl_kernel(logq, logp, safe=True))
    torch.testing.assert_close(fast["js_to_teacher"], gjsd_kernel(logq, logp, 0.5, safe=True))
    t_masked = t.clone()
    t_masked[:, :10] = -math.inf  # zero-probability teacher entries: the safe path answers
    out = fidelity_chunk(s, t_masked)
    assert torch.isfinite(out["kl_to_teacher"]).all() and torch.isfinite(out["js_to_teacher"]).all()
    torch.testing.assert_close(out["kl_to_teacher"], forward_kl(s, t_masked, reduction="none"))
    torch.testing.assert_close(out["js_to_teacher"], jsd(s, t_masked, reduction="none"))
