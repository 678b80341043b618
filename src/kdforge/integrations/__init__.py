"""kdforge inside other trainers: Hugging Face ``Trainer`` and TRL (docs/integrations.md).

Where is ...?

* the loss of a Trainer batch (causal shift, ``num_items_in_batch``) -> :mod:`.loss`
* ``KDTrainer`` / ``KDLossMixin`` (``compute_loss`` that distils) -> :mod:`.hf_trainer`
* the teacher-hacking monitor as a ``TrainerCallback`` -> :mod:`.callbacks`
* padding examples together with their cached top-k -> :mod:`.collator`

``transformers`` is imported only when a Trainer-side name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdforge.integrations.collator import KDCollator
from kdforge.integrations.loss import (
    KDLossOutput,
    distillation_loss,
    distillation_loss_from_hidden,
    sparse_teacher_from_batch,
)

_LAZY = {
    "KDTrainer": "kdforge.integrations.hf_trainer",
    "KDLossMixin": "kdforge.integrations.hf_trainer",
    "TeacherHackingCallback": "kdforge.integrations.callbacks",
}

__all__ = [
    "KDCollator",
    "KDLossMixin",
    "KDLossOutput",
    "KDTrainer",
    "TeacherHackingCallback",
    "distillation_loss",
    "distillation_loss_from_hidden",
    "sparse_teacher_from_batch",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdforge.integrations' has no attribute {name!r}")
