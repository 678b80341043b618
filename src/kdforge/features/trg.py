"""TRG: knowledge distillation via a token-level relationship graph.

Zhang, Liu and He, "Knowledge Distillation via Token-level Relationship Graph" (2023,
arXiv:2306.12442). The tokens of one sample (an LM's hidden states ``[T, H]``, a conv map's ``H·W``
positions, a ViT's patches) are the nodes of a graph; teacher and student graphs are matched
instead of the features themselves, so their widths may differ. Three parts, per node ``i`` over
the other real nodes ``j`` of the same sample:

* **local preserving** (graph) loss: a k-NN graph with Gaussian edges
  ``A_ij = exp(-‖x_i - x_j‖² / (2σ))`` for ``j`` among the ``k`` nearest neighbours of ``i``
  (0 otherwise), turned into a distribution per row, ``P_i = softmax_j(A_ij)``:
  ``ℓ_local(i) = KL(P^S_i ‖ P^T_i)`` (the direction the paper writes);
* **contextual** (inner-instance) loss: ``CS = softmax_j(x_i · x_j / √D)`` on each side,
  ``ℓ_ctx(i) = mean_j (CS^T_ij - CS^S_ij)²`` (the paper's MSE between the two matrices, per row);
* **global** relation loss (InfoNCE): with ``z^S = proj(x^S)`` (a learned linear map to the teacher's
  width) and cosine similarity, ``ℓ_glob(i) = -log softmax_j(cos(z^S_i, x^T_j) / τ_g)[j = i]``: the
  student's token ``i`` must pick out the teacher's token ``i`` among the sample's tokens.

``trg_loss = w_local ℓ_local + w_ctx ℓ_ctx + w_glob ℓ_glob`` per node. Departures from the paper:
graphs are per sample over *all* its real tokens (the paper samples tokens from the whole batch into
one graph, which also relates tokens across images); ``τ_g`` is fixed (the paper anneals it); and
``σ = "auto"`` (the mean squared distance between the sample's tokens, per side) makes the graph
independent of each model's activation scale. Invariances (tested): the local loss is unchanged by
scaling, translating or rotating either side's features; the contextual loss by rotating either side;
the global loss by scaling the student. Local and contextual are 0 for a student equal to its
teacher; the global InfoNCE is not (it is at least ``-log`` of the self-similarity's softmax).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kdforge.errors import ShapeError
from kdforge.features.losses import Reduction, _check_mask, _reduce, _up

__all__ = ["knn_graph", "trg_contextual", "trg_global", "trg_local", "trg_loss"]

_NEG = -1e30


def _tokens(x: torch.Tensor, mask: torch.Tensor | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 3:
        raise ShapeError(f"{what} expects token features [B, T, H], got {tuple(x.shape)}",
                         "pass one layer's hidden states (a conv map: x.flatten(2).transpose(1, 2))")
    m = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return _up(x), _check_mask(x, m, what)


def _pair_mask(mask: torch.Tensor, self_loops: bool) -> torch.Tensor:
    """``[B, T, T]``: both nodes real (and ``i != j`` unless ``self_loops``)."""
    allowed = mask[:, :, None] & mask[:, None, :]
    if not self_loops:
        allowed = allowed & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return allowed


def _row_log_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the allowed columns of each row; a row with none is uniform (never counted)."""
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return torch.log_softmax(scores.masked_fill(~allowed, _NEG), dim=-1).masked_fill(~allowed, 0.0)


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    sq = x.pow(2).sum(-1)
    return (sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp_min(0.0)


def knn_graph(x: torch.Tensor, mask: torch.Tensor | None = None, *, k: int = 8,
              sigma: float | Literal["auto"] = "auto") -> torch.Tensor:
    """TRG's k-NN token graph ``[B, T, T]``: ``exp(-‖x_i - x_j‖² / (2σ))`` for the ``k`` nearest real
    neighbours ``j != i`` of each node ``i``, 0 elsewhere.

    Args:
        x: ``[B, T, H]`` token features.
        mask: ``[B, T]`` bool, real tokens.
        k: neighbours per node (all the sample's other tokens when it has at most ``k + 1``).
        sigma: the kernel width; ``"auto"``: the mean squared distance between the sample's real tokens.
    """
    x, mask = _tokens(x, mask, "knn_graph")
    d2 = _sq_dists(x)
    allowed = _pair_mask(mask, self_loops=False)
    if sigma == "auto":
        s = (d2 * allowed).sum((1, 2)) / allowed.sum((1, 2)).clamp_min(1)
        s = s.clamp_min(1e-12)[:, None, None]
    else:
        s = torch.as_tensor(float(sigma), dtype=x.dtype, device=x.device)
    far = d2.detach().masked_fill(~allowed, float("inf"))
    kk = max(1, min(int(k), x.shape[1] - 1))
    idx = far.topk(kk, dim=-1, largest=False).indices
    near = torch.zeros_like(allowed).scatter_(-1, idx, True) & allowed
    return torch.exp(-d2 / (2 * s)) * near


def trg_local(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *, k: int = 8,
              sigma: float | Literal["auto"] = "auto", reduction: Reduction = "mean") -> torch.Tensor:
    """Local preserving loss ``KL(softmax_j A^S_ij ‖ softmax_j A^T_ij)`` per real node (widths may differ)."""
    s, m = _tokens(student, mask, "trg_local")
    t, _ = _tokens(teacher.detach(), m, "trg_local")
    allowed = _pair_mask(m, self_loops=False)
    log_ps = _row_log_softmax(knn_graph(s, m, k=k, sigma=sigma), allowed)
    log_pt = _row_log_softmax(knn_graph(t, m, k=k, sigma=sigma), allowed)
    per_node = (log_ps.exp() * (log_ps - log_pt) * allowed).sum(-1)
    return _reduce(per_node, m, reduction)


def _context(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return _row_log_softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), allowed).exp() * allowed


