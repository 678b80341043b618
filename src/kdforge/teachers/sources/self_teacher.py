""":class:`SelfTeacher`: the student itself as its teacher, an EMA copy or a periodic snapshot.

* ``mode="ema"`` (mean teacher, Tarvainen & Valpola, 2017; the momentum teacher of BYOL/DINO):
  after every ``every``-th optimizer step, for every parameter and floating-point buffer,

      ``ema = decay * ema + (1 - decay) * student``

  computed as ``ema.mul_(decay).add_(student, alpha=1 - decay)`` under ``no_grad``, so
  ``decay=1`` keeps the initial weights bit for bit and ``decay=0`` copies the student exactly.
  Integer buffers (``num_batches_tracked``) and non-persistent buffers (derived constants such as
  rotary ``inv_freq``, which a resumed run rebuilds) are copied.
* ``mode="snapshot"`` (born-again / self-distillation from an earlier self): the student's weights
  are copied into the teacher every ``every`` optimizer steps, or whenever :meth:`refresh` is
  called (at epoch ends, from a callback).

The copy is made once with ``copy.deepcopy`` of the (unwrapped) student, frozen and in eval
mode, and lives on the student's device (the trainer's :meth:`place`). As a source it gives what
:class:`~kdforge.teachers.online.OnlineTeacher` gives (dense logits at the loss positions, and
captured features): it *is* an online teacher over the copy. :meth:`state_dict` carries the copy's
weights and the counters, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import CheckpointError, ConfigError, ShapeError
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["SELF_TEACHER_MODES", "SelfTeacher"]

SELF_TEACHER_MODES = ("ema", "snapshot")
_MODEL = "model."  # state_dict prefix of the copy's tensors


class SelfTeacher(TeacherSource):
    """The student as its own teacher (see the module docstring).

    Args:
        student: the student model (unwrapped: not a DDP/FSDP wrapper); copied at construction.
        mode: ``"ema"`` or ``"snapshot"``.
        decay: EMA decay in ``[0, 1]`` (``mode="ema"``).
        every: update period in optimizer steps: the EMA is updated, or the snapshot refreshed,
            when ``step % every == 0`` (default 1 for ``ema``; for ``snapshot`` None = only on
            :meth:`refresh`).
        vocab_size: slice the copy's logits to ``[..., :vocab_size]`` (as ``OnlineTeacher``).
    """

    provides = frozenset({"dense", "features"})
    scores_new_samples = True

    def __init__(self, student: nn.Module, mode: str = "ema", decay: float = 0.999, every: int | None = None,
                 *, vocab_size: int | None = None) -> None:
        from kdforge.teachers.online import OnlineTeacher

        if mode not in SELF_TEACHER_MODES:
            raise ConfigError(f"unknown SelfTeacher mode {mode!r}", f"use one of {', '.join(SELF_TEACHER_MODES)}")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"SelfTeacher decay must lie in [0, 1], got {decay}", "use e.g. decay=0.999")
        if every is not None and every < 1:
            raise ConfigError(f"SelfTeacher every must be >= 1 optimizer steps, got {every}",
                              "use every=1 (every step), a larger period, or None (snapshot: refresh() only)")
        if not isinstance(student, nn.Module):
            raise ConfigError(f"SelfTeacher needs the student nn.Module, got {type(student).__name__}",
                              "pass the (unwrapped) student model")
        self.mode, self.decay = mode, float(decay)
        self.every = every if (every is not None or mode == "snapshot") else 1
        self.updates = 0  # EMA updates / snapshot refreshes applied
        self.last_step: int | None = None
        with torch.no_grad():
            model = copy.deepcopy(student)
        for p in model.parameters():
            p.grad = None  # a frozen copy needs no gradient buffers
        self._online = OnlineTeacher(model, vocab_size=vocab_size, name=f"self-{mode}")
        self.model = self._online.model

    def __repr__(self) -> str:
        return f"SelfTeacher(mode={self.mode!r}, decay={self.decay}, every={self.every}, updates={self.updates})"

    # -- TeacherSource -----------------------------------------------------------------------------
    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        """Dense logits of the EMA/snapshot copy at ``task``'s loss positions (as ``OnlineTeacher``)."""
        return self._online.signal(batch, task, features=features)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def place(self, device: torch.device | str) -> None:
        self.model.to(device)

    def on_step_end(self, student: nn.Module, step: int) -> None:
        """Update the EMA (or refresh the snapshot) when ``step % every == 0``."""
        self.last_step = int(step)
        if self.every is None or step % self.every:
            return
        if self.mode == "ema":
            self._ema_update(student)
        else:
            self._copy_from(student)
        self.updates += 1

    def refresh(self, student: nn.Module) -> None:
        """Copy the student's weights into the teacher now (e.g. at an epoch end)."""
        self._copy_from(student)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Flat: the copy's tensors as ``"model.<name>"`` (cloned to CPU, so later steps do not change a
        saved state; the checkpoint stores them as safetensors) and JSON-able settings and counters."""
        state: dict[str, Any] = {"mode": self.mode, "decay": self.decay, "every": self.every,
                                 "updates": self.updates, "last_step": self.last_step}
        for k, v in self.model.state_dict().items():
            state[_MODEL + k] = v.detach().to("cpu", copy=True)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise CheckpointError(f"the checkpoint holds a SelfTeacher in mode {state.get('mode')!r}, not {self.mode!r}",
                                  "resume with the same self-teacher settings the run was started with")
        weights = {k[len(_MODEL):]: v for k, v in state.items() if k.startswith(_MODEL)}
        try:
            self.model.load_state_dict(weights)  # copies into the tensors on their device, bit for bit
        except RuntimeError as exc:
            raise CheckpointError(f"the checkpoint's self-teacher weights do not fit this student: "
                                  f"{str(exc).splitlines()[0]}",
                                  "resume with the same student architecture the run was started with") from None
        self.updates, self.last_step = int(state["updates"]), state.get("last_step")

    # -- updates -----------------------------------------------------------------------------------
    def _pairs(self, student: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher tensor, student tensor) for every parameter and buffer, matched by name."""
        mine = dict(self.model.named_parameters())
        mine.update(self.model.named_buffers())
        theirs = dict(student.named_parameters())
        theirs.update(student.named_buffers())
        if mine.keys() != theirs.keys():
            missing, extra = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
            raise ShapeError(
                f"the student's tensors no longer match the self-teacher copy (missing {missing[:3]}, new {extra[:3]})",
                "pass the unwrapped student (accelerator.unwrap_model(model)) that the SelfTeacher was built from",
            )
        return [(t, theirs[name]) for name, t in mine.items()]

    @torch.no_grad()
    def _ema_update(self, student: nn.Module) -> None:
        saved = {id(t) for t in self.model.state_dict(keep_vars=True).values()}
        for ema, cur in self._pairs(student):
            cur = cur.detach().to(ema.device)
            # non-persistent buffers (rotary inv_freq...) are derived constants, rebuilt on resume:
            # copied, so that averaging's rounding cannot make a resumed run differ
            if ema.is_floating_point() and id(ema) in saved:
                ema.mul_(self.decay).add_(cur.to(ema.dtype), alpha=1.0 - self.decay)
            else:
                ema.copy_(cur)

    @torch.no_grad()
    def _copy_from(self, student: nn.Module) -> None:
        for mine, cur in self._pairs(student):
            mine.copy_(cur.detach())
