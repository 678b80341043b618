"""Fidelity metrics of a student against its teacher, accumulated as sums over real positions.

For each real position ``n`` (mask true):

* agreement: ``1[argmax q_n == argmax p_n]`` (top-1 agreement with the teacher);
* KL to teacher: ``KL(p_n || q_n) = sum_v p_nv (log p_nv - log q_nv)`` at temperature 1. For a
  sparse top-k teacher the distribution is coarsened to the top-k tokens plus one *tail bucket*
  holding the remaining mass on both sides, a lower bound of the full KL that needs no
  ``[N, V]`` teacher tensor;
* NLL of the label: ``-log q_n(y_n)`` where ``y_n != -100`` (perplexity = ``exp(mean NLL)``).

Sums (not means) are returned so they can be added over batches and processes, then divided once.
"""

from __future__ import annotations

import torch

from kdforge.losses.signal import SparseTeacher

IGNORE_INDEX = -100


@torch.no_grad()
def fidelity_sums(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher | None,
                  mask: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Summed fidelity statistics over positions where ``mask`` is true.

    Args:
        student_logits: ``[..., V]``.
        teacher: dense logits ``[..., V]``, ``SparseTeacher`` ``[..., k]`` or None.
        mask: ``[...]`` bool.
        labels: ``[...]`` int64 with ``-100`` for ignored positions, optional.

    Returns:
        float64 scalars ``count``, and when available ``agreement``, ``kl``, ``nll``, ``nll_count``,
        ``correct`` (student top-1 == label).
    """
    mask = mask.bool()
    logq = torch.log_softmax(student_logits[mask].double(), dim=-1)  # [N, V]
    out: dict[str, torch.Tensor] = {"count": mask.sum().double()}
    if teacher is not None:
        if isinstance(teacher, SparseTeacher):
            ids = teacher.ids[mask].long()
            logp = teacher.logprobs[mask].double()
            top = ids.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)
            logq_k = logq.gather(-1, ids)
            p = logp.exp()
            kl = (p * (logp - logq_k)).sum(-1)
            tail_p = (1.0 - p.sum(-1)).clamp_min(0.0)
            tail_q = (1.0 - logq_k.exp().sum(-1)).clamp_min(1e-30)
            kl = kl + torch.where(tail_p > 0, tail_p * (tail_p.clamp_min(1e-30).log() - tail_q.log()),
                                  torch.zeros_like(tail_p))
        else:
            logp = torch.log_softmax(teacher[mask].double(), dim=-1)
            top = logp.argmax(-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
        out["agreement"] = (logq.argmax(-1) == top).double().sum()
        out["kl"] = kl.sum()
    if labels is not None:
        y = labels[mask]
        valid = y != IGNORE_INDEX
        if bool(valid.any()):
            nll = -logq[valid].gather(-1, y[valid].unsqueeze(-1)).squeeze(-1)
            out["nll"] = nll.sum()
            out["correct"] = (logq[valid].argmax(-1) == y[valid]).double().sum()
        else:
            out["nll"] = torch.zeros((), dtype=torch.float64, device=logq.device)
            out["correct"] = torch.zeros((), dtype=torch.float64, device=logq.device)
        out["nll_count"] = valid.double().sum()
    return out