def trg_contextual(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
                   reduction: Reduction = "mean") -> torch.Tensor:
    """Contextual loss ``mean_j (CS^T_ij - CS^S_ij)²``, ``CS = softmax_j(x_i·x_j/√D)`` over the real tokens."""
    s, m = _tokens(student, mask, "trg_contextual")
    t, _ = _tokens(teacher.detach(), m, "trg_contextual")
    allowed = _pair_mask(m, self_loops=True)
    diff = (_context(t, allowed) - _context(s, allowed)).pow(2)
    per_node = diff.sum(-1) / allowed.sum(-1).clamp_min(1)
    return _reduce(per_node, m, reduction)


def trg_global(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
               temperature: float = 0.1, reduction: Reduction = "mean", eps: float = 1e-8) -> torch.Tensor:
    """InfoNCE ``-log softmax_j(cos(z^S_i, x^T_j)/τ)[i]`` over the sample's real tokens (same widths:
    project the student first)."""
    s, m = _tokens(student, mask, "trg_global")
    t, _ = _tokens(teacher.detach(), m, "trg_global")
    if s.shape != t.shape:
        raise ShapeError(f"trg_global: student {tuple(s.shape)} and teacher {tuple(t.shape)} tokens differ",
                         "project the student tokens to the teacher's width (the trg term does this)")
    zs = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    zt = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    log_p = _row_log_softmax(zs @ zt.transpose(1, 2) / temperature, _pair_mask(m, self_loops=True))
    per_node = -torch.diagonal(log_p, dim1=1, dim2=2)
    return _reduce(per_node, m, reduction)


def trg_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
             projected: torch.Tensor | None = None, k: int = 8, sigma: float | Literal["auto"] = "auto",
             local_weight: float = 1.0, contextual_weight: float = 1.0, global_weight: float = 1.0,
             global_temperature: float = 0.1, reduction: Reduction = "mean") -> torch.Tensor:
    """TRG per real node: ``w_local ℓ_local + w_ctx ℓ_ctx + w_glob ℓ_glob`` (module docstring).

    Args:
        student: ``[B, T, H_s]`` student tokens (graph and context).
        teacher: ``[B, T, H_t]`` teacher tokens.
        mask: ``[B, T]`` bool, real tokens (padding is no node).
        projected: ``[B, T, H_t]`` the student tokens mapped to the teacher's width, for the global
            loss (default: ``student``, which then needs ``H_s == H_t``).
        reduction: ``"mean"`` over real nodes, ``"sum"`` or ``"none"`` (``[B, T]``).
    """
    _, m = _tokens(student, mask, "trg_loss")
    total = torch.zeros(m.shape, dtype=_up(student).dtype, device=student.device)
    if local_weight:
        total = total + local_weight * trg_local(student, teacher, m, k=k, sigma=sigma, reduction="none")
    if contextual_weight:
        total = total + contextual_weight * trg_contextual(student, teacher, m, reduction="none")
    if global_weight:
        z = projected if projected is not None else student
        total = total + global_weight * trg_global(z, teacher, m, temperature=global_temperature, reduction="none")
    return _reduce(total, m, reduction)
