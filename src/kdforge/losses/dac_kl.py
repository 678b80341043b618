"""DAC-KL: KL restricted to the teacher's semantically dense region (distribution-adaptive clipping).

Liu et al., *Multi-Granularity Semantic Revision for Large Language Model Distillation* (2024),
token-level part. Their DAC-KL ("distribution adaptive clipping KL") keeps only the *dense* part
of the teacher's output distribution — the few classes/tokens that carry most of its mass — and
the ground-truth token, so that the long flat tail of an LLM's distribution does not dominate the
divergence; the region's bounds are predicted per token by a learnable sub-network.

kdforge's version (per position, at temperature ``T``):

1. ``R`` = the smallest set of classes, taken in decreasing teacher probability, whose teacher
   mass reaches ``mass`` (a per-position *adaptive* size: 1 class for a confident teacher, many
   for a flat one; at most ``max_k`` when given), plus the labelled class when ``labels`` are
   given (``keep_label``);
2. the rest is *clipped* into one bucket: ``p' = [p_v for v in R] + [1 - sum_R p]``, the same for
   the student ``q'`` (its own mass outside ``R``);
3. ``DAC-KL = T^2 * KL(p' || q')``.

The tail's *shape* no longer matters, only its total mass (renormalising on ``R`` alone instead
would give a confident teacher's one-class region a zero loss whatever the student says).
``mass = 1`` keeps every class with positive teacher probability: the loss is then the plain
forward KL (tested).

**Learned region** (``clip_net``, a :class:`~kdforge.losses.dac_clip.DACClipNet`; from YAML
``learned: true``). The paper's part: a sub-network predicts an upper and a lower clipping limit
``(u, l)`` per token, the region between them (and the label) is kept, the KL is taken on the
clipped distributions. kdforge's reading of what the abstract leaves open:

* the limits are cumulative-mass coordinates of the sorted teacher distribution and the
  membership ``w_v in [0, 1]`` is soft (:mod:`kdforge.losses.dac_clip`); a class keeps the share
  ``w_v`` of its mass in place and sends ``1 - w_v`` to the rest bucket, for teacher and student
  alike: ``p' = [w_v p_v] + [sum_v (1 - w_v) p_v]``, ``q'`` the same, ``DAC-KL = T^2 KL(p' || q')``
  (the hard clip above at ``w in {0, 1}``, ``region_temperature = 0``: the same region, the value
  equal to float rounding);
* the training rule (the abstract gives none; training ``(l, u)`` on the DAC-KL value collapses
  the region, an empty region has zero KL) is a **one-step look-ahead**: the student logits take
  one logit-space step toward the clipped target, ``s' = s - eta * grad_s DAC-KL(s; w)``, and the
  sub-network minimises the ground-truth cross-entropy ``CE(s', y)`` (the region whose target
  moves the student toward the label fastest). ``grad_s`` is the closed form
  ``T (q - w p - (1 - w) q P_rest / Q_rest)`` (``q``, ``p`` at temperature ``T``; equal to
  autograd's, tested), differentiable in ``w``. The student sees ``w`` detached; the meta term
  adds 0 to the loss value (as :mod:`~kdforge.losses.trilateral`'s). Positions without a label
  give no meta term; with ``region_temperature = 0`` or a net in eval mode there is none.
"""

from __future__ import annotations

import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    NEG_INF,
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    check_teacher,
    check_temperature,
    diagnose_nonfinite,
    kl,
    real_positions,
    reduce,
    select,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.dac_clip import DACClipNet, region_log_weights
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss
from kdforge.losses.supervised import IGNORE_INDEX

__all__ = ["dac_kl", "dense_region", "soft_clipped_kl"]


