"""Token-level divergences between teacher and student output distributions.

Notation: ``p = softmax(z_t / T)`` (teacher), ``q = softmax(z_s / T)`` (student), over the last
axis (vocabulary or classes). Every loss here:

* takes ``student_logits [..., V]`` and ``teacher`` = dense logits ``[..., V]`` or a
  :class:`~kdforge.losses.signal.SparseTeacher` ``[..., k]`` (mass outside the top-k handled by
  ``sparse_policy``, see :mod:`kdforge.losses._core`),
* returns ``T^2 * D`` (Hinton et al. 2015 scaling, keeps gradient magnitudes comparable across
  temperatures), reduced over real positions (``mask``): ``"mean"`` (sum / #real, 0 when none),
  ``"sum"`` or ``"none"`` (``[...]``, zeros at masked positions),
* computes in float32 whatever the input dtype, and never differentiates through the teacher,
* accepts ``labels`` and ignores it (uniform trainer call).

Each divergence is written here once per form it is evaluated in: a *kernel on
log-distributions* ``(logq, logp) -> [n]`` (the autograd path: dense or sparse teacher, any
temperature, through :func:`~kdforge.losses._core.distill`) and, where the gradient has a short
closed form, a *closed form* ``(logq, q, t, *params) -> (D [r], G [r, V])`` giving the value and
``dD/ds = scale * G`` in one pass for the chunked LM-head path (eager, or the same function
through ``torch.compile``; :mod:`kdforge.losses.closed_form`). With ``s = z_s / T``,
``q = softmax(s)``, ``p = softmax(z_t / T)`` and ``dD/ds = q (g - sum q g)``, ``g = dD/dq``:

* forward KL ``KL(p||q)``: ``dD/ds = q - p``.
* reverse KL ``KL(q||p)``: ``g = log q - log p + 1``, ``dD/ds = q (log q - log p - KL(q||p))``.
* generalised JSD ``beta KL(p||m) + (1 - beta) KL(q||m)``, ``m = beta p + (1 - beta) q``:
  ``dD/dq_j = (1 - beta)(log q_j - log m_j)`` (the ``log m`` derivatives cancel), hence
  ``dD/ds = (1 - beta) q (log q - log m - KL(q||m))``.
* TVD ``0.5 sum |p - q|``: ``dD/ds = 0.5 q (sign(q - p) - sum q sign(q - p))`` (``sign(0) = 0``,
  as autograd's ``abs``).
* skew forward KL ``KL(p||m)``, ``m = alpha p + (1 - alpha) q``: ``g = -(1 - alpha) p / m``.
* skew reverse KL ``KL(q||m)``, ``m = alpha q + (1 - alpha) p``: ``g = log q - log m - alpha q/m (+1)``.

Each loss is registered with :func:`~kdforge.losses.spec.register_loss`, which records its
declared needs (sparse teacher, sampled tail, closed form) on its spec.

Pass count per chunk of the closed forms (the ``[r, V]`` reads/writes that dominate on CPU): the
student's log-softmax and ``exp`` (shared by every kernel, and by a cross-entropy term at
``T = 1``), the teacher's log-softmax, then 4 (forward KL), 4 (reverse KL), 10 (JSD) more (row
dots included). The autograd path runs more than twice as many, most into fresh ``[r, V]`` buffers.
"""

from __future__ import annotations

import math

import torch

from kdforge.losses._core import (
    SparsePolicy,
    Teacher,
    check_unit_interval,
    distill,
    drop_dead,
    kl,
    kl_terms,
    sum_alive,
)
from kdforge.losses.closed_form import (
    ClosedForm,
    FusedKernel,
    log_softmax_into,
    rowdot,
    softmax_into,
    tiny,
)
from kdforge.losses.spec import register_loss

__all__ = [
    "adaptive_kl",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]


# --------------------------------------------------------------------------------------------
# kernels on log-distributions (logq = student, logp = teacher), shape [n, K] -> [n]


def fkl_kernel(logq: torch.Tensor, logp: torch.Tensor, safe: bool = True) -> torch.Tensor:
    """``KL(p || q)``."""
    return kl(logp, logq, safe)


def rkl_kernel(logq: torch.Tensor, logp: torch.Tensor, safe: bool = True) -> torch.Tensor:
    """``KL(q || p)``."""
    return kl(logq, logp, safe)


