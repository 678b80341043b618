"""The :class:`TeacherSource` contract: ``source.signal(batch, task) -> TeacherSignal``.

One object decides where the teacher's signal comes from (a live model, a cache, a server, an
ensemble, the student itself); the trainer asks it once per micro-batch and never looks at batch
keys to guess. A source:

* ``signal(batch, task, features=None)`` returns a :class:`~kdforge.teachers.signal.TeacherSignal`
  at the task's loss positions (``task.model_inputs`` gives the model call, ``task.to_loss_positions``
  the alignment), optionally with the intermediate ``features`` a
  :class:`~kdforge.features.taps.FeatureRequest` asks for;
* ``provides`` names the signal kinds it can give (``"dense"``, ``"sparse"``, ``"features"``);
* ``scores_new_samples`` says whether it can score sequences that are not in the dataset (on-policy
  GKD needs that: a live or served teacher can, a cache cannot);
* ``place(device)`` puts its frozen modules on the trainer's device (unless it has its own),
  ``modules()`` lists them (frozen, eval mode, never wrapped by accelerate);
* ``on_step_end(student, step)`` runs after each optimizer step (an EMA teacher updates there);
  ``state_dict()`` / ``load_state_dict()`` make that state part of every checkpoint.

Adding a source = one new file with a subclass, plus one line in ``sources/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.teachers.signal import TeacherSignal

__all__ = ["TeacherSource"]


class TeacherSource:
    """Base class of teacher sources (see the module docstring)."""

    provides: frozenset[str] = frozenset()
    scores_new_samples: bool = False

    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        return []

    def place(self, device: torch.device | str) -> None:
        """Move the source's frozen modules to ``device`` (default: nothing to move)."""

    def on_step_end(self, student: nn.Module, step: int) -> None:
        """Called after every optimizer step with the (unwrapped) student."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (no state by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
