"""The loss registry: config name -> loss function.

Every registered loss has the uniform signature::

    fn(student_logits, teacher, *, mask=None, temperature=1.0, reduction="mean",
       labels=None, **params) -> Tensor

so a trainer can call any of them the same way (``labels`` is ignored by losses that do not
need it, ``teacher`` by ``cross_entropy``).
"""

from __future__ import annotations

from collections.abc import Callable

from kdforge.registry import Registry

LOSSES: Registry[Callable] = Registry("loss")
