"""Shared machinery of the divergence losses: validation, teacher signal -> log-distributions,
temperature, masking, reduction, non-finite diagnosis.

A divergence in kdforge is a *kernel*: a function ``kernel(logq, logp, safe) -> [...]`` of two
log-distributions over the same last axis (student ``logq``, teacher ``logp``; both may contain
``-inf`` for zero-probability entries). :func:`distill` turns any teacher signal into such a
pair and applies everything else (temperature, mask, reduction, ``T^2``), so every loss gets
the same sparse-teacher, masking and numerics behaviour for free.

Sparse teacher (top-k ids + full-vocabulary log-probs at T=1) policies:

* ``"tail_bucket"``: the distribution has ``k + 1`` entries: the teacher's top-k probabilities
  and one bucket with its remaining mass ``1 - sum_k p``; the student's probabilities gathered at
  the same ids and its own remaining mass ``1 - sum_k q`` as the last bucket. At temperature
  ``T != 1`` the teacher's tail is assumed spread uniformly over the ``V - k`` unseen tokens (the
  maximum-entropy completion, as :meth:`SparseTeacher.to_dense_logprobs`), which makes the
  tempered teacher computable: ``p_T(i) ∝ p(i)^(1/T)`` for the top-k and
  ``(V-k) * (r/(V-k))^(1/T)`` for the tail. The student is tempered exactly (full softmax at T)
  before its top-k probabilities are gathered. With ``k == V`` this is exactly the dense loss.
* ``"renormalize"``: both distributions restricted to the teacher's top-k ids and renormalised
  there (teacher ``softmax(log p / T)`` over the k ids — exact for any T; student
  ``softmax(z_s / T)`` over the same ids). Ignores everything outside the top-k.
* ``"student_full"``: the teacher renormalised over its top-k (zero mass elsewhere), the student's
  full distribution (its top-k probabilities plus its remaining mass as one bucket, which the
  teacher gives probability 0). For forward KL this is ``sum_k p̂ (log p̂ - log q)``: the student is
  pushed to put all its mass on the teacher's top-k (DistillKit/TRL-style sparse KL). Divergences
  that weigh the student's mass where the teacher has none (reverse KL, AKL, TAID) are infinite
  under this policy and raise ``NonFiniteError``; bounded ones (JSD, TVD, skew KL) are fine.

**Sampled tail** (``SparseTeacher.num_exact`` set: exact top-k + importance-weighted tail draws,
an unbiased estimate ``p_hat`` of the teacher with ``sum p_hat = 1``, see
:mod:`kdforge.losses.signal`): the pair is the student's log-probs gathered at the entries plus
its remaining mass as one bucket, against ``log p_hat`` and zero on that bucket, whatever the
policy (there is no tail mass left to place). For forward KL the gradient w.r.t. the student
logits is then ``q - p_hat``, whose expectation is the exact ``q - p``. Only losses *linear in
the teacher distribution* keep that unbiasedness; their spec declares it
(``LossSpec.linear_in_teacher``, :mod:`kdforge.losses.spec`) and :func:`distill` raises
``ConfigError`` for any other loss, for ``T != 1`` (tempering ``p^(1/T)``
is not linear in ``p``) and for ``sparse_policy="renormalize"`` (it would drop the student's mass
outside the drawn ids). The loss *value* ``sum p_hat log(p_hat / q)`` is not an unbiased estimate
of the KL (its entropy term is a plug-in estimate); its gradient is.

Padding entries (repeated ids with teacher log-prob ``-inf``) get zero mass on both sides.
The student's full ``[..., V]`` logits are used only through a log-softmax and a gather: the
sparse teacher is never densified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch

from kdforge.errors import ConfigError, NonFiniteError, ShapeError, VocabMismatchError
from kdforge.losses.registry import LOSSES
from kdforge.losses.signal import SparseTeacher

Teacher = torch.Tensor | SparseTeacher

# --------------------------------------------------------------------------------------------
# value checks (host reads) on or off

_VALUE_CHECKS: ContextVar[bool] = ContextVar("kdforge_loss_value_checks", default=True)


@contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Turn the losses' checks of tensor *values* on (default) or off inside a ``with`` block.

    On (what every direct call gets): sparse ids and labels are checked to lie in the vocabulary,
    a non-finite loss raises a diagnosed :class:`~kdforge.errors.NonFiniteError`, and a few paths
    read a value to pick a faster branch (a dense kernel without ``-inf`` handling, a chunk with
    no padding). Each such check is a blocking host read (``.item()``, ``bool(tensor)``): a
    device sync on an accelerator, about ten per micro-batch on the default KD + CE path.

    Off: none of them. Results are the same for valid, finite inputs (the branches taken need no
    value: ``-inf``-safe kernels, masked updates); invalid ids would fail inside torch instead
    of with kdforge's message and a non-finite loss is returned rather than raised. The
    :class:`~kdforge.train.Distiller` turns them off for a micro-batch once the same batch layout
    was validated (the first batch, and whenever the layout changes or grows), and checks the
    loss once per optimizer step. Shape, type and configuration checks always run (no host read).
    Selecting real positions with a boolean mask is dynamic-shape indexing and still syncs on an
    accelerator.

    Example::

        with value_checks(False):
            loss = forward_kl(student_logits, teacher_logits, mask=mask)
    """
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_enabled() -> bool:
    """Whether the losses check tensor values here (see :func:`value_checks`)."""
    return _VALUE_CHECKS.get()

