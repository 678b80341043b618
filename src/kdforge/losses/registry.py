"""The loss registry: config name -> :class:`~kdforge.losses.spec.LossSpec`.

Every entry is a spec registered with :func:`~kdforge.losses.spec.register_loss`; a spec is
callable and forwards to its function, whose signature is uniform::

    fn(student_logits, teacher, *, mask=None, temperature=1.0, reduction="mean",
       labels=None, **params) -> Tensor

so a trainer can call any of them the same way (``labels`` is ignored by losses that do not
need it, ``teacher`` by ``cross_entropy``); what each loss needs is declared on its spec
(``needs_labels``, ``sparse_ok``, ...).
"""

from __future__ import annotations

from typing import Any

from kdforge.registry import Registry

#: holds :class:`kdforge.losses.spec.LossSpec` objects (typed ``Any`` here: spec.py imports this
#: module, so naming LossSpec would be an import cycle, even under TYPE_CHECKING)
LOSSES: Registry[Any] = Registry("loss")
