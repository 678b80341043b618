"""Vocabulary-free losses for cross-tokenizer distillation: ULD and the GOLD-style hybrid.

When teacher and student use different tokenizers, token ids mean different strings, so a KL over
ids pairs unrelated tokens. These losses compare the two next-token distributions without a shared
vocabulary (positions are matched beforehand by :mod:`kdforge.teachers.alignment`):

* **ULD** (Universal Logit Distillation, Boizard et al. 2024, arXiv:2402.12030): sort both
  probability vectors in decreasing order, pad the shorter with zeros to ``V = max(V_s, V_t)``,
  and take the L1 distance::

      uld(p, q) = sum_i | p_(i) - q_(i) |          p_(1) >= p_(2) >= ...,  q_(1) >= q_(2) >= ...

  This is ``V`` times the Wasserstein-1 distance between the empirical distributions of the
  ``V`` probability *values* of each side (on the real line, W1 between two equal-size empirical
  measures matches sorted samples). It only sees the shape of each distribution, so it is
  invariant to any permutation of either vocabulary, and 0 iff the sorted spectra agree.
* **GOLD-style hybrid** (TRL's ``trl.experimental.gold`` idea): tokens whose *string* exists in
  both vocabularies are compared exactly, the rest by ULD::

      gold = shared_weight * GKL([p_M, p_rest] || [q_M, q_rest]) + rest_weight * uld(p_unshared, q_unshared)

  ``p_M`` / ``q_M`` are the probabilities of the ``M`` shared tokens (matched by string, in the
  same order), ``p_rest`` / ``q_rest`` each side's remaining mass (one bucket), and
  ``GKL(a || b) = sum a log(a/b) - sum a + sum b`` the generalised KL (the ordinary KL when both
  sides sum to 1; it stays a divergence for the unnormalised merged distributions below). With one
  shared vocabulary (``M = V``) and ``rest_weight`` anything, ``gold`` is the forward KL; with no
  shared token it is ``uld`` (tested).

**Teacher signal.** Either a dense ``[..., V_t]`` tensor of teacher logits *already at the
student's positions* (any width), or a :class:`CrossVocabTeacher` built by
:class:`~kdforge.teachers.sources.CrossTokenizerTeacher`: the teacher logits gathered onto the
student's positions plus the alignment (which positions are compared; the span merges). Under the
``"merge"`` span policy a group of several tokens is compared at its first position, each side's
distribution multiplied by its own probability of the group's remaining actual tokens (chain rule,
at ``T = 1``): ``log q'(v) = log q_T(v) + sum_{later j} log q(y_j)``, the same for the teacher
(``log_scale``). Merged distributions sum to less than 1.

Temperature ``T`` divides both sides' logits before the softmax; no ``T^2`` factor (the ULD paper
has none; the losses are bounded by 2 per position). Computed in float32 for half inputs; masked
positions are dropped before any arithmetic; the teacher never receives a gradient. Cost: one sort
of each side's ``[n, V]`` probabilities per compared position (no chunked path).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import (
    SparsePolicy,
    check_reduction,
    check_student,
    check_temperature,
    diagnose_nonfinite,
    reduce,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss

__all__ = ["CrossVocabTeacher", "gold", "shared_top1_agreement", "uld"]


@dataclass(frozen=True)
class CrossVocabTeacher:
    """A teacher in another vocabulary, at the student's loss positions.

    Attributes:
        logits: ``[B, P, V_t]`` teacher logits at the student's ``P`` loss positions.
        mask: ``[B, P]`` bool, positions with a teacher counterpart (None: all).
        log_scale: ``[B, P]`` the teacher's log merge factor (log-probability at ``T = 1`` of the
            rest of its span group), 0 where none (None: no merging).
        student_merge: ``[B, P]`` int64, for a later position of a merged student group the
            group's first position, else -1 (None: no merging).
        student_next: ``[B, P]`` int64, the student's actual next tokens (``input_ids[:, 1:]``),
            needed with ``student_merge``.
        shared_student_ids / shared_teacher_ids: ``[M]`` int64, the tokens both vocabularies hold
            (same string), in matching order (the hybrid loss; None: unknown).
    """

    logits: torch.Tensor
    mask: torch.Tensor | None = None
    log_scale: torch.Tensor | None = None
    student_merge: torch.Tensor | None = None
    student_next: torch.Tensor | None = None
    shared_student_ids: torch.Tensor | None = None
    shared_teacher_ids: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The logits' shape (so shape checks read it like a dense teacher)."""
        return self.logits.shape

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CrossVocabTeacher:
        """Every tensor on ``device``; the logits also cast to ``dtype``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if f.name == "logits" and dtype else value.dtype)
            moved[f.name] = value
        return CrossVocabTeacher(**moved)

    def positions(self, fn) -> CrossVocabTeacher:  # noqa: ANN001 - a slice over the leading dims
        """The teacher with ``fn`` applied to its per-position tensors (not to the vocabulary maps).

        Merge indices point into the position axis, so ``fn`` must keep it whole (row slices only).
        """
        per_pos = ("logits", "mask", "log_scale", "student_merge", "student_next")
        return replace(self, **{n: fn(getattr(self, n)) for n in per_pos if getattr(self, n) is not None})


#: how a sparse top-k teacher is completed to a full distribution before sorting
SPARSE_COMPLETIONS = ("tail_bucket", "renormalize", "student_full")


def _complete_sparse(teacher: SparseTeacher, sparse_policy: str, name: str) -> torch.Tensor:
    """Dense teacher log-probs from a top-k: the tail spread uniformly (``tail_bucket``) or dropped
    and the top-k renormalised (``renormalize`` / ``student_full``: the student stays full anyway)."""
    if sparse_policy not in SPARSE_COMPLETIONS:
        raise ConfigError(f"unknown sparse_policy {sparse_policy!r}", f"use one of {', '.join(SPARSE_COMPLETIONS)}")
    if teacher.sampled:
        raise ConfigError(
            f"{name} is not linear in the teacher distribution, so a sampled-tail teacher gives a biased loss",
            "build the cache without sampled tail entries (exact top-k), or use forward_kl",
        )
    if sparse_policy == "tail_bucket":
        return teacher.to_dense_logprobs()
    return torch.log_softmax(teacher.to_dense_logprobs(fill=float("-inf")), dim=-1)


def _as_cross(student_logits: torch.Tensor, teacher: object, name: str, sparse_policy: str = "tail_bucket"
              ) -> CrossVocabTeacher:
    if isinstance(teacher, CrossVocabTeacher):
        cross = teacher
    elif isinstance(teacher, torch.Tensor):
        cross = CrossVocabTeacher(teacher)
    elif isinstance(teacher, SparseTeacher):
        cross = CrossVocabTeacher(_complete_sparse(teacher, sparse_policy, name))
    else:
        raise ShapeError(f"{name}: teacher must be logits or a CrossVocabTeacher, got {type(teacher).__name__}",
                         "pass the teacher's logits at the student's positions")
    lead = tuple(student_logits.shape[:-1])
    if tuple(cross.logits.shape[:-1]) != lead:
        raise ShapeError(
            f"{name}: teacher logits {tuple(cross.logits.shape)} are not at the student's positions {lead}",
            "align the teacher to the student's positions first (CrossTokenizerTeacher does it by character offsets)",
        )
    if cross.student_merge is not None and (cross.student_next is None or len(lead) != 2):
        raise ShapeError(f"{name}: merged groups need student_next and [B, P] positions",
                         "build the CrossVocabTeacher with CrossTokenizerTeacher")
    return cross


def _compared(lead: tuple[int, ...], mask: torch.Tensor | None, cross: CrossVocabTeacher, device: torch.device
              ) -> torch.Tensor:
    real = torch.ones(lead, dtype=torch.bool, device=device)
    if mask is not None:
        if tuple(mask.shape) != lead:
            raise ShapeError(f"mask has shape {tuple(mask.shape)}, expected {lead}", "pass a [...] mask of positions")
        real = real & mask.to(device).bool()
    if cross.mask is not None:
        real = real & cross.mask.to(device).bool()
    return real


def _student_logprobs(z: torch.Tensor, cross: CrossVocabTeacher, real: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """``[n, V_s]`` tempered student log-probs at the compared positions, merged groups folded in."""
    rows = z[real]
    logq = torch.log_softmax(rows / temperature if temperature != 1.0 else rows, dim=-1)
    if cross.student_merge is None:
        return logq
    merge = cross.student_merge.to(z.device)
    later = merge >= 0
    later_rows = z[later]  # only the positions folded into a group start (no padding arithmetic)
    y = cross.student_next.to(z.device)[later].long()
    lq_y = later_rows.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(later_rows, dim=-1)
    b_idx = later.nonzero()[:, 0]
    scale = z.new_zeros(merge.shape).index_put((b_idx, merge[later]), lq_y, accumulate=True)
    return logq + scale[real][:, None]


def _teacher_logprobs(cross: CrossVocabTeacher, real: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = upcast(cross.logits.detach())[real.to(cross.logits.device)].to(real.device)
    logp = torch.log_softmax(rows / temperature if temperature != 1.0 else rows, dim=-1)
    if cross.log_scale is not None:
        logp = logp + cross.log_scale.to(device=real.device, dtype=logp.dtype)[real][:, None]
    return logp


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_i |p_(i) - q_(i)|`` over the last axis, both sorted decreasingly, the shorter zero-padded.

    Only the narrower side (width ``w``) is sorted in full. Past ``w`` the padded side is 0, so the
    wider side contributes the sum of its values below its ``w`` largest: ``sum(x) - sum(topk(x, w))``.
    A partial selection (``topk``) instead of a full sort: for GOLD's unshared teacher tokens
    (~45k of SmolLM2's 49k against a few hundred unshared student tokens) the sort was most of a
    training step on CPU.
    """
    width = min(p.shape[-1], q.shape[-1])
    p_top, p_tail = _top_and_tail(p, width)
    q_top, q_tail = _top_and_tail(q, width)
    return (p_top - q_top).abs().sum(-1) + p_tail + q_tail


