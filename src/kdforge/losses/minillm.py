"""MiniLLM: sequence-level reverse KL minimised by policy gradient on sampled continuations.

Gu, Dong, Wei, Huang, *MiniLLM: Knowledge Distillation of Large Language Models* (ICLR 2024).
The objective is the reverse KL between the student's and the teacher's distributions over
whole continuations ``y`` of a prompt ``x``:

    ``L(theta) = KL(q_theta(y|x) || p(y|x)) = -E_{y~q_theta} sum_t r_t``,
    ``r_t = log p(y_t | y_<t, x) - log q_theta(y_t | y_<t, x)``.

Its gradient, by the policy-gradient theorem and causality, is
``-E_y sum_t R_t grad log q_theta(y_t|y_<t)`` (plus a zero-mean term) with the return
``R_t = sum_{t' >= t} r_t'``. The paper's three tricks, all in :func:`minillm_loss`:

* **single-step decomposition**: ``R_t = r_t + R_{t+1}``; the ``r_t`` part has the closed form
  ``grad KL(q_theta(.|y_<t) || p(.|y_<t))`` (the per-step reverse KL summed over the whole
  vocabulary, differentiated exactly), the rest is the policy gradient of the *future* return
  ``R_{t+1}`` alone. Same expectation, lower variance:

      ``grad L = E_y sum_t [ grad KL_t  -  R_{t+1} grad log q_theta(y_t | y_<t) ]``;

* **teacher-mixed sampling**: ``y`` is drawn from ``p~ = alpha * p + (1 - alpha) * q_theta``
  (:class:`kdforge.train.minillm.TeacherMixedGenerator`), and each step is reweighted by the
  per-token importance weight ``w_t = q_theta(y_t|y_<t) / p~(y_t|y_<t)`` (no gradient; the
  paper's per-token approximation of the sequence ratio ``prod_t q/p~``, biased for
  ``alpha > 0`` but of far lower variance; ``alpha = 0`` gives ``w_t = 1``, unbiased);
* **length normalisation**: ``R_{t+1}`` is replaced by the *mean* of the future rewards,
  ``R^norm_{t+1} = R_{t+1} / (number of completion tokens after t)`` (0 at the last token), so
  long samples do not get larger returns than short ones (the paper's ``1/(T - t - 1)``).

The loss returned per completion position is the surrogate

    ``l_t = w_t * ( KL_t  -  stopgrad(R_{t+1}) * (log q_t(y_t) - stopgrad(log q_t(y_t))) )``,

whose *value* is ``w_t * KL_t`` (the weighted single-step reverse KL: what a run logs) and whose
*gradient* is the MiniLLM estimator above. Not implemented from the paper: its PPO-style ratio
clipping (one update per batch of samples here, so the ratio is 1) and the language-modelling
loss on pre-training data it adds (add a ``cross_entropy`` method of its own).

Shapes: ``student_logits`` and the dense teacher logits ``[B, T, V]`` (positions in time order:
position ``t`` predicts ``labels[:, t]``; the axis before the vocabulary is time, any earlier axes
are batch axes, so ``[T, V]`` is one sequence), ``labels`` ``[B, T]`` the sampled tokens (``-100``
on prompt and padding), ``mask`` ``[B, T]`` (default ``labels != -100``). A sequence's rewards are
summed along ``T`` over its masked positions, so the positions of a row are coupled: the loss is
registered ``separable=False`` (never chunked over positions).
"""

from __future__ import annotations

import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    check_teacher,
    check_temperature,
    check_unit_interval,
    diagnose_nonfinite,
    kl,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss
from kdforge.losses.supervised import IGNORE_INDEX

__all__ = ["future_rewards", "importance_weights", "minillm_loss", "mixture_log_probs"]


