"""Method keys of the ``llm_kd`` recipe for the MiniLLM and EMA self-distillation regimes.

``llm_kd`` (:mod:`kdforge.recipes.llm_kd`) only registers the keys; what they mean lives here:

* ``minillm: {alpha, length_norm, max_new_tokens, prompt_tokens}`` — MiniLLM (Gu et al., ICLR
  2024, :mod:`kdforge.train.minillm`): every batch's completions are sampled from
  ``alpha * p_teacher + (1 - alpha) * q_student`` after the first ``prompt_tokens`` tokens of each
  block, the online teacher scores them and the objective's ``minillm`` term (whose ``alpha`` and
  ``length_norm`` are filled from this key) gives the policy gradient of the reverse KL;
* ``teacher: ema`` with ``ema: {decay, every}`` — EMA self-distillation (mean teacher): the
  teacher is an exponential moving average of the student
  (:class:`kdforge.teachers.sources.SelfTeacher`, updated after every ``every``-th optimizer
  step), starting as a copy of the untrained student; the objective's distillation terms read
  its dense logits. The SmolLM2 teacher of the run is still the reference of the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field
from torch import nn

from kdforge.config import StrictModel
from kdforge.train.minillm import MiniLLMConfig, minillm_objective, minillm_setup
from kdforge.train.objective import LossTerm

__all__ = ["EMASpec", "MiniLLMSpec", "Regime", "check_method", "method_regime"]


class MiniLLMSpec(MiniLLMConfig):
    """MiniLLM for one method (:class:`kdforge.train.minillm.MiniLLMConfig`) plus the prompt split:
    each training block's first ``prompt_tokens`` tokens are the prompt, the student (mixed with the
    teacher) writes ``max_new_tokens`` tokens after it."""

    prompt_tokens: int = Field(32, ge=1, description="leading tokens of each block used as the prompt")

    def to_config(self) -> MiniLLMConfig:
        return MiniLLMConfig(**self.model_dump(exclude={"prompt_tokens"}))


class EMASpec(StrictModel):
    """The EMA teacher of ``teacher: ema`` (:class:`kdforge.teachers.sources.SelfTeacher`):
    ``ema = decay * ema + (1 - decay) * student`` after every ``every``-th optimizer step."""

    decay: float = Field(0.99, ge=0.0, le=1.0, description="EMA decay (0 = the student itself, 1 = frozen at init)")
    every: int = Field(1, ge=1, description="update period in optimizer steps")


def check_method(method: Any) -> None:
    """Raise ``ValueError`` (a pydantic validation message) for an inconsistent use of the keys.

    ``method`` is an ``llm_kd`` ``MethodSpec`` (fields ``teacher``, ``on_policy``, ``minillm``, ``ema``,
    ``objective``).
    """
    minillm, ema = getattr(method, "minillm", None), getattr(method, "ema", None)
    if minillm is not None:
        if method.on_policy is not None:
            raise ValueError("minillm and on_policy both sample completions; keep one of them")
        if method.teacher in ("cache", "ema"):
            raise ValueError(f"teacher: {method.teacher} cannot be used with minillm (it samples with and is "
                             "scored by the online teacher); remove the teacher key")
        if not any(t.name == "minillm" and t.source == "loss" for t in method.objective):
            raise ValueError("minillm: the objective needs a term {name: minillm, weight: 1.0} (the policy-gradient "
                             "loss), or remove the minillm key")
        try:
            minillm_objective(method.objective, minillm.to_config())
        except Exception as exc:  # noqa: BLE001 - a ConfigError: its problem and fix
            raise ValueError(f"minillm: {getattr(exc, 'problem', exc)}; {getattr(exc, 'fix', '')}".rstrip("; ")) from None
    if ema is not None and method.teacher != "ema":
        raise ValueError("ema: settings of an EMA teacher, but the method's teacher is not ema; "
                         "add teacher: ema or remove the ema key")
    if method.teacher == "ema" and method.on_policy is not None:
        raise ValueError("teacher: ema with on_policy is not supported by llm_kd; use the Python API "
                         "(Distiller(student, SelfTeacher(student), on_policy=...))")


@dataclass
class Regime:
    """What one method's regime hands the recipe's ``Distiller``.

    Attributes:
        teacher: the teacher to pass (None: the recipe's live teacher).
        objective: the method's objective terms (MiniLLM's filled in).
        prompt_tokens: the prompt split of the blocks (None: whole blocks are trained on).
        kwargs: further ``Distiller`` keywords (``on_policy``, ``generate_fn``).
    """

    teacher: Any
    objective: list[LossTerm]
    prompt_tokens: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def method_regime(method: Any, student: nn.Module, live_teacher: Any) -> Regime | None:
    """The :class:`Regime` of a MiniLLM or EMA method, None for every other method.

    Args:
        method: the ``llm_kd`` ``MethodSpec``.
        student: the student this sub-run trains (the EMA teacher starts as its copy).
        live_teacher: what the recipe passes as the online teacher (a module or a pinned source).
    """
    if getattr(method, "minillm", None) is not None:
        cfg = method.minillm.to_config()
        return Regime(None, minillm_objective(method.objective, cfg), method.minillm.prompt_tokens,
                      minillm_setup(cfg, live_teacher))
    if method.teacher == "ema":
        from kdforge.teachers.sources import SelfTeacher

        spec = method.ema or EMASpec()
        return Regime(SelfTeacher(student, mode="ema", decay=spec.decay, every=spec.every), list(method.objective))
    return None