def dense_region(logp: torch.Tensor, mass: float, max_k: int | None = None,
                 target: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[n, V]``: per row, the fewest top classes of ``exp(logp)`` reaching ``mass``
    (cut at ``max_k``), plus ``target[i]`` where ``target[i] >= 0``.

    On CPU the region is found by partial selection, not a full sort of the vocabulary: every row
    takes its top 64 classes (``topk``); the rows whose region is not complete within them (their
    last selected class is still inside) take 8 times as many, and so on up to ``max_k`` or ``V``.
    The region of an LM teacher is small at most positions (SmolLM2 on prose, mass 0.9: median 42
    of 49,152 classes, maximum 2,238), so this costs a fraction of the sort (2.15 -> 0.34 CPU s on
    512 positions). On an accelerator the sort is cheap and that data-dependent loop would
    synchronise with the host, so it sorts there. Both give the same region (tested).
    """
    if logp.device.type != "cpu":
        return _with_target(_sorted_region(logp, mass, max_k), target)
    probs = logp.exp()
    n, vocab = probs.shape
    cap = vocab if max_k is None else max(1, min(max_k, vocab))
    region = torch.zeros(n, vocab, dtype=torch.bool, device=logp.device)
    rows = torch.arange(n, device=logp.device)
    k = min(64, cap)
    while rows.numel():  # metadata, not a read of values
        top, order = probs[rows].topk(k, dim=-1)  # sorted, decreasing
        keep_sorted = (top.cumsum(-1) - top) < mass  # teacher mass strictly above each class
        keep_sorted[:, 0] = True
        done = ~keep_sorted[:, -1] if k < cap else torch.ones_like(keep_sorted[:, -1])
        finished = rows[done]
        region[finished] = torch.zeros_like(region[finished]).scatter(-1, order[done], keep_sorted[done])
        rows, k = rows[~done], min(cap, 8 * k)
    return _with_target(region, target)


def _sorted_region(logp: torch.Tensor, mass: float, max_k: int | None) -> torch.Tensor:
    """:func:`dense_region` without the label, by a full sort (no host read: the accelerator path)."""
    probs, order = logp.exp().sort(dim=-1, descending=True)
    keep_sorted = (probs.cumsum(-1) - probs) < mass  # teacher mass strictly above each class
    keep_sorted[..., 0] = True
    if max_k is not None:
        keep_sorted[..., max_k:] = False
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _with_target(region: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``region`` with ``target[i]`` added to row ``i`` where ``target[i] >= 0``."""
    if target is not None:
        has = target >= 0
        rows = has.nonzero(as_tuple=True)[0]
        region[rows, target[has]] = True
    return region


def _clipped_kl_closed_form(s: torch.Tensor, t_logp: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``KL(p' || q')`` per row for student logits ``s`` and teacher log-probabilities ``t_logp``
    ``[n, V]`` clipped to ``region`` (the rest one bucket), with its gradient in closed form.

    With ``q = softmax(s)``, ``p_out = 1 - sum_R p`` and ``q_out = sum_{not R} q``, the value is
    ``sum_R p (log p - log q) + p_out (log p_out - log q_out)`` and its gradient in ``s`` is
    ``q - target``, ``target = p`` on ``R`` and ``q * p_out / q_out`` outside it (the bucket's
    mass spread in proportion to the student). Computed without autograd over ``[n, V]`` masked
    copies (the value and ``q - target`` once, attached as ``(s * g).sum() - sg(...)``); equal to
    the autograd of the clipped distributions (tested against it, gradcheck included).
    """
    with torch.no_grad():
        logq = torch.log_softmax(s.detach(), -1)
        q = logq.exp()
        p = t_logp.exp()
        p_in = torch.where(region, p, 0.0)
        p_out = torch.where(region, 0.0, p).sum(-1)  # exactly 0 when the region is everything
        q_out = torch.where(region, 0.0, q).sum(-1)
        inside = (p_in * (torch.where(region, t_logp, 0.0) - torch.where(region, logq, 0.0))).sum(-1)
        bucket = torch.xlogy(p_out, p_out) - torch.where(p_out > 0, p_out * torch.log(q_out), 0.0)
        spread = torch.where(q_out > 0, p_out / q_out, 0.0)
        grad = q - torch.where(region, p_in, q * spread[:, None])
    return (inside + bucket) + ((s * grad).sum(-1) - (s.detach() * grad).sum(-1))


def soft_clipped_kl(logp: torch.Tensor, logq: torch.Tensor, log_w: torch.Tensor, log_out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KL(p' || q') [n], log(P_rest / Q_rest) [n])`` with ``p' = [w p] + [sum (1 - w) p]`` (``q'`` alike)
    for log-distributions ``logp``, ``logq`` and membership logs ``log_w``, ``log_out = log(1 - w)`` ``[n, V]``."""
    full = torch.isneginf(log_out).all(-1, keepdim=True)  # no rest: keep logsumexp off an all -inf row

    def rest(logd: torch.Tensor) -> torch.Tensor:
        tail = torch.logsumexp(torch.where(full, 0.0, log_out + logd), -1, keepdim=True)
        return torch.where(full, NEG_INF, tail)

    rest_p, rest_q = rest(logp), rest(logq)
    value = kl(torch.cat([log_w + logp, rest_p], -1), torch.cat([log_w + logq, rest_q], -1))
    return value, torch.where(full, 0.0, rest_p - rest_q).squeeze(-1)


def _learned_region(t_logp: torch.Tensor, clip_net: DACClipNet, tau: float, max_k: int | None,
                    target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log w, log(1 - w))`` ``[n, V]`` in class order: the net's window, the label kept."""
    probs, order = t_logp.exp().sort(dim=-1, descending=True)
    lower, upper = clip_net(probs)
    log_w, log_out = region_log_weights(probs, lower, upper, tau)
    if max_k is not None:
        cut = torch.zeros_like(probs, dtype=torch.bool)
        cut[..., max_k:] = True
        log_w, log_out = log_w.masked_fill(cut, NEG_INF), log_out.masked_fill(cut, 0.0)
    log_w = torch.empty_like(log_w).scatter(-1, order, log_w)
    log_out = torch.empty_like(log_out).scatter(-1, order, log_out)
    if target is not None:
        label = _with_target(torch.zeros_like(log_w, dtype=torch.bool), target)
        log_w, log_out = log_w.masked_fill(label, 0.0), log_out.masked_fill(label, NEG_INF)
    if clip_net.training:
        clip_net.observe(lower, upper, log_w, t_logp)
    return log_w, log_out


def _look_ahead_ce(s: torch.Tensor, t_logp: torch.Tensor, log_w: torch.Tensor, log_out: torch.Tensor,
                   y: torch.Tensor, temperature: float, meta_lr: float) -> torch.Tensor:
    """``[n]``: ``CE(s' , y)`` at ``s' = T s - eta grad`` (module docstring), 0 where ``y < 0``; ``s`` the
    tempered student logits (detached here), differentiable in the membership only."""
    logq = torch.log_softmax(s.detach(), -1)
    _, log_ratio = soft_clipped_kl(t_logp, logq, log_w, log_out)
    grad = logq.exp() - (log_w + t_logp).exp() - (log_out + logq + log_ratio.unsqueeze(-1)).exp()
    stepped = temperature * s.detach() - meta_lr * temperature * grad
    has = y >= 0
    ce = torch.nn.functional.cross_entropy(stepped, torch.where(has, y, 0), reduction="none")
    return torch.where(has, ce, 0.0)


@register_loss("dac_kl", description="DAC-KL: forward KL on the teacher's dense region (top mass + label), the rest clipped to one bucket",
               paper="Liu et al. 2024, Multi-Granularity Semantic Revision for Large Language Model Distillation",
               sparse_ok=False)
def dac_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mass: float = 0.9,
    max_k: int | None = None,
    keep_label: bool = True,
    clip_net: DACClipNet | None = None,
    learned: bool = False,
    region_temperature: float = 0.05,
    meta_lr: float = 1.0,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """``T^2 * KL(p' || q')`` on the teacher's dense region ``R`` plus one tail bucket (module docstring).

    Args:
        student_logits: ``[..., V]``.
        teacher: dense teacher logits ``[..., V]`` (a top-k teacher is already clipped: use
            ``forward_kl`` with ``sparse_policy="renormalize"`` for it).
        mass: teacher probability mass the region must reach, in ``(0, 1]``.
        max_k: at most this many classes from the teacher's top (None: no cap).
        keep_label: add the labelled class to the region (needs ``labels``; ``-100`` = none).
        clip_net: the learned region (:class:`~kdforge.losses.dac_clip.DACClipNet`; ``mass`` is then
            unused). Its parameters must be optimised with the student: pass it in the
            Distiller's ``extra_modules`` (the recipes do for ``learned: true``). None: the
            fixed-mass region, exactly as without these options.
        learned: YAML's switch for a learned region: the recipes create ``clip_net`` (starting at
            ``u = mass``); True without a ``clip_net`` is an error.
        region_temperature: ``tau`` of the soft membership, in mass units (0: the hard window, no
            gradient to ``clip_net``).
        meta_lr: ``eta``, the logit-space step of the look-ahead that trains ``clip_net``.
        mask, temperature, reduction, check_finite: as :func:`~kdforge.losses.forward_kl`.
        labels: int ``[...]`` (optional; used by ``keep_label`` and by the look-ahead that trains
            ``clip_net``, which gets no update from unlabelled positions).
    """
    check_student(student_logits)
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("dac_kl needs dense teacher logits, got a SparseTeacher",
                          "a top-k teacher is already a clipped region: use forward_kl with sparse_policy=renormalize")
    check_teacher(student_logits, teacher)
    check_temperature(temperature)
    check_reduction(reduction)
    if not 0.0 < mass <= 1.0:
        raise ConfigError(f"dac_kl mass must be in (0, 1], got {mass}", "use e.g. mass=0.9")
    if learned and clip_net is None:
        raise ConfigError("dac_kl learned=true needs a clip_net (the learned region sub-network)",
                          "the recipes create one; from Python pass clip_net=DACClipNet(init_mass=mass) and "
                          "optimise it with the student (Distiller extra_modules)")
    if region_temperature < 0 or meta_lr < 0:
        raise ConfigError(f"dac_kl region_temperature and meta_lr must be >= 0, got {region_temperature}, {meta_lr}",
                          "use e.g. region_temperature=0.05, meta_lr=1.0")
    if max_k is not None and max_k < 1:
        raise ConfigError(f"dac_kl max_k must be >= 1, got {max_k}", "use max_k=null for no cap")
    lead = tuple(student_logits.shape[:-1])
    check_positions("mask", mask, lead)
    real = real_positions(lead, mask, student_logits.device)
    s = upcast(select(student_logits, real)) / temperature
    t = upcast(select(teacher.detach(), real)) / temperature
    y = None  # -1 where unlabelled
    if labels is not None and (keep_label or clip_net is not None):
        check_positions("labels", labels, lead)
        y = select(labels.to(student_logits.device).unsqueeze(-1), real).squeeze(-1).long()
        y = torch.where(y == IGNORE_INDEX, -1, y)
        if value_checks_enabled() and y.numel() and int(y.max()) >= s.shape[-1]:
            raise ShapeError(f"labels outside [0, {s.shape[-1]})", "labels must index the classes (-100 for none)")
    target = y if keep_label else None
    if clip_net is None:
        t_logp = torch.log_softmax(t, -1)  # no gradient: the teacher is detached
        with torch.no_grad():
            region = dense_region(t_logp, mass, max_k, target)
        per_pos = _clipped_kl_closed_form(s, t_logp, region) * temperature**2
    else:
        t_logp = torch.log_softmax(t, -1)
        update = clip_net.training and region_temperature > 0 and y is not None and torch.is_grad_enabled()
        with torch.set_grad_enabled(update):
            log_w, log_out = _learned_region(t_logp, clip_net, region_temperature, max_k, target)
        per_pos = soft_clipped_kl(t_logp, torch.log_softmax(s, -1), log_w.detach(), log_out.detach())[0]
        per_pos = per_pos * temperature**2
        if update:
            meta = _look_ahead_ce(s, t_logp, log_w, log_out, y, temperature, meta_lr)
            per_pos = per_pos + (meta - meta.detach())  # the sub-network's update; adds 0 to the value
    if check_finite and value_checks_enabled() and per_pos.numel() and not bool(torch.isfinite(per_pos.detach()).all()):
        raise diagnose_nonfinite("dac_kl", s, t)
    return reduce(per_pos, real, lead, reduction)