def _top_and_tail(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``x``'s ``width`` largest values, decreasing, and the sum of the others (``0.0`` if none)."""
    if x.shape[-1] == width:
        return x.sort(dim=-1, descending=True).values, 0.0
    top = x.topk(width, dim=-1, sorted=True).values
    return top, (x.sum(-1) - top.sum(-1)).clamp_min(0.0)


def _setup(student_logits: torch.Tensor, teacher: object, mask: torch.Tensor | None, temperature: float,
           reduction: str, name: str, sparse_policy: str
           ) -> tuple[CrossVocabTeacher, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_student(student_logits)
    check_reduction(reduction)
    check_temperature(temperature)
    cross = _as_cross(student_logits, teacher, name, sparse_policy)
    lead = tuple(student_logits.shape[:-1])
    z = upcast(student_logits)
    real = _compared(lead, mask, cross, z.device)
    return cross, real, _student_logprobs(z, cross, real, temperature), _teacher_logprobs(cross, real, temperature)


@register_loss("uld", description="ULD: L1 between sorted teacher/student probabilities (vocabulary-free, "
               "cross-tokenizer)", paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal "
               "Logit Distillation Loss for LLMs", sparse_ok=True)
def uld(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacher | CrossVocabTeacher, *,
        mask: torch.Tensor | None = None, temperature: float = 1.0, reduction: str = "mean",
        labels: torch.Tensor | None = None, sparse_policy: SparsePolicy = "tail_bucket",
        check_finite: bool = True) -> torch.Tensor:
    """Universal Logit Distillation: ``sum_i |p_(i) - q_(i)|`` of the sorted probabilities.

    Args:
        student_logits: ``[..., V_s]``.
        teacher: ``[..., V_t]`` logits at the same positions (any ``V_t``), a :class:`CrossVocabTeacher`,
            or a :class:`~kdforge.losses.signal.SparseTeacher` (completed to a full distribution
            first: ``sparse_policy="tail_bucket"`` spreads the tail mass uniformly over the unseen
            tokens, ``"renormalize"`` / ``"student_full"`` renormalise the top-k; exact top-k only).
        mask: ``[...]`` real positions; a :class:`CrossVocabTeacher` narrows it to the aligned ones.
        temperature: divides both sides' logits (no ``T^2``).
        reduction: ``"mean"`` over compared positions, ``"sum"``, or ``"none"`` (``[...]``, 0 elsewhere).
        labels: ignored (uniform loss signature).
        check_finite: raise :class:`~kdforge.errors.NonFiniteError` (naming student or teacher) when
            the loss is NaN/Inf.
    """
    cross, real, logq, logp = _setup(student_logits, teacher, mask, temperature, reduction, "uld", sparse_policy)
    per_pos = _sorted_l1(logp.exp(), logq.exp())
    return _finish(per_pos, real, student_logits, cross, reduction, check_finite, "uld")


def _finish(per_pos: torch.Tensor, real: torch.Tensor, student_logits: torch.Tensor, cross: CrossVocabTeacher,
            reduction: str, check_finite: bool, name: str) -> torch.Tensor:
    if check_finite and value_checks_enabled() and not bool(torch.isfinite(per_pos.detach()).all()):
        raise diagnose_nonfinite(name, student_logits[real], cross.logits[real.to(cross.logits.device)])
    return reduce(per_pos, real, tuple(student_logits.shape[:-1]), reduction)


def _gkl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise ``a log(a/b) - a + b`` (0 where both are 0; ``a log a`` terms with ``a = 0`` are 0)."""
    a, b = log_a.exp(), log_b.exp()
    live = ~torch.isneginf(log_a)
    la = torch.where(live, log_a, 0.0)
    lb = torch.where(live, log_b, 0.0)
    return torch.where(live, a * (la - lb), 0.0) - a + b


@register_loss("gold", description="GOLD-style hybrid: exact KL on tokens both vocabularies share (by string) + "
               "ULD on the rest", paper="TRL GOLD trainer (trl.experimental.gold): hybrid ULD with exact matches on "
               "shared tokens", sparse_ok=True)
def gold(student_logits: torch.Tensor, teacher: CrossVocabTeacher | torch.Tensor | SparseTeacher, *,
         mask: torch.Tensor | None = None, temperature: float = 1.0, reduction: str = "mean",
         labels: torch.Tensor | None = None, shared_weight: float = 1.0, rest_weight: float = 1.0,
         sparse_policy: SparsePolicy = "tail_bucket", check_finite: bool = True) -> torch.Tensor:
    """Generalised KL over the shared tokens (+ one rest bucket) plus ULD over the unshared ones.

    ``sum_s a_s log(a_s / b_s) - a_s + b_s`` over the shared tokens ``s`` and the rest bucket
    (``a``: teacher, ``b``: student; the bucket holds each side's mass outside the shared
    tokens), plus ``sum_i |p_(i) - q_(i)|`` over each side's unshared probabilities sorted
    decreasingly. When *every* student token is shared (the student vocabulary is a subset of the
    teacher's) the student has no rest bucket, so the bucket is left out: the teacher's mass on
    tokens the student cannot emit is then only in the (student-independent) ULD part, instead of
    an infinite ``a log(a / 0)``.

    Args:
        student_logits: ``[..., V_s]``.
        teacher: a :class:`CrossVocabTeacher` with ``shared_student_ids`` / ``shared_teacher_ids``, or
            dense logits of the student's width (one vocabulary: every token shared, ``gold`` = KL).
        shared_weight / rest_weight: weights of the exact part and of the ULD part (``>= 0``).
        mask, temperature, reduction, labels, sparse_policy, check_finite: as :func:`uld`.
    """
    for key, value in (("shared_weight", shared_weight), ("rest_weight", rest_weight)):
        if not (isinstance(value, int | float) and value >= 0):
            raise ConfigError(f"gold: {key} must be a number >= 0, got {value!r}", f"set {key}: 1.0")
    if isinstance(teacher, torch.Tensor | SparseTeacher) and isinstance(student_logits, torch.Tensor):
        width = teacher.vocab_size if isinstance(teacher, SparseTeacher) else teacher.shape[-1]
        if width == student_logits.shape[-1]:  # one vocabulary: every token is shared
            ids = torch.arange(width, device=student_logits.device)
            teacher = replace(_as_cross(student_logits, teacher, "gold", sparse_policy),
                              shared_student_ids=ids, shared_teacher_ids=ids)
    if not isinstance(teacher, CrossVocabTeacher) or teacher.shared_student_ids is None:
        raise ConfigError(
            "gold needs the map of the tokens both vocabularies share (a CrossVocabTeacher with shared ids)",
            "wrap the teacher in kdforge.teachers.CrossTokenizerTeacher (it matches the vocabularies by string), "
            "or use the vocabulary-free loss uld",
        )
    cross, real, logq, logp = _setup(student_logits, teacher, mask, temperature, reduction, "gold", sparse_policy)
    s_ids = cross.shared_student_ids.to(logq.device).long()
    t_ids = cross.shared_teacher_ids.to(logq.device).long()
    s_shared = torch.zeros(logq.shape[-1], dtype=torch.bool, device=logq.device).index_fill(0, s_ids, True)
    t_shared = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device).index_fill(0, t_ids, True)
    log_a, log_b = logp[:, t_ids], logq[:, s_ids]
    rest_t, rest_s = logp[:, ~t_shared], logq[:, ~s_shared]  # the unshared columns, taken once for both parts
    # a student with no unshared token has no rest bucket to put mass in (the shared ids are distinct,
    # so their count decides it without reading a tensor back to the host)
    if s_ids.numel() < logq.shape[-1]:
        log_a = torch.cat([log_a, torch.logsumexp(rest_t, dim=-1, keepdim=True)], dim=-1)
        log_b = torch.cat([log_b, torch.logsumexp(rest_s, dim=-1, keepdim=True)], dim=-1)
    exact = _gkl_terms(log_a, log_b).sum(-1)
    per_pos = shared_weight * exact
    if rest_weight:
        per_pos = per_pos + rest_weight * _sorted_l1(rest_t.exp(), rest_s.exp())
    return _finish(per_pos, real, student_logits, cross, reduction, check_finite, "gold")


@torch.no_grad()
def shared_top1_agreement(student_logits: torch.Tensor, teacher: CrossVocabTeacher,
                          mask: torch.Tensor | None = None) -> tuple[int, int]:
    """Top-1 agreement at the compared positions, through the shared vocabulary.

    Pass ``mask=alignment.one_to_one`` (:class:`~kdforge.teachers.alignment.TokenAlignment`) to count
    only the spans both tokenizers cut alike (both models then predict the same text). Counts the
    compared positions where the teacher's most probable token is a shared one (same
    string in both vocabularies), and among them those where the student's most probable token is
    that same string. Returns ``(agreeing, counted)`` (host ints; for evaluation, not the hot path).
    """
    cross = _as_cross(student_logits, teacher, "shared_top1_agreement")
    if cross.shared_student_ids is None:
        raise ConfigError("agreement needs the shared vocabulary", "build the teacher with CrossTokenizerTeacher")
    real = _compared(tuple(student_logits.shape[:-1]), mask, cross, student_logits.device)
    t_top = cross.logits.to(student_logits.device)[real].argmax(-1)
    s_top = student_logits[real].argmax(-1)
    to_student = torch.full((cross.vocab_size,), -1, dtype=torch.long, device=student_logits.device)
    to_student[cross.shared_teacher_ids.to(to_student.device)] = cross.shared_student_ids.to(to_student.device)
    mapped = to_student[t_top]
    counted = mapped >= 0
    return int((counted & (mapped == s_top)).sum().item()), int(counted.sum().item())
