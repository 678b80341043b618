"""ND loss: the norm and direction of student embeddings, regularised toward the teacher's class means.

Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
(ND, 2023, arXiv:2305.17007). For a sample of class ``c`` with (projected) student embedding ``s``
and teacher embedding ``t`` (the penultimate features, globally average-pooled for a conv map),
and ``e_c = mu_c / ||mu_c||`` the unit direction of the teacher's mean embedding of class ``c``:

.. math::

    \\ell_{ND} = 1 - \\frac{\\langle s, e_c \\rangle}{\\max(\\lVert s \\rVert, \\lVert t \\rVert)}

While ``||s|| < ||t||`` the loss is ``1 - (||s|| / ||t||) cos(s, e_c)``: it pulls the direction of
``s`` toward ``e_c`` *and* pushes the student's norm up to the teacher's (large-norm features are
the confident ones). Once ``||s|| >= ||t||`` it is ``1 - cos(s, e_c)``: direction only. It is 0
exactly when ``s`` points along ``e_c`` with a norm at least the teacher's, so a student equal to
its teacher is *not* at zero unless the teacher's own embedding lies on its class-mean direction.

The class means are the teacher's: precomputed (:func:`class_means`, then
:meth:`ClassMeans.set`) or accumulated as exact running means over the training batches (a
buffer of per-class sums and counts, checkpointed with the feature terms).
"""

from __future__ import annotations

import torch
from torch import nn

from kdforge.errors import ShapeError
from kdforge.features.losses import Reduction, _check_mask, _reduce, _up

__all__ = ["ClassMeans", "class_means", "embedding", "nd_loss"]


def embedding(x: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` sample embeddings: a ``[B, C, H, W]`` (or ``[B, C, L]``) map average-pooled over
    its spatial axes, a ``[B, D]`` vector as is."""
    if x.dim() < 2:
        raise ShapeError(f"ND expects [B, D] embeddings or [B, C, ...] feature maps, got {tuple(x.shape)}",
                         "tap the penultimate layer (the input of the classifier)")
    return x if x.dim() == 2 else x.flatten(2).mean(-1)


def class_means(features: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean embedding of each class: ``[K, D]`` from ``features [N, D]`` (or maps, pooled) and
    ``classes [N]`` (``-100`` or out-of-range entries ignored); a class without samples is 0."""
    z = _up(embedding(features.detach()))
    keep = (classes >= 0) & (classes < num_classes)
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
    sums.index_add_(0, classes[keep].long(), z[keep])
    counts = torch.bincount(classes[keep].long(), minlength=num_classes).to(z.dtype)
    return sums / counts.clamp_min(1)[:, None]


def nd_loss(student: torch.Tensor, teacher: torch.Tensor, centers: torch.Tensor, classes: torch.Tensor,
            mask: torch.Tensor | None = None, *, reduction: Reduction = "mean", eps: float = 1e-8) -> torch.Tensor:
    """ND loss ``1 - <s, e_c> / max(||s||, ||t||)`` per sample (module docstring).

    Args:
        student: ``[B, D]`` projected student embeddings (or ``[B, C, H, W]`` maps, pooled).
        teacher: ``[B, D]`` teacher embeddings (or maps, pooled); only their norms are used.
        centers: ``[K, D]`` teacher class means (any scale: only their directions are used).
        classes: ``[B]`` int class of each sample (``-100``: no class, masked out).
        mask: ``[B]`` bool, real samples (None: all).
        reduction: ``"mean"`` over counted samples, ``"sum"`` or ``"none"`` (``[B]``).

    Paper: Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and
    Direction", 2023 (arXiv:2305.17007).
    """
    s, t = _up(embedding(student)), _up(embedding(teacher.detach()))
    if s.shape != t.shape or centers.dim() != 2 or centers.shape[1] != s.shape[1]:
        raise ShapeError(f"nd_loss: student {tuple(s.shape)}, teacher {tuple(t.shape)} and class means "
                         f"{tuple(centers.shape)} must share the embedding width",
                         "project the student embedding to the teacher's width (the nd term does this)")
    mask = _check_mask(s, mask if mask is not None else torch.ones(s.shape[0], dtype=torch.bool,
                                                                    device=s.device), "nd_loss")
    k = centers.shape[0]
    valid = mask & (classes >= 0) & (classes < k)
    unit = _up(centers.detach()).to(s.device)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(eps)
    e = unit[classes.clamp(0, k - 1).long()]
    scale = torch.maximum(s.norm(dim=-1), t.norm(dim=-1)).clamp_min(eps)
    per_sample = 1.0 - (s * e).sum(-1) / scale
    return _reduce(per_sample, valid, reduction)


class ClassMeans(nn.Module):
    """Teacher class means as buffers: exact running means (per-class sums and counts).

    ``update(features, classes)`` adds a batch; ``means`` is ``[K, D]``; ``set(means)`` replaces the
    running sums with precomputed means (each counted once, so later updates refine them).
    """

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, width))
        self.register_buffer("counts", torch.zeros(num_classes))

    @torch.no_grad()
    def update(self, features: torch.Tensor, classes: torch.Tensor) -> None:
        z = embedding(features.detach()).to(self.sums)
        if z.shape[1] != self.sums.shape[1]:
            raise ShapeError(f"class means of width {self.sums.shape[1]}, teacher embedding of width {z.shape[1]}",
                             "tap the same teacher module the term was bound with")
        keep = (classes >= 0) & (classes < self.sums.shape[0])
        idx = classes[keep].long().to(self.sums.device)
        self.sums.index_add_(0, idx, z[keep.to(z.device)])
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=self.counts.dtype))

    @torch.no_grad()
    def set(self, means: torch.Tensor) -> None:
        if means.shape != self.sums.shape:
            raise ShapeError(f"class means {tuple(means.shape)} do not match {tuple(self.sums.shape)}",
                             "compute them with class_means(teacher_embeddings, labels, num_classes)")
        self.sums.copy_(means)
        self.counts.fill_(1.0)

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)[:, None]
