"""The teacher-hacking monitor as a ``transformers.TrainerCallback``.

Wraps :class:`kdforge.eval.monitor.TeacherHackingMonitor` (Tiapkin et al., 2025: the distance to
the teacher keeps falling while the distance to the ground truth rises). Hugging Face names
evaluation metrics ``eval_<name>``; the callback reads them as kdforge's ``eval/<name>``, so the
monitor's default curves are ``eval_kl_to_teacher`` and ``eval_nll`` — the two metrics
:class:`~kdforge.integrations.hf_trainer.KDTrainer` adds to every evaluation. With another
trainer, pass ``teacher_key`` / ``oracle_key`` (kdforge or HF spelling) of metrics you compute.

At each evaluation it adds ``eval_teacher_hacking`` (1.0 / 0.0) and the two fitted changes to the
metrics dict (returned by ``trainer.evaluate()``) and to ``state.log_history`` (saved in
``trainer_state.json``), logs a warning when flagged, and with ``stop=True`` ends training. Its
history is saved in checkpoints (``ExportableState``) so a resumed run keeps the trend.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from kdforge.eval.monitor import FLAG_KEY, TeacherHackingMonitor

__all__ = ["TeacherHackingCallback"]

log = logging.getLogger(__name__)


def _kdforge_key(key: str) -> str:
    """``eval_kl_to_teacher`` -> ``eval/kl_to_teacher`` (kdforge names pass through)."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else key


def _hf_key(key: str) -> str:
    """``eval/teacher_hacking/oracle_change`` -> ``eval_teacher_hacking_oracle_change``."""
    return key.replace("/", "_")


class TeacherHackingCallback(TrainerCallback, ExportableState):
    """Flag teacher hacking from a Trainer's evaluation metrics.

    Args:
        teacher_key: metric of the distance to the teacher (default: ``eval_kl_to_teacher``,
            then the other :data:`~kdforge.eval.monitor.TEACHER_KEYS`).
        oracle_key: metric of the distance to the ground truth (default: ``eval_nll``, then
            the other :data:`~kdforge.eval.monitor.ORACLE_KEYS`; ``eval_loss`` is *not* a
            default: under KDTrainer it is the distillation loss).
        window, tolerance, teacher_tolerance: as in :class:`TeacherHackingMonitor`.
        stop: end training (``control.should_training_stop``) at the first flag.
    """

    def __init__(self, teacher_key: str | None = None, oracle_key: str | None = None, *, window: int = 3,
                 tolerance: float = 0.01, teacher_tolerance: float = 0.0, stop: bool = False) -> None:
        self.args = {"teacher_key": teacher_key, "oracle_key": oracle_key, "window": window,
                     "tolerance": tolerance, "teacher_tolerance": teacher_tolerance, "stop": stop}
        self.stop = stop
        self.monitor = TeacherHackingMonitor(
            _kdforge_key(teacher_key) if teacher_key else None, _kdforge_key(oracle_key) if oracle_key else None,
            window, tolerance, teacher_tolerance,
        )

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> Any:
        if not metrics:
            return control
        check = self.monitor.update(state.global_step, {_kdforge_key(k): v for k, v in metrics.items()})
        if check is None:
            return control
        added = {
            _hf_key(FLAG_KEY): 1.0 if check.flagged else 0.0,
            _hf_key(f"{FLAG_KEY}/teacher_change"): check.teacher_change,
            _hf_key(f"{FLAG_KEY}/oracle_change"): check.oracle_change,
        }
        metrics.update(added)
        state.log_history.append({**added, "step": state.global_step})
        if check.flagged:
            log.warning(
                "possible teacher hacking at step %d: %s fell %.1f%% while %s rose %.1f%% over the last %d "
                "evaluations; best %s so far at step %s. Consider more diverse or on-policy data, or stopping there.",
                check.step, self.monitor.teacher_key, -100 * check.teacher_change, self.monitor.oracle_key,
                100 * check.oracle_change, self.monitor.window, self.monitor.oracle_key,
                self.monitor.best_oracle_step,
            )
            if self.stop:
                control.should_training_stop = True
        return control

    # ---- checkpointed state (transformers.trainer_callback.ExportableState) ---------------------

    @property
    def monitor_state(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    @monitor_state.setter
    def monitor_state(self, value: dict[str, Any]) -> None:
        self.monitor.load_state_dict(value)

    def state(self) -> dict[str, Any]:
        return {"args": dict(self.args), "attributes": {"monitor_state": self.monitor_state}}
