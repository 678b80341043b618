"""Distillation losses: pure functions, one file per family, all registered in :data:`LOSSES`.

Where is ...?

* forward / reverse KL, (generalised) JSD, TVD, skew KL, adaptive KL -> :mod:`.divergences`
* cross-entropy with labels -> :mod:`.supervised`
* the teacher signal (dense logits or sparse top-k) -> :mod:`.signal`

Every registered loss is called the same way::

    LOSSES.get(name)(student_logits, teacher, mask=m, reduction="sum", temperature=T, labels=y, **params)
"""

from kdforge.losses.divergences import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kdforge.losses.registry import LOSSES
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.supervised import IGNORE_INDEX, cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "SparseTeacher",
    "adaptive_kl",
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]
