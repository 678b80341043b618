"""Feature and relation distillation losses: pure functions of intermediate tensors.

Shape convention shared by every function here: a feature tensor is ``[*P, *F]`` where ``P`` are
the *position* axes (``[B, T]`` for a language model, ``[B]`` for an image classifier) and ``F`` the
feature axes (``[H]`` hidden width, ``[C, H, W]`` a conv map). ``mask`` is a bool tensor of shape
``P`` marking the real positions (None: all real). Every loss is a sum over real positions of a
per-position value that is already averaged over its feature axes, so it scales like the token-level
logit losses of :mod:`kdforge.losses` and can share their normaliser (the number of real positions):

* ``reduction="sum"``: sum over real positions (what the :class:`~kdforge.train.Objective` uses);
* ``reduction="mean"``: that sum divided by the number of real positions (0 when there is none);
* ``reduction="none"``: the per-position values ``[*P]``, zero at masked positions.

All arithmetic is in float32 (bf16/fp16 features are upcast; float64 stays float64), and the teacher
side is never differentiated (it is detached here, so a caller cannot forget it).

Papers: FitNets (Romero et al., 2015, arXiv:1412.6550) for hints; MiniLM (Wang et al., 2020,
arXiv:2002.10957) and MiniLMv2 (Wang et al., 2021, arXiv:2012.15828) for attention and value
relations; linear CKA (Kornblith et al., 2019, arXiv:1905.00414).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kdforge.errors import ConfigError, ShapeError

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "attention_kl",
    "cka_loss",
    "cosine_hidden",
    "hidden_mse",
    "linear_cka",
    "relation_matrix",
    "value_relation_kl",
]


# -- helpers -----------------------------------------------------------------------------------
def _up(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bf16/float32 inputs; float64 stays float64 (exact gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_mask(x: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    """The bool mask of the position axes of ``x`` (all True when ``mask`` is None)."""
    if mask is None:
        raise ShapeError(f"{what}: a mask is needed to tell position axes from feature axes",
                         "pass mask= (all True when every position is real)")
    if mask.dim() > x.dim() or tuple(x.shape[: mask.dim()]) != tuple(mask.shape):
        raise ShapeError(
            f"{what}: mask {tuple(mask.shape)} is not a prefix of the feature shape {tuple(x.shape)}",
            "the mask covers the position axes ([B, T] for tokens, [B] for samples) of the features",
        )
    return mask.to(device=x.device, dtype=torch.bool)


def _reduce(per_pos: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    per_pos = torch.where(mask, per_pos, torch.zeros((), dtype=per_pos.dtype, device=per_pos.device))
    if reduction == "none":
        return per_pos
    total = per_pos.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp_min(1)
    raise ConfigError(f"unknown reduction {reduction!r}", "use 'mean', 'sum' or 'none'")


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ShapeError(
            f"{what}: student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ",
            "project the student features to the teacher's width first (the feature terms of an Objective "
            "do this with a learned projector: projector: linear)",
        )


# -- hints -------------------------------------------------------------------------------------
def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
               reduction: Reduction = "mean", normalize: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """FitNets hint loss: mean squared error between (projected) student and teacher features.

    .. math::

        \\ell(n) = \\frac{1}{|F|} \\sum_{f \\in F} (s_{n,f} - t_{n,f})^2

    summed (or averaged) over the real positions ``n``. The student features must already be
    mapped to the teacher's width (FitNets' regressor ``r(h_s)``; see
    :class:`~kdforge.features.modules.HiddenMSE`).

    With ``normalize=True`` both sides are first standardised per position over their feature axes
    (``(x - mean) / sqrt(var + eps)``, a layer norm without parameters), which makes the loss
    independent of the models' activation scale: it equals ``2 (1 - r)`` with ``r`` the Pearson
    correlation of ``s_n`` and ``t_n`` (up to ``eps``). Useful for LLMs whose hidden states reach
    mean squares of ``1e3``-``1e4`` (see ``docs/features.md``).

    Args:
        student: ``[*P, *F]`` (projected) student features.
        teacher: ``[*P, *F]`` teacher features (detached).
        mask: ``[*P]`` bool, real positions (None: all).
        reduction: ``"mean"`` over real positions, ``"sum"`` or ``"none"`` (``[*P]``).
        normalize: standardise each position's features on both sides first.

    Paper: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    """
    _same_shape(student, teacher, "hidden_mse")
    mask = _check_mask(student, mask if mask is not None else _all(student, 1), "hidden_mse")
    s, t = _up(student), _up(teacher.detach())
    if normalize:
        s, t = _standardize(s, mask.dim(), eps), _standardize(t, mask.dim(), eps)
    diff = s - t
    per_pos = diff.pow(2).flatten(mask.dim()).mean(-1) if diff.dim() > mask.dim() else diff.pow(2)
    return _reduce(per_pos, mask, reduction)


def cosine_hidden(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
                  reduction: Reduction = "mean", eps: float = 1e-8) -> torch.Tensor:
    """Cosine hint loss: ``1 - cos(s_n, t_n)`` per position, features flattened.

    .. math::

        \\ell(n) = 1 - \\frac{\\langle s_n, t_n \\rangle}{\\max(\\lVert s_n \\rVert \\lVert t_n \\rVert, \\epsilon)}

    Insensitive to the scale of either side (useful when the teacher's hidden norms are large, as in
    the last layers of LLMs). Lies in ``[0, 2]``; 0 when the directions agree.

    Args:
        student: ``[*P, *F]`` (projected) student features.
        teacher: ``[*P, *F]`` teacher features.
        mask: ``[*P]`` bool, real positions.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Used e.g. by DistilBERT (Sanh et al., 2019, arXiv:1910.01108) on hidden states.
    """
    _same_shape(student, teacher, "cosine_hidden")
    mask = _check_mask(student, mask if mask is not None else _all(student, 1), "cosine_hidden")
    s = _up(student).flatten(mask.dim())
    t = _up(teacher.detach()).flatten(mask.dim())
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp_min(eps)
    return _reduce(1.0 - cos, mask, reduction)


def _standardize(x: torch.Tensor, position_dims: int, eps: float) -> torch.Tensor:
    """Zero mean, unit variance per position over the feature axes (parameter-free layer norm)."""
    if x.dim() == position_dims:
        raise ShapeError("normalize=True needs feature axes after the position axes",
                         "pass features [*P, *F], or normalize=False")
    return torch.nn.functional.layer_norm(x, x.shape[position_dims:], eps=eps)


def _all(x: torch.Tensor, feature_dims: int) -> torch.Tensor:
    return torch.ones(x.shape[: max(x.dim() - feature_dims, 1)], dtype=torch.bool, device=x.device)


# -- attention and relations (MiniLM) ----------------------------------------------------------
def _kl_rows(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """``KL(p || q)`` over the last axis of probability tensors; ``0 log 0 = 0``."""
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(eps))).sum(-1)


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None, *,
                 heads: Literal["auto", "match", "average"] = "auto", reduction: Reduction = "mean",
                 eps: float = 1e-12) -> torch.Tensor:
    """MiniLM self-attention transfer: KL from the teacher's to the student's attention distributions.

    .. math::

        \\ell(b, i) = \\frac{1}{A} \\sum_{a=1}^{A} \\mathrm{KL}\\big(A^T_{b,a,i,:} \\,\\Vert\\, A^S_{b,a,i,:}\\big)

    for each query position ``i`` (a row of the attention matrix), averaged over heads and summed
    over real query positions. Forward direction ``KL(teacher || student)``, as in MiniLM.

    Heads: with ``heads="match"`` teacher and student must have the same head count ``A`` and head
    ``a`` is matched with head ``a``. With ``heads="average"`` each side's attention is first
    averaged over its heads (a mean of distributions is a distribution), and one KL per query is
    taken: this is what makes models with different head counts comparable. ``"auto"`` (default)
    matches when the counts are equal and averages otherwise.

    Args:
        student_attn: ``[B, A_s, T, T]`` attention probabilities (rows sum to 1).
        teacher_attn: ``[B, A_t, T, T]``.
        mask: ``[B, T]`` bool, real query positions (None: all).
        heads: ``"auto"``, ``"match"`` or ``"average"``.
        reduction: ``"mean"`` over real queries, ``"sum"`` or ``"none"`` (``[B, T]``).

    Paper: Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020.
    """
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ShapeError(f"attention_kl expects [B, heads, T, T] attentions, got {tuple(student_attn.shape)} "
                         f"and {tuple(teacher_attn.shape)}", "pass the attention probabilities of one layer")
    if (student_attn.shape[0], *student_attn.shape[2:]) != (teacher_attn.shape[0], *teacher_attn.shape[2:]):
        raise ShapeError(f"attention_kl: student {tuple(student_attn.shape)} and teacher "
                         f"{tuple(teacher_attn.shape)} attentions cover different batches or lengths",
                         "feed both models the same batch")
    a_s, a_t = student_attn.shape[1], teacher_attn.shape[1]
    if heads == "auto":
        heads = "match" if a_s == a_t else "average"
    s, t = _up(student_attn), _up(teacher_attn.detach())
    if heads == "match":
        if a_s != a_t:
            raise ShapeError(f"attention_kl heads='match': the student has {a_s} heads, the teacher {a_t}",
                             "use heads: average (or auto), or value_relation_kl with relation_heads")
        per_pos = _kl_rows(t, s, eps).mean(1)
    elif heads == "average":
        per_pos = _kl_rows(t.mean(1), s.mean(1), eps)
    else:
        raise ConfigError(f"unknown heads mode {heads!r}", "use 'auto', 'match' or 'average'")
    mask = _check_mask(per_pos, mask if mask is not None else torch.ones_like(per_pos, dtype=torch.bool),
                       "attention_kl")
    return _reduce(per_pos, mask, reduction)


def relation_matrix(x: torch.Tensor, relation_heads: int, key_mask: torch.Tensor | None = None,
                    *, causal: bool = False) -> torch.Tensor:
    """MiniLMv2 self-relation: ``softmax(x_r x_r^T / sqrt(d_r))`` for each relation head ``r``.

    The last axis of ``x`` (width ``D``) is split into ``R = relation_heads`` chunks of
    ``d_r = D / R``; because ``R`` is chosen freely, teacher and student with different head counts
    and widths yield relations of the same shape ``[B, R, T, T]``.

    Args:
        x: ``[B, T, D]`` per-token vectors (values, queries or keys of one layer).
        relation_heads: ``R``; must divide ``D``.
        key_mask: ``[B, T]`` bool, keys that exist (padding keys get probability 0).
        causal: mask keys after the query (decoder models; rows attend to the past only).

    Returns:
        ``[B, R, T, T]`` float32 row-stochastic matrices.
    """
    if x.dim() != 3:
        raise ShapeError(f"relation_matrix expects [B, T, D], got {tuple(x.shape)}", "pass one layer's vectors")
    b, t, d = x.shape
    if relation_heads < 1 or d % relation_heads:
        raise ShapeError(f"relation_heads={relation_heads} does not divide the width {d}",
                         "choose relation_heads dividing both the student's and the teacher's widths")
    dr = d // relation_heads
    xr = _up(x).reshape(b, t, relation_heads, dr).transpose(1, 2)  # [B, R, T, dr]
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(dr)
    allowed = torch.ones(b, 1, t, t, dtype=torch.bool, device=x.device)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    # a query whose every key is masked (a padding row) keeps a uniform row instead of NaN
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def value_relation_kl(student_values: torch.Tensor, teacher_values: torch.Tensor,
                      mask: torch.Tensor | None = None, *, relation_heads: int = 1,
                      key_mask: torch.Tensor | None = None, causal: bool = False,
                      reduction: Reduction = "mean", eps: float = 1e-12) -> torch.Tensor:
    """MiniLM value-relation transfer: KL between teacher and student value-value relations.

    .. math::

        R^M_{r} = \\mathrm{softmax}\\Big(\\frac{V^M_r {V^M_r}^\\top}{\\sqrt{d_r}}\\Big), \\qquad
        \\ell(b, i) = \\frac{1}{R} \\sum_{r=1}^{R} \\mathrm{KL}\\big(R^T_{b,r,i,:} \\,\\Vert\\, R^S_{b,r,i,:}\\big)

    with ``V`` the value vectors of one layer (all heads concatenated, ``[B, T, D]``) split into
    ``R`` relation heads (:func:`relation_matrix`). MiniLM (v1) uses the value relation with the
    models' own heads; MiniLMv2 introduced relation heads so teacher and student need not share a
    head count. The forward direction ``KL(teacher || student)`` is used.

    Args:
        student_values: ``[B, T, D_s]``.
        teacher_values: ``[B, T, D_t]``; ``relation_heads`` must divide both ``D_s`` and ``D_t``.
        mask: ``[B, T]`` bool, real query positions.
        relation_heads: ``R``.
        key_mask: ``[B, T]`` bool, existing keys (default: ``mask``).
        causal: relations to past keys only (decoder models).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B, T]``).

    Papers: Wang et al. 2020 (MiniLM, NeurIPS) and Wang et al. 2021 (MiniLMv2, Findings of ACL).
    """
    if student_values.shape[:2] != teacher_values.shape[:2]:
        raise ShapeError(f"value_relation_kl: student {tuple(student_values.shape)} and teacher "
                         f"{tuple(teacher_values.shape)} values cover different batches or lengths",
                         "feed both models the same batch")
    keys = key_mask if key_mask is not None else mask
    rel_s = relation_matrix(student_values, relation_heads, keys, causal=causal)
    rel_t = relation_matrix(teacher_values.detach(), relation_heads, keys, causal=causal)
    per_pos = _kl_rows(rel_t, rel_s, eps).mean(1)
    mask = _check_mask(per_pos, mask if mask is not None else torch.ones_like(per_pos, dtype=torch.bool),
                       "value_relation_kl")
    return _reduce(per_pos, mask, reduction)


# -- CKA ---------------------------------------------------------------------------------------
def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Linear centred kernel alignment between two representations of the same ``n`` examples.

    .. math::

        \\mathrm{CKA}(X, Y) = \\frac{\\lVert Y_c^\\top X_c \\rVert_F^2}
                                  {\\lVert X_c^\\top X_c \\rVert_F \\, \\lVert Y_c^\\top Y_c \\rVert_F}

    with ``X_c``, ``Y_c`` the column-centred matrices. In ``[0, 1]``; 1 when ``Y`` is an orthogonal
    transform of ``X`` up to isotropic scaling; invariant to both, so the two widths may differ and
    no projector is needed. Differentiable (used as a loss by :func:`cka_loss`).

    Args:
        x: ``[n, d_1]`` (e.g. student hidden states of the real tokens of a batch).
        y: ``[n, d_2]`` (teacher hidden states of the same tokens).
        eps: guards the denominator (a constant representation gives CKA 0).

    Returns:
        Scalar float32 tensor.

    Paper: Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ShapeError(f"linear_cka expects [n, d1] and [n, d2] with the same n, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}", "flatten the real positions first (features[mask])")
    xc = _up(x) - _up(x).mean(0, keepdim=True)
    yc = _up(y) - _up(y).mean(0, keepdim=True)
    # ||Y^T X||_F^2 = <X X^T, Y Y^T>; pick the cheaper side (n x n Gram vs d x d covariance)
    if xc.shape[0] <= max(xc.shape[1], yc.shape[1]):
        kx, ky = xc @ xc.T, yc @ yc.T
        hsic, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        hsic = (yc.T @ xc).pow(2).sum()
        nx, ny = (xc.T @ xc).norm(), (yc.T @ yc).norm()
    return hsic / (nx * ny).clamp_min(eps)


def cka_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
             reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """``1 - CKA`` between the student and teacher features of the real positions of a batch.

    .. math::

        \\mathcal{L} = 1 - \\mathrm{CKA}_{\\text{linear}}(S[\\text{mask}], T[\\text{mask}])

    CKA compares whole sets of positions, not single ones, so it is not a sum over positions: with
    ``reduction="sum"`` the value is ``(1 - CKA) * n`` (``n`` real positions of this batch), which an
    objective divides by its global position count; under gradient accumulation the result is the
    position-weighted mean of the micro-batches' ``1 - CKA``. Widths may differ (no projector).

    Args:
        student: ``[*P, *F_s]``; teacher: ``[*P, *F_t]``; mask: ``[*P]`` bool.
        reduction: ``"mean"`` (``1 - CKA``) or ``"sum"`` (``(1 - CKA) * n``).

    Paper: Kornblith et al. 2019; as a distillation loss e.g. Saha et al. 2022 (arXiv:2211.10766).
    """
    if student.shape[0] != teacher.shape[0]:
        raise ShapeError(f"cka_loss: batches differ ({student.shape[0]} vs {teacher.shape[0]})",
                         "feed both models the same batch")
    m = _check_mask(student, mask if mask is not None else _all(student, 1), "cka_loss")
    _check_mask(teacher, m, "cka_loss (teacher)")
    x = student[m].flatten(1) if student.dim() > m.dim() else student[m][:, None]
    y = teacher.detach()[m].flatten(1) if teacher.dim() > m.dim() else teacher.detach()[m][:, None]
    n = x.shape[0]
    if n < 2:
        return _up(student).sum() * 0.0  # CKA needs two positions; nothing to learn from one
    loss = 1.0 - linear_cka(x, y)
    if reduction == "sum":
        return loss * n
    if reduction == "mean":
        return loss
    raise ConfigError(f"cka_loss has no reduction {reduction!r} (CKA is not per position)", "use 'mean' or 'sum'")
