"""Stepping TAID's interpolation coefficient during training.

TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge
Transfer in Language Models", ICLR 2025) trains the student towards
``p_t = softmax((1 - t) sg(z_s) + t z_t)`` and raises ``t`` from ``t_start`` to 1 over training
(:class:`kdforge.losses.taid.TAIDSchedule`; the adaptive mode moves faster while the TAID loss
still falls). :class:`TAIDCallback` does the bookkeeping inside a :class:`~kdforge.train.Distiller`:

after every optimizer step ``s`` it reads that step's TAID term value ``J_s`` (the same
``loss/<term>`` number the trainer logs, averaged over the real positions of the whole
accumulated batch and of all processes), calls ``schedule.step(J_s)`` and writes the new ``t``
into the term's ``params["t"]``, so step ``s + 1`` uses it (also in ``chunked`` mode, which reads
the same params). The schedule's state is saved in every checkpoint's ``trainer_state.json``
(callback state) and restored on ``train(resume=True)``, so a resumed run is bit-identical to an
uninterrupted one. On logging steps it adds ``taid/t`` to the train log (``metrics.jsonl``).

Example::

    from kdforge.losses.taid import TAIDSchedule
    from kdforge.train import Distiller, TAIDCallback

    distiller = Distiller(student, teacher, task=CausalLMTask(), config=cfg, train_data=data,
                          objective=[{"name": "taid", "weight": 1.0}])
    TAIDCallback(TAIDSchedule(distiller.state.max_steps, t_start=0.4)).attach(distiller)
    distiller.train()
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from kdforge.errors import ConfigError
from kdforge.losses.taid import TAIDSchedule
from kdforge.train.callbacks import Callback, TrainerState
from kdforge.train.objective import LossTerm, Objective

if TYPE_CHECKING:
    from kdforge.train.distiller import Distiller

log = logging.getLogger(__name__)

__all__ = ["TAIDCallback", "find_taid_term"]


def find_taid_term(objective: Objective, term: str | None = None) -> LossTerm:
    """The objective's ``taid`` loss term: the one logged as ``term``, or the only ``taid`` term.

    Raises:
        ConfigError: no such term, or several ``taid`` terms and ``term`` not given.
    """
    taid_terms = [t for t in objective.terms if t.name == "taid" and t.source == "loss"]
    if term is not None:
        found = [t for t in taid_terms if t.key == term]
        if not found:
            raise ConfigError(
                f"the TAID schedule drives term {term!r}, but the objective has no taid term logged as {term!r} "
                f"(its terms: {', '.join(objective.keys)})",
                "add {name: taid, weight: 1.0} to the objective, or name an existing taid term's label",
            )
        return found[0]
    if not taid_terms:
        raise ConfigError(
            f"a TAID schedule needs a 'taid' term in the objective, which has {', '.join(objective.keys)}",
            "add {name: taid, weight: 1.0} to the objective (or drop the taid schedule)",
        )
    if len(taid_terms) > 1:
        raise ConfigError(
            f"the objective has {len(taid_terms)} taid terms ({', '.join(t.key for t in taid_terms)})",
            "say which one the schedule drives: TAIDCallback(..., term=<its label>)",
        )
    return taid_terms[0]


class TAIDCallback(Callback):
    """Advance a :class:`~kdforge.losses.taid.TAIDSchedule` once per optimizer step.

    Args:
        schedule: the schedule (``total_steps`` usually ``distiller.state.max_steps``).
        term: log key (``label`` or name) of the ``taid`` term to drive; default: the only one.

    Use :meth:`attach` (not ``callbacks=``): it needs the Distiller's objective. Each step's
    TAID term value comes from ``state.step_metrics``. An explicit ``params["t"]`` given in the
    objective is overwritten by the schedule (``schedule.t`` from the first step on).
    """

    def __init__(self, schedule: TAIDSchedule, *, term: str | None = None) -> None:
        if not isinstance(schedule, TAIDSchedule):
            raise ConfigError(f"TAIDCallback needs a TAIDSchedule, got {type(schedule).__name__}",
                              "pass TAIDSchedule(total_steps, t_start=..., mode=...)")
        self.schedule = schedule
        self.term_key = term
        self._term: LossTerm | None = None
        self.history: list[float] = []  # t used at each step since construction (for inspection)

    @property
    def t(self) -> float:
        """The ``t`` the next optimizer step will use."""
        return self.schedule.t

    def attach(self, distiller: Distiller) -> TAIDCallback:
        """Hook into ``distiller``: drive its objective's taid term and see each step's metrics.

        Registers this callback first in ``distiller.callbacks`` (so ``taid/t`` reaches the
        JSONL log) and sets the term's ``t`` to ``schedule.t``. Returns ``self``.
        """
        if any(getattr(cb, "_taid_distiller", None) is distiller for cb in distiller.callbacks):
            raise ConfigError("this Distiller already has a TAIDCallback attached", "attach one schedule per run")
        self._term = find_taid_term(distiller.objective, self.term_key)
        self.term_key = self._term.key
        self._taid_distiller = distiller
        if self.schedule.total_steps != distiller.state.max_steps:
            log.warning("TAID schedule spans %d steps, the run has %d", self.schedule.total_steps,
                        distiller.state.max_steps)
        distiller.callbacks.insert(0, self)
        self._apply()
        return self

    def _apply(self) -> None:
        if self._term is not None:
            self._term.params["t"] = float(self.schedule.t)

    def _global_value(self, state: TrainerState) -> float | None:
        value = state.step_metrics.get(f"loss/{self.term_key}")
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=torch.float32).detach().reshape(())
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # each process holds its share of the global mean: the sum is the step's value, and
            # every process then steps the schedule identically
            value = value.clone()
            torch.distributed.all_reduce(value)
        return float(value.item())

    # -- Callback hooks ------------------------------------------------------------------------
    def on_train_begin(self, state: TrainerState) -> None:
        if self._term is None:
            raise ConfigError("TAIDCallback was passed without being attached to the Distiller",
                              "use TAIDCallback(schedule).attach(distiller) instead of callbacks=[...]")
        self._apply()

    def on_step_end(self, state: TrainerState, logs: dict[str, Any] | None) -> None:
        self.history.append(self.schedule.t)
        value = self._global_value(state)
        if value is None and self.schedule.mode == "adaptive":
            raise ConfigError(f"the step metrics have no 'loss/{self.term_key}' to step the adaptive TAID schedule",
                              "keep the taid term in the objective")
        self.schedule.step(value)
        self._apply()
        if logs is not None:
            logs["taid/t"] = self.schedule.t

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "term": self.term_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
            self._apply()
