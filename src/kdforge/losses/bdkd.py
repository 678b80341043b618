"""BD-KD: balanced forward and reverse KL, weighted per sample by the two models' entropies.

Amara et al., *BD-KD: Balancing the Divergences for Online Knowledge Distillation* (2022): the
student's distillation loss is a sample-wise mix of the forward and the reverse KL,

    ``BDKD = T^2 * (w_f * KL(p || q) + w_r * KL(q || p))``,

with ``p`` the teacher and ``q`` the student at temperature ``T`` and the weights chosen from the
entropies ``H(q)``, ``H(p)`` of the sample (no gradient flows through the weights):

* student **more confident** than the teacher (``H(q) < H(p)``): ``(w_f, w_r) = (low, high)`` —
  the weight moves toward the reverse KL;
* otherwise: ``(w_f, w_r) = (high, low)``.

With ``high == low`` it is a fixed sum of the two divergences. The paper pairs it with online KD
(the teacher trains too, with the reverse KL as its regulariser): in kdforge that is the
``mutual`` teacher source (:class:`kdforge.teachers.sources.MutualTeacher`) with this loss as the
student's term and ``reverse_kl`` among the peer's terms; it is also usable with a frozen teacher.
"""

from __future__ import annotations

import torch

from kdforge.errors import ConfigError
from kdforge.losses._core import SparsePolicy, Teacher, distill, kl
from kdforge.losses.spec import register_loss

__all__ = ["bdkd", "bdkd_weights"]


def _entropy(logd: torch.Tensor) -> torch.Tensor:
    live = ~torch.isneginf(logd)
    safe = torch.where(live, logd, 0.0)
    return -(torch.where(live, safe.exp() * safe, 0.0)).sum(-1)


def bdkd_weights(logq: torch.Tensor, logp: torch.Tensor, high: float = 1.5, low: float = 0.5
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_f, w_r)`` per position ``[n]`` from the log-distributions ``logq`` (student) and ``logp``
    (teacher), ``[n, V]``: ``(low, high)`` where ``H(q) < H(p)``, else ``(high, low)``."""
    with torch.no_grad():
        confident = _entropy(logq) < _entropy(logp)
        w_f = torch.where(confident, low, high).to(logq.dtype)
        w_r = torch.where(confident, high, low).to(logq.dtype)
    return w_f, w_r


@register_loss("bdkd", description="BD-KD: per-sample forward/reverse KL weights from the two entropies (online KD)",
               paper="Amara et al. 2022, BD-KD: Balancing the Divergences for Online Knowledge Distillation",
               sparse_ok=True)
def bdkd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    high: float = 1.5,
    low: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """BD-KD, ``T^2 * (w_f KL(p||q) + w_r KL(q||p))`` with entropy-chosen weights (module docstring).

    Args:
        student_logits: ``[..., V]``.
        teacher: dense logits ``[..., V]`` or a ``SparseTeacher`` (divergences and entropies on the
            top-k plus tail buckets).
        high, low: the two weights (``>= 0``); the larger goes to the reverse KL where the student
            is more confident (lower entropy) than the teacher, to the forward KL elsewhere.
        mask, temperature, reduction, labels, sparse_policy, check_finite: as :func:`forward_kl`.
    """
    if not (high >= 0 and low >= 0):
        raise ConfigError(f"bdkd weights must be >= 0, got high={high}, low={low}", "use e.g. high=1.5, low=0.5")

    def kernel(logq: torch.Tensor, logp: torch.Tensor, safe: bool = True) -> torch.Tensor:
        w_f, w_r = bdkd_weights(logq, logp, high, low)
        return w_f * kl(logp, logq, safe) + w_r * kl(logq, logp, safe)

    return distill("bdkd", kernel, student_logits, teacher, mask=mask, temperature=temperature,
                   reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)