def mixture_log_probs(logq: torch.Tensor, logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log(alpha * p + (1 - alpha) * q)`` from log-probabilities (any shape), stable in log space.

    ``alpha = 0`` returns ``logq`` and ``alpha = 1`` returns ``logp`` exactly.
    """
    check_unit_interval("alpha", alpha)
    if alpha == 0.0:
        return logq
    if alpha == 1.0:
        return logp
    return torch.logaddexp(logp + torch.log(torch.tensor(alpha, dtype=logp.dtype, device=logp.device)),
                           logq + torch.log(torch.tensor(1.0 - alpha, dtype=logq.dtype, device=logq.device)))


def importance_weights(logq_tok: torch.Tensor, logp_tok: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token importance weights ``w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t))`` (no grad).

    Args:
        logq_tok, logp_tok: log-probabilities of the sampled tokens under student and teacher,
            any shape (the same).
        alpha: teacher share of the sampling mixture; 0 gives weights exactly 1.
    """
    with torch.no_grad():
        if alpha == 0.0:
            return torch.ones_like(logq_tok)
        return torch.exp(logq_tok - mixture_log_probs(logq_tok, logp_tok, alpha))


def future_rewards(rewards: torch.Tensor, mask: torch.Tensor, *, length_norm: bool = True) -> torch.Tensor:
    """``R_{t+1}``: the rewards of each row *after* position ``t``, over masked positions (no grad).

    Args:
        rewards: ``[B, T]`` per-step rewards ``r_t`` (values at unmasked positions are ignored).
        mask: ``[B, T]`` bool, the completion positions.
        length_norm: divide by the number of masked positions after ``t`` (the mean future
            reward; 0 where there is none), else the plain sum.

    Returns:
        ``[B, T]``; 0 at unmasked positions.
    """
    with torch.no_grad():
        r = torch.where(mask, rewards, 0.0)
        # inclusive reverse cumulative sum, then drop position t itself
        after = torch.flip(torch.cumsum(torch.flip(r, [-1]), -1), [-1]) - r
        if length_norm:
            m = mask.to(r.dtype)
            count = torch.flip(torch.cumsum(torch.flip(m, [-1]), -1), [-1]) - m
            after = torch.where(count > 0, after / count.clamp(min=1.0), 0.0)
        return torch.where(mask, after, 0.0)


@register_loss("minillm", description="MiniLLM: sequence reverse KL by policy gradient on sampled continuations",
               paper="Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models",
               needs_labels=True, sparse_ok=False, separable=False)
def minillm_loss(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    alpha: float = 0.0,
    length_norm: bool = True,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """MiniLLM surrogate on sampled continuations (module docstring): value ``w_t * KL(q_t || p_t)``,
    gradient the single-step-decomposed, importance-weighted policy gradient of the reverse KL.

    Args:
        student_logits: ``[B, T, V]`` (or ``[..., T, V]``), position ``t`` predicts ``labels[..., t]``.
        teacher: dense teacher logits ``[B, T, V]`` (a top-k cache cannot score the student's samples).
        alpha: teacher share of the sampling mixture the continuations were drawn from (0 = the
            student's own samples; the paper uses 0.2). Must match the sampler.
        length_norm: mean instead of sum of the future rewards.
        mask: ``[B, T]`` bool completion positions (default ``labels != -100``).
        temperature: both distributions at ``softmax(z / T)`` (no ``T^2`` factor). The policy gradient
            assumes the samples came from the student at this temperature: the MiniLLM sampler
            (:class:`kdforge.train.minillm.TeacherMixedGenerator`) samples at 1, so keep 1 with it.
        reduction: ``"sum"``, ``"mean"`` (over masked positions) or ``"none"`` (``[B, T]``, 0 off-mask).
        labels: ``[B, T]`` the sampled tokens, ``-100`` elsewhere.
        check_finite: raise :class:`~kdforge.errors.NonFiniteError` (naming the cause) on a non-finite
            value (a host read; skipped when :func:`~kdforge.losses.value_checks` is off).
    """
    check_student(student_logits)
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("minillm needs a dense teacher (the full distribution at every sampled position); a "
                          "sparse (top-k cache) teacher cannot score the student's samples",
                          "use the online teacher (teacher: online, or the minillm method key of llm_kd)")
    check_teacher(student_logits, teacher)
    check_reduction(reduction)
    check_unit_interval("alpha", alpha)
    check_temperature(temperature)
    if student_logits.ndim < 2:
        raise ShapeError(f"minillm needs [..., time, vocab] logits (rewards are summed along time), got "
                         f"shape {tuple(student_logits.shape)}", "pass the causal-LM logits of whole sequences")
    lead = tuple(student_logits.shape[:-1])
    if labels is None:
        raise ConfigError("minillm needs labels: the sampled tokens (-100 on prompt and padding)",
                          "pass labels=; in the trainer the causal-LM task provides them")
    check_positions("labels", labels, lead)
    check_positions("mask", mask, lead)
    real = (labels != IGNORE_INDEX) if mask is None else mask.bool() & (labels != IGNORE_INDEX)
    rows = (-1, lead[-1])  # every leading axis but time is a batch axis: [rows, T]
    real, labels = real.to(student_logits.device).reshape(rows), labels.reshape(rows)
    vocab = student_logits.shape[-1]
    logq = torch.log_softmax(upcast(student_logits) / temperature, -1).reshape(*rows, vocab)
    # off-mask teacher entries may be anything (padding, NaN): zero them so no NaN reaches the backward
    t = torch.where(real.reshape(lead).unsqueeze(-1), upcast(teacher.detach()).to(real.device), 0.0)
    logp = torch.log_softmax(t / temperature, -1).reshape(*rows, vocab)
    step_kl = kl(logq, logp, safe=True)  # [B, T]: exact per-step reverse KL, differentiable
    tokens = torch.where(real, labels.to(logq.device), 0).long().unsqueeze(-1)
    logq_tok = logq.gather(-1, tokens).squeeze(-1)
    logp_tok = logp.gather(-1, tokens).squeeze(-1)
    weights = importance_weights(logq_tok.detach(), logp_tok, alpha)
    returns = future_rewards((logp_tok - logq_tok).detach(), real, length_norm=length_norm)
    surrogate = step_kl - returns * (logq_tok - logq_tok.detach())
    per_pos = torch.where(real, weights * surrogate, 0.0)
    if check_finite and value_checks_enabled() and not bool(torch.isfinite(per_pos.detach()).all()):
        raise diagnose_nonfinite("minillm", student_logits, teacher)
    if reduction == "none":
        return per_pos.reshape(lead)
    total = per_pos.sum()
    if reduction == "sum":
        return total
    return total / real.sum().clamp(min=1)
