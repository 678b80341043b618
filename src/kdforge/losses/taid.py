"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025).

Instead of the teacher, the student chases an *intermediate* distribution that moves from
itself to the teacher as training progresses:

``p_t = softmax((1 - t) * stopgrad(z_s / T) + t * z_t / T)``  (interpolation of logits, i.e. of
log-probabilities up to normalisation), ``TAID = T^2 * KL(p_t || q)``.

``t = 1`` is plain forward KL; ``t = 0`` gives zero loss. :class:`TAIDSchedule` raises ``t``
from ``t_start`` to ``t_end``: linearly, or adaptively (the paper's Algorithm 1): with the
relative loss decrease ``delta = (J_prev - J) / J_prev`` smoothed by momentum
``m <- beta m + (1 - beta) delta``, ``t <- min(t_end, max(t_linear(step), t + alpha sigmoid(m) (1 - t)))``:
``t`` never falls behind the linear schedule and runs ahead of it while the loss still drops.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kdforge.errors import ConfigError
from kdforge.losses._core import SparsePolicy, Teacher, check_unit_interval, distill, kl
from kdforge.losses.spec import register_loss

__all__ = ["TAIDSchedule", "taid", "taid_kernel"]


def taid_kernel(logq: torch.Tensor, logp: torch.Tensor, t: float, safe: bool = True) -> torch.Tensor:
    """``KL(softmax((1 - t) sg(log q) + t log p) || q)`` per row."""
    if t >= 1.0:
        target = logp
    elif t <= 0.0:
        target = logq.detach()
    else:
        target = torch.log_softmax((1.0 - t) * logq.detach() + t * logp, dim=-1)
    return kl(target, logq, safe)


@register_loss("taid", description="TAID: forward KL to softmax((1-t)*sg(z_s) + t*z_t), t scheduled to 1 (param t)",
               paper="Shing et al. 2025, TAID: Temporally Adaptive Interpolated Distillation (ICLR)")
def taid(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    t: float = 1.0,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """TAID loss ``T^2 * KL(p_t || q)`` with ``p_t = softmax((1 - t) sg(z_s/T) + t z_t/T)``.

    Args:
        t: interpolation coefficient in ``[0, 1]``, from :class:`TAIDSchedule` (``.t``).
        Others as :func:`kdforge.losses.forward_kl`. With a sparse teacher the interpolation is
        done on the bucketed log-distributions (top-k + tail), which is the same formula
        restricted to the buckets.
    """
    check_unit_interval("t", t)
    return distill("taid", lambda lq, lp, safe: taid_kernel(lq, lp, float(t), safe), student_logits, teacher, mask=mask,
                   temperature=temperature, reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


class TAIDSchedule:
    """The schedule of TAID's interpolation coefficient ``t``.

    Call :meth:`step` once per optimiser step with the current (TAID) loss value; read ``.t``
    and pass it to :func:`taid` as ``t=``.

    Args:
        total_steps: number of optimiser steps of the run (the linear schedule reaches
            ``t_end`` there).
        t_start: initial ``t`` (paper: 0.4).
        t_end: final ``t`` (1.0: plain forward KL at the end).
        mode: ``"adaptive"`` (paper, Algorithm 1) or ``"linear"``.
        alpha: adaptive step size (paper: 5e-4).
        beta: momentum of the relative loss change (paper: 0.99).

    Example:
        >>> sched = TAIDSchedule(total_steps=1000)
        >>> loss = taid(student_logits, teacher_logits, t=sched.t)
        >>> sched.step(loss.item())
    """

    def __init__(self, total_steps: int, *, t_start: float = 0.4, t_end: float = 1.0, mode: str = "adaptive",
                 alpha: float = 5e-4, beta: float = 0.99) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"TAIDSchedule total_steps must be a positive int, got {total_steps!r}",
                              "pass the number of optimiser steps of the run")
        if mode not in ("adaptive", "linear"):
            raise ConfigError(f"unknown TAID schedule mode {mode!r}", "use 'adaptive' or 'linear'")
        check_unit_interval("t_start", t_start)
        check_unit_interval("t_end", t_end)
        check_unit_interval("alpha", alpha)
        check_unit_interval("beta", beta)
        if t_start > t_end:
            raise ConfigError(f"t_start={t_start} > t_end={t_end}", "t must rise: choose t_start <= t_end")
        self.total_steps = total_steps
        self.t_start, self.t_end, self.mode = float(t_start), float(t_end), mode
        self.alpha, self.beta = float(alpha), float(beta)
        self.t = float(t_start)
        self.momentum = 0.0
        self.prev_loss: float | None = None
        self.num_steps = 0

    def linear_t(self, step: int) -> float:
        progress = min(1.0, step / self.total_steps)
        return self.t_start + (self.t_end - self.t_start) * progress

    def step(self, loss: float | torch.Tensor | None = None) -> float:
        """Advance one optimiser step; ``loss`` is required in adaptive mode. Returns the new ``t``."""
        self.num_steps += 1
        t_lin = self.linear_t(self.num_steps)
        if self.mode == "linear":
            self.t = t_lin
            return self.t
        if loss is None:
            raise ConfigError("adaptive TAIDSchedule.step() needs the current loss", "call sched.step(loss.item())")
        value = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        if not math.isfinite(value):
            return self.t  # a bad step must not move t; the trainer reports non-finite losses itself
        if self.prev_loss is None:
            self.prev_loss = value
            self.t = max(self.t, t_lin)
            return self.t
        rel = (self.prev_loss - value) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        delta = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        self.t = min(self.t_end, max(t_lin, self.t + delta))
        self.prev_loss = value
        return self.t

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.num_steps = int(state["num_steps"])