def gjsd_kernel(logq: torch.Tensor, logp: torch.Tensor, beta: float, safe: bool = True) -> torch.Tensor:
    """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``; FKL at 0, RKL at 1."""
    if beta == 0.0:
        return fkl_kernel(logq, logp, safe)
    if beta == 1.0:
        return rkl_kernel(logq, logp, safe)
    lq, lp, dead = drop_dead(logq, logp, safe)
    logm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    terms = beta * kl_terms(lp, logm, safe) + (1.0 - beta) * kl_terms(lq, logm, safe)
    return sum_alive(terms, dead)


def tvd_kernel(logq: torch.Tensor, logp: torch.Tensor, safe: bool = True) -> torch.Tensor:
    """``0.5 * sum |p - q|``."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skew_fkl_kernel(logq: torch.Tensor, logp: torch.Tensor, alpha: float, safe: bool = True) -> torch.Tensor:
    """``KL(p || alpha p + (1 - alpha) q)``."""
    if alpha == 0.0:
        return fkl_kernel(logq, logp, safe)
    lq, lp, dead = drop_dead(logq, logp, safe)
    logm = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha)) if alpha < 1 else lp
    return sum_alive(kl_terms(lp, logm, safe), dead)


def skew_rkl_kernel(logq: torch.Tensor, logp: torch.Tensor, alpha: float, safe: bool = True) -> torch.Tensor:
    """``KL(q || alpha q + (1 - alpha) p)``."""
    if alpha == 0.0:
        return rkl_kernel(logq, logp, safe)
    lq, lp, dead = drop_dead(logq, logp, safe)
    logm = torch.logaddexp(lq + math.log(alpha), lp + math.log1p(-alpha)) if alpha < 1 else lq
    return sum_alive(kl_terms(lq, logm, safe), dead)


def akl_weights(logq: torch.Tensor, logp: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL's detached head/tail weights ``(g_head, g_tail) / (g_head + g_tail)``, each ``[n]``.

    Head = the teacher's most probable entries whose cumulative teacher mass (sorted descending)
    stays within ``mu``, the top-1 always included; tail = the rest. ``g_* = sum |p - q|`` over
    each part.
    """
    with torch.no_grad():
        p = logp.exp()
        q = logq.exp()
        p_sorted, order = p.sort(dim=-1, descending=True)
        gap = (p_sorted - q.gather(-1, order)).abs()
        cum_before = p_sorted.cumsum(-1) - p_sorted
        head = cum_before < mu
        head[..., 0] = True
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        safe = total > 0
        w_head = torch.where(safe, g_head / torch.where(safe, total, 1.0), 0.5)
        return w_head, 1.0 - w_head


def akl_kernel(logq: torch.Tensor, logp: torch.Tensor, mu: float, safe: bool = True) -> torch.Tensor:
    """``w_head * KL(p || q) + w_tail * KL(q || p)`` with the weights of :func:`akl_weights`."""
    w_head, w_tail = akl_weights(logq, logp, mu)
    return w_head * fkl_kernel(logq, logp, safe) + w_tail * rkl_kernel(logq, logp, safe)


# --------------------------------------------------------------------------------------------
# closed forms for the chunked path: (logq, q, t, *params) -> (per_pos [r], G [r, V]), with
# logq/q the student's log-probs/probs at T (q read only, logq may be overwritten) and t the
# teacher's logits / T. The in-place ops reuse every buffer (see the module docstring). Those
# taking ``out`` (a preallocated [r, V] buffer) return G in it and allocate no [r, V] array then.