Kernel = Callable[..., torch.Tensor]  # kernel(logq, logp, safe: bool) -> [n]

REDUCTIONS = ("mean", "sum", "none")
SPARSE_POLICIES = ("tail_bucket", "renormalize", "student_full")
#: the ``sparse_policy`` parameter's type (a loss's params model then refuses other values)
SparsePolicy = Literal["tail_bucket", "renormalize", "student_full"]
NEG_INF = float("-inf")
# Largest log-mass the top-k may claim before its complement is treated as "numerically empty";
# keeps log(1 - sum p) and its gradient finite (float32 cannot resolve smaller tails anyway).
_LOG_MASS_CAP = -1e-6


# --------------------------------------------------------------------------------------------
# validation


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}", f"use one of {', '.join(REDUCTIONS)}")


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}", "use e.g. 1.0 or 2.0")


def check_unit_interval(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > 0 if open_low else value >= 0) and (value < 1 if open_high else value <= 1)
    if not ok:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ConfigError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}", f"set {name} inside that range")


def check_student(student_logits: torch.Tensor) -> None:
    if not isinstance(student_logits, torch.Tensor):
        raise ShapeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}",
                         "pass the model's output logits")
    if student_logits.ndim < 1 or not student_logits.is_floating_point():
        raise ShapeError(
            f"student_logits must be a floating tensor [..., vocab], got shape {tuple(student_logits.shape)} "
            f"dtype {student_logits.dtype}",
            "pass the raw logits of the student (not token ids)",
        )


def check_teacher(student_logits: torch.Tensor, teacher: Teacher) -> None:
    """Raise ShapeError / VocabMismatchError when ``teacher`` does not fit ``student_logits``."""
    v_s = student_logits.shape[-1]
    lead = tuple(student_logits.shape[:-1])
    if isinstance(teacher, SparseTeacher):
        if tuple(teacher.shape) != lead:
            raise ShapeError(
                f"sparse teacher positions {tuple(teacher.shape)} do not match student positions {lead}",
                "build the SparseTeacher for the same batch/sequence as the student logits (same shift, "
                "same padding)",
            )
        if teacher.vocab_size != v_s:
            raise VocabMismatchError(
                f"sparse teacher vocabulary {teacher.vocab_size} != student vocabulary {v_s}",
                "distil between models sharing a tokenizer; if one vocabulary is only padded (same family), "
                "slice the student logits to the shared tokenizer size: student_logits[..., :tokenizer_size]",
            )
        if value_checks_enabled() and teacher.ids.numel() and (int(teacher.ids.min()) < 0
                                                              or int(teacher.ids.max()) >= v_s):
            raise ShapeError(
                f"sparse teacher ids outside [0, {v_s})",
                "the cache was built with another tokenizer or vocabulary; rebuild it",
            )
        return
    if not isinstance(teacher, torch.Tensor):
        raise ShapeError(
            f"teacher must be dense logits (torch.Tensor) or a SparseTeacher, got {type(teacher).__name__}",
            "pass teacher logits [..., vocab] or a SparseTeacher",
        )
    if not teacher.is_floating_point():
        raise ShapeError(f"teacher logits must be floating point, got {teacher.dtype}", "pass logits, not ids")
    if tuple(teacher.shape[:-1]) != lead or teacher.ndim != student_logits.ndim:
        raise ShapeError(
            f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} "
            "cover different positions",
            "compute both on the same input_ids (same batch, same sequence length, same shift)",
        )
    if teacher.shape[-1] != v_s:
        small = min(teacher.shape[-1], v_s)
        raise VocabMismatchError(
            f"teacher vocabulary {teacher.shape[-1]} != student vocabulary {v_s}",
            "distillation needs a shared tokenizer; for same-family models whose embedding matrices are only "
            f"padded differently, slice both to the tokenizer size, e.g. logits[..., :{small}]",
        )


