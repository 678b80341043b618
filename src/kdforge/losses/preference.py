"""Preference losses over sequences: DPO with the teacher as the reference model.

Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"); used for distillation by LLaVA-MoD (Shu et al. 2024,
second stage: the teacher is the reference and judges which of two student answers is better)
and by Kimi k1.5's long-to-short preference pairs (shortest correct answer = chosen).

For a pair ``(chosen c, rejected r)`` of responses to one prompt, with ``pi`` the policy (student)
and ``ref`` the frozen reference (the teacher) summed log-probabilities of the response tokens::

    margin = (pi_c - ref_c) - (pi_r - ref_r)
    loss   = -log sigmoid(beta * margin)                      (per pair, shape [pairs])

Properties the tests check: ``chosen == rejected`` gives ``log 2`` and a zero gradient;
``ref == pi`` at the start gives ``log 2`` for every pair; the gradient pushes ``pi_c`` up and
``pi_r`` down with weight ``beta * sigmoid(-beta * margin)``.

Why not a :class:`~kdforge.losses.spec.LossSpec`: every registered loss compares the student's
and the teacher's distributions *per position* (``fn(student_logits, teacher, mask=...)``); DPO
compares two *whole sequences* against each other, so it needs pairs, not positions. It is a pure
function here and :mod:`kdforge.train.preference` runs it. It is written here rather than taken
from ``trl`` (whose DPO loss is a method of its trainer, bound to its batch format): the formula
is four lines and the tests cross-check it against ``trl`` when that is installed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdforge.errors import ShapeError

__all__ = ["dpo_loss", "sequence_logprobs"]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                      average: bool = False) -> torch.Tensor:
    """Summed (or mean) log-probability of the labelled tokens of each row.

    Args:
        logits: ``[B, L, V]`` next-token logits *already aligned* with ``labels`` (position ``t``
            predicts ``labels[:, t]``; shift a causal LM's logits first).
        labels: ``[B, L]`` token ids; ``ignore_index`` marks prompt and padding positions.
        average: divide by the number of labelled tokens (length-normalised DPO, as in SimPO/IPO
            variants) instead of summing.

    Returns:
        ``[B]`` float32: ``sum_t log softmax(logits[b, t])[labels[b, t]]`` over labelled ``t``.
    """
    if logits.shape[:2] != labels.shape:
        raise ShapeError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree",
                         "pass logits [B, L, V] aligned with labels [B, L] (shift a causal LM's logits)")
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    total = (logp * mask).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
             reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """DPO loss ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` per pair.

    Args:
        policy_chosen, policy_rejected: ``[P]`` sequence log-probs under the student (with grad).
        ref_chosen, ref_rejected: ``[P]`` sequence log-probs under the reference (the teacher, or
            the student before training); treated as constants.
        beta: inverse temperature of the implicit reward (0.1 in the DPO paper).
        label_smoothing: conservative DPO (``eps`` probability that the label is flipped):
            ``(1-eps) * -log sig(beta m) + eps * -log sig(-beta m)``.
        reduction: ``mean`` / ``sum`` over pairs, or ``none`` for ``[P]``.
    """
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ShapeError(f"DPO inputs have different shapes {sorted(shapes)}",
                         "pass one sequence log-prob per pair for each of the four inputs")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    loss = -F.logsigmoid(beta * margin)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * -F.logsigmoid(-beta * margin)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