def fkl_closed_form(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(p||q)``; ``dD/ds = q - p``, returned as ``G = p - q`` (scale -1) in the teacher's buffer
    (``out`` when given: ``log p`` there, ``log p - log q`` over ``logq``, then ``p`` and ``G`` in place)."""
    if out is not None:
        logp = log_softmax_into(t, out)
        d = torch.sub(logp, logq, out=logq)  # log p - log q (logq is free)
        p = logp.exp_()
        return rowdot(p, d), p.sub_(q)
    logp = torch.log_softmax(t, dim=-1)
    p = logp.exp()
    per_pos = rowdot(p, logp.sub_(logq))  # sum p (log p - log q)
    del logp
    return per_pos, p.sub_(q)


def rkl_closed_form(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(q||p)``; ``dD/ds = q (log q - log p - KL)`` (scale 1); four passes over ``[r, V]``
    after the teacher's log-softmax, all in one buffer (``out`` when given)."""
    d = log_softmax_into(t, out)
    torch.sub(logq, d, out=d)  # log q - log p
    per_pos = rowdot(q, d)
    return per_pos, d.sub_(per_pos.unsqueeze(1)).mul_(q)


def jsd_closed_form(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``beta KL(p||m) + (1-beta) KL(q||m)``; ``dD/ds = (1-beta) q (log q - log m - KL(q||m))``
    (scale ``1 - beta``), for ``0 < beta < 1``.

    Works with ``m' = m / (1 - beta) = q + beta/(1-beta) p`` (one fused pass instead of a
    ``lerp``): ``log m = log m' + log(1 - beta)``, so with ``d' = log q - log m'``,
    ``KL(q||m) = sum q d' - log(1-beta)``, ``KL(p||m) = sum p (log p - log m') - log(1-beta)``
    (both distributions sum to 1) and the constant cancels in ``d - KL(q||m) = d' - sum q d'``.
    """
    logp = torch.log_softmax(t, dim=-1)
    p = logp.exp()
    logm = torch.add(q, p, alpha=beta / (1.0 - beta)).clamp_min_(tiny(q)).log_()  # log m'
    kl_p = rowdot(p, logp.sub_(logm))
    del logp, p
    d = torch.sub(logq, logm, out=logm)  # d' = log q - log m'
    kl_q = rowdot(q, d)
    grad = d.sub_(kl_q.unsqueeze(1)).mul_(q)
    shift = math.log1p(-beta)
    return beta * (kl_p - shift) + (1.0 - beta) * (kl_q - shift), grad


def tvd_closed_form(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 sum |p - q|``; ``dD/ds = 0.5 q (sign(q-p) - sum q sign(q-p))`` (scale 0.5)."""
    diff = softmax_into(t, out)
    torch.sub(q, diff, out=diff)  # q - p
    per_pos = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    sgn = diff.sign_()
    c = rowdot(q, sgn)
    return per_pos, sgn.sub_(c.unsqueeze(1)).mul_(q)