def check_positions(name: str, x: torch.Tensor | None, lead: tuple[int, ...]) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != lead:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(
            f"{name} has shape {shape}, expected the student's position shape {lead}",
            f"{name} must be [...] without the vocabulary axis, aligned with the logits",
        )


def real_positions(lead: tuple[int, ...], mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Bool ``[...]`` of real positions (None when every position is real)."""
    if mask is None:
        return None
    return mask.to(device=device).bool() if mask.dtype != torch.bool else mask.to(device)


# --------------------------------------------------------------------------------------------
# teacher signal -> pair of log-distributions


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types (bf16/fp16), unchanged for float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable on both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dense_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``log_softmax(z/T)`` of student and teacher, ``[n, V]`` each."""
    s = upcast(student_logits)
    t = upcast(teacher_logits.detach())
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)


def sparse_pair(student_logits: torch.Tensor, teacher: SparseTeacher, temperature: float, policy: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucketed log-distributions ``[n, k(+1)]`` for a sparse teacher (see module docstring)."""
    if policy not in SPARSE_POLICIES:
        raise ConfigError(f"unknown sparse_policy {policy!r}", f"use one of {', '.join(SPARSE_POLICIES)}")
    ids = teacher.ids.long()
    t_lp = upcast(teacher.logprobs.detach())
    pad = torch.isneginf(t_lp)
    s = upcast(student_logits)
    if temperature != 1.0:
        s = s / temperature
    if teacher.sampled:  # unbiased estimate summing to 1: student entries + rest bucket vs p_hat + 0
        check_sampled(teacher, temperature, policy)
        logq = torch.log_softmax(s, dim=-1).gather(-1, ids).masked_fill(pad, NEG_INF)
        q_rest = log1mexp(torch.logsumexp(logq, dim=-1, keepdim=True).clamp(max=_LOG_MASS_CAP))
        return torch.cat([logq, q_rest], dim=-1), torch.cat([t_lp, torch.full_like(q_rest, NEG_INF)], dim=-1)
    if policy == "renormalize":
        s_sel = s.gather(-1, ids).masked_fill(pad, NEG_INF)
        t_sel = t_lp / temperature if temperature != 1.0 else t_lp
        return torch.log_softmax(s_sel, dim=-1), torch.log_softmax(t_sel, dim=-1)
    # tail_bucket / student_full
    logq = torch.log_softmax(s, dim=-1).gather(-1, ids).masked_fill(pad, NEG_INF)
    vocab, k = teacher.vocab_size, teacher.k
    if k >= vocab:  # the top-k is the whole vocabulary: no tail, exactly the dense loss
        t_top = t_lp / temperature if temperature != 1.0 else t_lp
        return logq, torch.log_softmax(t_top, dim=-1)
    q_tail = log1mexp(torch.logsumexp(logq, dim=-1, keepdim=True).clamp(max=_LOG_MASS_CAP))
    if policy == "student_full":
        t_top = torch.log_softmax(t_lp / temperature if temperature != 1.0 else t_lp, dim=-1)
        return torch.cat([logq, q_tail], dim=-1), torch.cat([t_top, torch.full_like(q_tail, NEG_INF)], dim=-1)
    t_tail = log1mexp(torch.logsumexp(t_lp, dim=-1, keepdim=True).clamp(max=_LOG_MASS_CAP))
    if temperature != 1.0:
        log_unseen = math.log(vocab - k)
        t_tail = log_unseen + (t_tail - log_unseen) / temperature
        t_top = t_lp / temperature
    else:
        t_top = t_lp
    logp = torch.cat([t_top, t_tail], dim=-1)
    if temperature != 1.0:
        logp = torch.log_softmax(logp, dim=-1)
    return torch.cat([logq, q_tail], dim=-1), logp


def check_sampled(teacher: SparseTeacher, temperature: float, policy: str, name: str | None = None) -> None:
    """ConfigError unless a sampled-tail teacher is used where its estimate stays unbiased."""
    if not teacher.sampled:
        return
    fix_cache = "or build the cache without tail_samples (top-k only)"
    if name is not None and not (name in LOSSES and LOSSES.get(name).linear_in_teacher):
        linear = [n for n in LOSSES.names() if LOSSES.get(n).linear_in_teacher]
        raise ConfigError(
            f"{name} cannot use a sampled-tail teacher cache: the sampled entries are an unbiased estimate of the "
            f"teacher distribution only for losses linear in it ({', '.join(linear)}); "
            f"{name} would be biased",
            f"use forward_kl with this cache, {fix_cache}",
        )
    if temperature != 1.0:
        raise ConfigError(
            f"temperature={temperature} with a sampled-tail teacher cache: the tempered teacher p^(1/T) is not linear "
            "in p, so the sampled estimate would be biased",
            f"use temperature 1.0 with this cache, {fix_cache}",
        )
    if policy == "renormalize":
        raise ConfigError(
            "sparse_policy='renormalize' with a sampled-tail teacher cache drops the student's mass outside the "
            "drawn ids (biased; it diverged in benchmarks even for top-k)",
            "use sparse_policy='tail_bucket' or 'student_full' (identical for a sampled teacher)",
        )


def make_pair(student_logits: torch.Tensor, teacher: Teacher, temperature: float, sparse_policy: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(teacher, SparseTeacher):
        return sparse_pair(student_logits, teacher, temperature, sparse_policy)
    return dense_pair(student_logits, teacher, temperature)


# --------------------------------------------------------------------------------------------
# reductions and the driver


def reduce(per_pos: torch.Tensor, real: torch.Tensor | None, lead: tuple[int, ...], reduction: str
           ) -> torch.Tensor:
    """Reduce per-real-position values ``[n]`` (n = number of real positions)."""
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        return per_pos.sum() / max(per_pos.numel(), 1)
    if real is None:
        return per_pos.reshape(lead)
    out = per_pos.new_zeros(lead)
    return out.masked_scatter(real, per_pos) if per_pos.numel() else out + per_pos.sum()


def select(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``[..., V] -> [n, V]`` keeping real positions only."""
    if real is None:
        return x.reshape(-1, x.shape[-1])
    return x[real]


def select_teacher(teacher: Teacher, real: torch.Tensor | None) -> Teacher:
    if isinstance(teacher, SparseTeacher):
        return teacher.flatten() if real is None else teacher[real]
    return select(teacher, real)


def diagnose_nonfinite(name: str, student_logits: torch.Tensor, teacher: Teacher | None) -> NonFiniteError:
    """Build the most precise NonFiniteError for a non-finite loss."""
    if torch.isnan(student_logits).any():
        return NonFiniteError(
            f"{name}: student logits contain NaN",
            "the student diverged or overflowed: lower the learning rate, enable gradient clipping, or train in "
            "bf16/fp32 instead of fp16",
        )
    if torch.isposinf(student_logits).any():
        return NonFiniteError(f"{name}: student logits contain +Inf", "the student overflowed: use bf16/fp32")
    if isinstance(teacher, torch.Tensor) and (torch.isnan(teacher).any() or torch.isposinf(teacher).any()):
        return NonFiniteError(
            f"{name}: teacher logits contain NaN/+Inf",
            "check the teacher's dtype (fp16 overflow) and the cache it was read from",
        )
    if isinstance(teacher, SparseTeacher) and (torch.isnan(teacher.logprobs).any()
                                               or torch.isposinf(teacher.logprobs).any()):
        return NonFiniteError(f"{name}: sparse teacher log-probs contain NaN/+Inf", "rebuild the teacher cache")
    return NonFiniteError(
        f"{name}: the loss is not finite although the logits are (a distribution puts zero mass where the other "
        "puts positive mass, e.g. -inf logits on the student for tokens the teacher uses)",
        "do not mask student logits with -inf on tokens the teacher can emit, or use a bounded divergence "
        "(generalized_jsd, tvd, skew_forward_kl); with a SparseTeacher, sparse_policy='student_full' gives the "
        "teacher zero mass outside its top-k, so reverse-KL-type losses need 'tail_bucket' or 'renormalize'",
    )


def distill(
    name: str,
    kernel: Kernel,
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mask: torch.Tensor | None,
    temperature: float,
    reduction: str,
    sparse_policy: str,
    scale_t2: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """Apply ``kernel`` to (student, teacher) at real positions and reduce; see module docstring.

    Returns ``T^2 * kernel(...)`` reduced (``scale_t2``), computed in float32.
    """
    check_student(student_logits)
    check_teacher(student_logits, teacher)
    check_temperature(temperature)
    check_reduction(reduction)
    if sparse_policy not in SPARSE_POLICIES:
        raise ConfigError(f"unknown sparse_policy {sparse_policy!r}", f"use one of {', '.join(SPARSE_POLICIES)}")
    if isinstance(teacher, SparseTeacher):
        check_sampled(teacher, temperature, sparse_policy, name)
    lead = tuple(student_logits.shape[:-1])
    check_positions("mask", mask, lead)
    real = real_positions(lead, mask, student_logits.device)
    s = select(student_logits, real)
    t = select_teacher(teacher, real)
    if s.shape[0] == 0:
        per_pos = upcast(s).sum(-1)  # empty, keeps the graph: zero grads, no NaN
    else:
        logq, logp = make_pair(s, t, temperature, sparse_policy)
        # Dense logits rarely contain -inf: try the fast kernel and redo safely only if needed
        # (that needs a host read: without value checks the safe kernel runs directly).
        check_finite = check_finite and value_checks_enabled()
        safe = isinstance(t, SparseTeacher) or not check_finite
        per_pos = kernel(logq, logp, safe=safe)
        if check_finite and not bool(torch.isfinite(per_pos.detach()).all()):
            if not safe:
                per_pos = kernel(logq, logp, safe=True)
            if not bool(torch.isfinite(per_pos.detach()).all()):
                raise diagnose_nonfinite(name, s, t)
        if scale_t2 and temperature != 1.0:
            per_pos = per_pos * (temperature**2)
    return reduce(per_pos, real, lead, reduction)


# --------------------------------------------------------------------------------------------
# elementwise helpers for kernels


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor, safe: bool = True) -> torch.Tensor:
    """Elementwise ``a * (log a - log b)``.

    ``safe=True`` handles zero-probability entries (``0 log 0 = 0``, NaN-free gradients);
    ``safe=False`` is the fast path for inputs known to be finite (:func:`distill` falls back to
    the safe path if the fast one produced a non-finite value).
    """
    if not safe:
        return log_a.exp() * (log_a - log_b)
    live = ~torch.isneginf(log_a)  # NaN stays "live" so it propagates instead of vanishing
    la = torch.where(live, log_a, 0.0)
    lb = torch.where(live, log_b, 0.0)
    return torch.where(live, la.exp() * (la - lb), 0.0)


def kl(log_a: torch.Tensor, log_b: torch.Tensor, safe: bool = True) -> torch.Tensor:
    """``KL(a || b) = sum_i a_i (log a_i - log b_i)`` over the last axis."""
    return kl_terms(log_a, log_b, safe).sum(-1)


def drop_dead(logq: torch.Tensor, logp: torch.Tensor, safe: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace entries where both distributions are 0 by log 1 (masked out by the caller).

    Mixtures ``log(a q + b p)`` of two ``-inf`` entries have NaN gradients; this removes them.
    Returns ``(logq, logp, dead)`` with ``dead=None`` when there is no such entry (or not ``safe``).
    """
    if not safe:
        return logq, logp, None
    dead = torch.isneginf(logq) & torch.isneginf(logp)
    if not value_checks_enabled():  # no host read: mask whether or not an entry is dead (same values)
        return torch.where(dead, 0.0, logq), torch.where(dead, 0.0, logp), dead
    if not bool(dead.any()):
        return logq, logp, None
    return torch.where(dead, 0.0, logq), torch.where(dead, 0.0, logp), dead


def sum_alive(terms: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """Sum ``terms`` over the last axis, skipping ``dead`` entries (see :func:`drop_dead`)."""
    return (terms if dead is None else torch.where(dead, 0.0, terms)).sum(-1)
