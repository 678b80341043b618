"""Fidelity metrics of a student against its teacher, accumulated as sums over real positions.

The per-position definitions are :mod:`kdforge.losses.fidelity`'s (one definition in the
library, shared with :mod:`kdforge.eval.fidelity`; the divergences' own kernels, chunked over
positions so that ``[N, V]`` float32 arrays of both models never coexist):
top-1 agreement, ``KL(p_teacher || q_student)`` (``kl_to_teacher``), ``KL(q || p)``
(``kl_from_teacher``) and Jensen-Shannon (``js_to_teacher``), all at temperature 1; for a sparse
top-k teacher, over the top-k tokens plus one tail bucket (a lower bound of the full divergence).
Added here: the label NLL ``-log q(y)`` where ``y != -100`` (perplexity = ``exp(mean NLL)``) and
top-1 correctness.

Sums (not means) are returned so they can be added over batches and processes, then divided once.
"""

from __future__ import annotations

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.losses.fidelity import FIDELITY_KEYS, fidelity_per_position
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.supervised import cross_entropy

#: the teacher-fidelity sums of :func:`fidelity_sums` (the losses layer's fidelity keys)
FIDELITY_SUM_KEYS = FIDELITY_KEYS


@torch.no_grad()
def fidelity_sums(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher | None,
                  mask: torch.Tensor, labels: torch.Tensor | None = None, *,
                  chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Summed fidelity statistics over positions where ``mask`` is true.

    Args:
        student_logits: ``[..., V]``.
        teacher: dense logits ``[..., V]``, ``SparseTeacher`` ``[..., k]`` or None.
        mask: ``[...]`` bool.
        labels: ``[...]`` int64 with ``-100`` for ignored positions, optional.
        chunk_size: positions per chunk of the fidelity computation.

    Returns:
        float64 scalars: ``count``; with a teacher ``agreement``, ``kl_to_teacher``,
        ``kl_from_teacher``, ``js_to_teacher``; with labels ``nll``, ``correct``, ``nll_count``.
    """
    mask = mask.bool()
    device = student_logits.device
    out: dict[str, torch.Tensor] = {"count": mask.sum().double()}
    if teacher is not None:
        per = fidelity_per_position(student_logits, teacher, chunk_size=chunk_size)
        for key in FIDELITY_SUM_KEYS:
            out[key] = torch.where(mask, per[key].double(), torch.zeros((), dtype=torch.float64,
                                                                        device=per[key].device)).sum().to(device)
    if labels is not None:
        valid = mask & (labels != IGNORE_INDEX)
        out["nll"] = cross_entropy(student_logits, None, labels=labels, mask=mask, reduction="sum").double()
        hits = (student_logits.argmax(-1) == labels) & valid
        out["correct"] = hits.double().sum()
        out["nll_count"] = valid.double().sum()
    return out