def skew_fkl_closed_form(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, alpha: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(p||m)``, ``m = alpha p + (1-alpha) q``; ``dD/ds = -(1-alpha) q (p/m - sum q p/m)``
    (scale ``-(1 - alpha)``), for ``0 < alpha < 1``."""
    logp = torch.log_softmax(t, dim=-1)
    p = logp.exp()
    m = torch.lerp(q, p, alpha).clamp_min_(tiny(q))
    per_pos = rowdot(p, logp.sub_(torch.log(m, out=logq)))  # logq is free from here on
    del logp
    r = p.div_(m)  # p / m
    del m
    c = rowdot(q, r)
    return per_pos, r.sub_(c.unsqueeze(1)).mul_(q)


def skew_rkl_closed_form(logq: torch.Tensor, q: torch.Tensor, t: torch.Tensor, alpha: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(q||m)``, ``m = alpha q + (1-alpha) p``, ``g = log q - log m - alpha q/m``; returns
    ``G = q (h - sum q h)`` with ``h = -g`` (scale -1), for ``0 < alpha < 1``.

    (``-g`` rather than ``g``: ``log m - log q`` goes into the fresh ``log m`` buffer, leaving
    ``logq`` untouched, which TorchInductor's CPU loop fusion needs.)
    """
    m = torch.lerp(torch.softmax(t, dim=-1), q, alpha).clamp_min_(tiny(q))
    h = torch.log(m).sub_(logq)  # log m - log q
    per_pos = -rowdot(q, h)
    h.addcdiv_(q, m, value=alpha)  # h = log m - log q + alpha q / m = -g
    del m
    c = rowdot(q, h)
    return per_pos, h.sub_(c.unsqueeze(1)).mul_(q)


# forward KL and TVD: with the CPU workspace's buffer their eager in-place forms are faster than the
# compiled ones (per 256 x 32768 chunk, forward KL 32 vs 42 ms incl. the student's softmax passes;
# benchmarks/closed_form_chunk.py); reverse KL and the rest gain from compiling
forward_kl_kernel = ClosedForm(fkl_closed_form, scale=-1.0, eager_into=True)
reverse_kl_kernel = ClosedForm(rkl_closed_form)
tvd_chunk_kernel = ClosedForm(tvd_closed_form, scale=0.5, eager_into=True)


def _in_unit(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


def _gjsd_chunk(params: dict) -> FusedKernel | None:
    beta = params["beta"]
    if not _in_unit(beta):
        return None  # the autograd path raises the user-facing ConfigError
    if beta == 0.0:
        return forward_kl_kernel
    if beta == 1.0:
        return reverse_kl_kernel
    return ClosedForm(jsd_closed_form, (beta,), 1.0 - beta)


def _skew_fkl_chunk(params: dict) -> FusedKernel | None:
    alpha = params["alpha"]
    if not _in_unit(alpha) or alpha == 1.0:
        return None
    return forward_kl_kernel if alpha == 0.0 else ClosedForm(skew_fkl_closed_form, (alpha,), -(1.0 - alpha))


def _skew_rkl_chunk(params: dict) -> FusedKernel | None:
    alpha = params["alpha"]
    if not _in_unit(alpha) or alpha == 1.0:
        return None
    return reverse_kl_kernel if alpha == 0.0 else ClosedForm(skew_rkl_closed_form, (alpha,), -1.0)


# --------------------------------------------------------------------------------------------
# public losses


@register_loss("forward_kl", description="KL(p_teacher || q_student) * T^2: Hinton KD, mean-seeking",
               paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network", linear_in_teacher=True,
               kernel=lambda params: forward_kl_kernel)
def forward_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Forward KL, ``T^2 * KL(p || q) = T^2 * sum_v p_v (log p_v - log q_v)`` (Hinton et al., 2015).

    Mean-seeking: the student is pushed to cover every token the teacher gives mass to.

    Args:
        student_logits: ``[..., V]`` student logits (any float dtype; computed in float32).
        teacher: dense teacher logits ``[..., V]`` or a ``SparseTeacher`` ``[..., k]``.
        mask: bool ``[...]``, True at real positions (None: all real).
        temperature: softmax temperature ``T`` applied to both sides; the result is scaled by ``T^2``.
        reduction: ``"mean"`` over real positions, ``"sum"``, or ``"none"`` (``[...]``).
        labels: ignored (uniform signature).
        sparse_policy: ``"tail_bucket"``, ``"renormalize"`` or ``"student_full"`` for a sparse
            teacher (see :mod:`kdforge.losses._core`).
        check_finite: raise :class:`~kdforge.errors.NonFiniteError` when the loss is NaN/Inf (one
            device sync per call; set False inside CUDA graphs or tight loops).

    Returns:
        Scalar, or ``[...]`` for ``reduction="none"``.

    Example:
        >>> loss = forward_kl(student_logits, teacher_logits, mask=attention_mask.bool(), temperature=2.0)
    """
    return distill("forward_kl", fkl_kernel, student_logits, teacher, mask=mask, temperature=temperature,
                   reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


@register_loss("reverse_kl", description="KL(q_student || p_teacher) * T^2: mode-seeking (MiniLLM)",
               paper="Gu et al. 2024, MiniLLM", kernel=lambda params: reverse_kl_kernel)
def reverse_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Reverse KL, ``T^2 * KL(q || p) = T^2 * sum_v q_v (log q_v - log p_v)`` (Gu et al., MiniLLM 2024).

    Mode-seeking: the student may drop low-probability teacher modes but is penalised for mass
    where the teacher has little. Arguments as :func:`forward_kl`.
    """
    return distill("reverse_kl", rkl_kernel, student_logits, teacher, mask=mask, temperature=temperature,
                   reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


@register_loss("generalized_jsd",
               description="beta-skewed Jensen-Shannon (GKD); beta=0 forward KL, beta=1 reverse KL",
               paper="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)", kernel=_gjsd_chunk)
def generalized_jsd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Generalised JSD (Agarwal et al., GKD 2024), TRL's ``beta`` convention.

    ``m = beta * p + (1 - beta) * q`` (computed in log space with logsumexp);
    ``JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)``, times ``T^2``.
    ``beta = 0`` is exactly :func:`forward_kl`, ``beta = 1`` exactly :func:`reverse_kl`
    (the formula itself vanishes at the endpoints; like TRL we switch to the KL there).
    ``beta = 0.5`` is the symmetric Jensen-Shannon divergence (bounded by ``log 2``).
    Differs from ``trl``'s ``generalized_jsd_loss`` only by the ``T^2`` factor and the reduction.
    """
    check_unit_interval("beta", beta)
    return distill("generalized_jsd", lambda lq, lp, safe: gjsd_kernel(lq, lp, float(beta), safe), student_logits, teacher,
                   mask=mask, temperature=temperature, reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


@register_loss("jsd", description="symmetric Jensen-Shannon divergence (generalized_jsd with beta=0.5)",
               paper="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)", kernel=_gjsd_chunk)
def jsd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    beta: float = 0.5,
    check_finite: bool = True,
) -> torch.Tensor:
    """Jensen-Shannon divergence: :func:`generalized_jsd` with ``beta = 0.5`` by default."""
    return generalized_jsd(student_logits, teacher, beta=beta, mask=mask, temperature=temperature,
                           reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)




@register_loss("tvd", description="total variation distance 0.5*sum|p - q| * T^2 (bounded, symmetric)",
               paper="Wen et al. 2023, f-Divergence Minimization for Sequence-Level KD",
               kernel=lambda params: tvd_chunk_kernel)
def tvd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Total variation distance ``T^2 * 0.5 * sum_v |p_v - q_v|`` (used by DistiLLM-2 / Wen et al. 2023)."""
    return distill("tvd", tvd_kernel, student_logits, teacher, mask=mask, temperature=temperature,
                   reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


@register_loss("skew_forward_kl", description="DistiLLM skew KL: KL(p || alpha*p + (1-alpha)*q) * T^2",
               paper="Ko et al. 2024, DistiLLM", kernel=_skew_fkl_chunk)
def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Skew forward KL (Ko et al., DistiLLM 2024): ``T^2 * KL(p || alpha p + (1 - alpha) q)``.

    Mixing the teacher into the target's denominator bounds the loss (by ``-log alpha``) and its
    gradients; ``alpha = 0`` is forward KL. The paper's default is ``alpha = 0.1``.
    """
    check_unit_interval("alpha", alpha)
    return distill("skew_forward_kl", lambda lq, lp, safe: skew_fkl_kernel(lq, lp, float(alpha), safe), student_logits,
                   teacher, mask=mask, temperature=temperature, reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


@register_loss("skew_reverse_kl", description="DistiLLM skew reverse KL: KL(q || alpha*q + (1-alpha)*p) * T^2",
               paper="Ko et al. 2024, DistiLLM", kernel=_skew_rkl_chunk)
def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Skew reverse KL (Ko et al., DistiLLM 2024): ``T^2 * KL(q || alpha q + (1 - alpha) p)``.

    ``alpha = 0`` is reverse KL. The paper's default is ``alpha = 0.1``.
    """
    check_unit_interval("alpha", alpha)
    return distill("skew_reverse_kl", lambda lq, lp, safe: skew_rkl_kernel(lq, lp, float(alpha), safe), student_logits,
                   teacher, mask=mask, temperature=temperature, reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)


@register_loss("adaptive_kl", description="AKL: per-token mix of forward/reverse KL weighted by head/tail gaps",
               paper="Wu et al. 2024, Rethinking Kullback-Leibler Divergence in Knowledge Distillation for LLMs")
def adaptive_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    mu: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    sparse_policy: SparsePolicy = "tail_bucket",
    check_finite: bool = True,
) -> torch.Tensor:
    """Adaptive KL (Wu et al., 2024, "Rethinking KL divergence in KD for LLMs").

    Per position, sort the teacher's probabilities descending; the *head* is the top entries
    whose cumulative mass stays within ``mu`` (the top-1 always), the *tail* the rest. With
    ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|`` (no gradient):

    ``AKL = T^2 * (g_head KL(p || q) + g_tail KL(q || p)) / (g_head + g_tail)``

    FKL fits the head early in training, RKL the tail; AKL weights each by where the student
    is currently wrong. Sorts ``[..., V]``: costs one sort per position.
    """
    check_unit_interval("mu", mu, open_low=True)
    return distill("adaptive_kl", lambda lq, lp, safe: akl_kernel(lq, lp, float(mu), safe), student_logits, teacher,
                   mask=mask, temperature=temperature, reduction=reduction, sparse_policy=sparse_policy, check_finite=check_finite)
