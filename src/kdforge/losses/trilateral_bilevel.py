"""The true bilevel meta-objective of trilateral KD's ratio network (Hu et al. 2024), Meta-Weight-Net style.

Hu et al., *Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation* (ICLR 2024) learn the fusion network ``phi`` (ratios ``r_i = r(phi; features_i)``)
so that the student, after a step on the fused loss, is best on held-out labelled data. With the
per-sample loss ``l_i = r_i * d_i + ce_i``, ``d_i = T^2 KL(p_i || q_i) - ce_i`` (unlabelled
samples: ``r_i = 1``, ``ce_i = 0``), one SGD look-ahead of the student is

    ``theta'(phi) = theta - eta * grad_theta (1/n) sum_i l_i(theta, r_i(phi))``

and the meta-objective is the held-out cross-entropy ``CE_val(theta'(phi))``, minimised over
``phi`` (the relation features are computed at ``theta`` and do not depend on ``phi``). Because
``r`` enters ``theta'`` linearly, ``dCE_val/dr_i = -(eta/n) <grad CE_val(theta'), grad_theta d_i(theta)>``:
``r_i`` rises where a step toward the teacher on sample ``i`` lowers the held-out CE more than a
step toward its label.

Two parameter sets for the look-ahead (``lookahead``):

* ``"all"``: every trainable student parameter, through ``torch.func.functional_call`` and
  ``create_graph=True`` (second-order through the student: for small classifiers);
* ``"head"``: the final ``nn.Linear`` (``s = H W^T + b``) only, with the features ``H`` fixed.
  Then the look-ahead is closed-form and exact for that layer:
  ``s'_val = s_val - eta * (H_val H_tr^T + 1) G_tr(r)`` with ``G_tr = dL/ds_tr [n, C]``
  (:func:`head_lookahead_logits`): two no-grad forward passes, usable for large students.

For a student that *is* one linear layer the two coincide (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from kdforge.errors import ConfigError, ShapeError
from kdforge.losses._core import upcast
from kdforge.losses.supervised import IGNORE_INDEX
from kdforge.losses.trilateral import TrilateralFusion, relation_features

__all__ = ["fused_logit_grad", "head_lookahead_logits", "lookahead_holdout_ce", "network_ratios"]


def network_ratios(fusion: TrilateralFusion, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``r [n]`` of ``fusion`` for student/teacher logits ``[n, C]`` and labels ``y`` (``-100``: ``r = 1``),
    differentiable in the network's parameters only (the features are computed without a graph)."""
    has = y != IGNORE_INDEX
    y_safe = torch.where(has, y, 0)
    with torch.no_grad():
        feats = relation_features(upcast(s.detach()).softmax(-1), upcast(t.detach()).softmax(-1), y_safe,
                                  fusion.class_mean)
    r = fusion(feats).to(s.dtype)
    return torch.where(has, r, torch.ones_like(r))


def _parts(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(T^2 KL(p || q), CE)`` (CE 0 where unlabelled) for logits ``[n, C]``."""
    logq = torch.log_softmax(s / temperature, -1)
    logp = torch.log_softmax(t / temperature, -1)
    kd = (logp.exp() * (logp - logq)).sum(-1) * temperature**2
    has = y != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(s, torch.where(has, y, 0), reduction="none") * has
    return kd, ce


def fused_logit_grad(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, r: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """``G = d/ds (1/n) sum_i [r_i T^2 KL(p_i || q_i) + (1 - r_i) CE_i]`` ``[n, C]``, linear in ``r``:
    ``G_i = (r_i T (softmax(s_i/T) - softmax(t_i/T)) + (1 - r_i)(softmax(s_i) - e_{y_i})) / n``
    (unlabelled rows: the KD part only)."""
    has = y != IGNORE_INDEX
    g_kd = temperature * ((s / temperature).softmax(-1) - (t / temperature).softmax(-1))
    onehot = torch.nn.functional.one_hot(torch.where(has, y, 0), s.shape[-1]).to(s.dtype)
    g_ce = (s.softmax(-1) - onehot) * has.unsqueeze(-1)
    r = torch.where(has, r, torch.ones_like(r)).unsqueeze(-1)
    return (r * g_kd + (1 - r) * g_ce) / s.shape[0]


def head_lookahead_logits(s_val: torch.Tensor, h_val: torch.Tensor, h_tr: torch.Tensor, g_tr: torch.Tensor,
                          inner_lr: float) -> torch.Tensor:
    """Held-out logits after one SGD step of a linear head ``s = H W^T + b`` on a loss whose logit
    gradient is ``g_tr``: ``s_val - inner_lr * (H_val H_tr^T + 1) g_tr`` (``[m, C]``; ``h_* [., d]``)."""
    kernel = h_val @ h_tr.T + 1.0
    return s_val - inner_lr * kernel @ g_tr


def _head_io(student: nn.Module, head: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(head input H, student logits)`` of one no-grad forward pass; the head must give the logits."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        with torch.no_grad():
            out = student(x)
    finally:
        handle.remove()
    logits = out.logits if hasattr(out, "logits") else out
    if len(seen) != 1 or seen[0].dim() != 2 or logits.dim() != 2:
        raise ConfigError("lookahead: head needs a classifier whose final nn.Linear runs once per forward on "
                          "[batch, features] and gives the [batch, classes] logits",
                          "use lookahead: all for this student")
    h = seen[0]
    if not torch.allclose(head(h), logits, atol=1e-5, rtol=1e-4):
        raise ConfigError("lookahead: head: the student's logits are not its last nn.Linear's output "
                          "(something runs after the head)", "use lookahead: all for this student")
    return h, logits


def lookahead_holdout_ce(
    student: nn.Module,
    fusion: TrilateralFusion,
    x: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    temperature: float = 1.0,
    inner_lr: float = 0.1,
    lookahead: Literal["head", "all"] = "head",
    head: nn.Linear | None = None,
    params: Sequence[str] | None = None,
) -> torch.Tensor:
    """``CE(theta'(phi); x_val, y_val)`` (module docstring): a scalar whose gradient in ``fusion``'s
    parameters is the bilevel meta-gradient; no gradient reaches the student's parameters.

    Args:
        student: the classifier (``student(x) -> [n, C]`` logits), in its training mode.
        fusion: the ratio network.
        x, teacher_logits, labels: the training batch (``[n, ...]``, ``[n, C]``, ``[n]`` with ``-100``
            for unlabelled samples).
        x_val, y_val: held-out labelled samples (``-100`` rows are ignored).
        temperature: ``T`` of the KD side.
        inner_lr: ``eta``, the SGD step of the look-ahead.
        lookahead: ``"head"`` (closed form over ``head``) or ``"all"`` (every parameter, or ``params``).
        head: the final ``nn.Linear`` (``"head"`` only).
        params: ``"all"`` only: restrict the look-ahead to these parameter names.
    """
    if teacher_logits.shape != (x.shape[0], teacher_logits.shape[-1]) or labels.shape != (x.shape[0],):
        raise ShapeError(f"bilevel step: teacher logits {tuple(teacher_logits.shape)} / labels {tuple(labels.shape)} "
                         f"do not match {x.shape[0]} inputs", "pass [n, C] teacher logits and [n] labels")
    keep = y_val != IGNORE_INDEX
    x_val, y_val = x_val[keep], y_val[keep]
    t = upcast(teacher_logits.detach())
    if lookahead == "head":
        if head is None:
            raise ConfigError("lookahead: head needs the student's head", "pass head=<the final nn.Linear>")
        h_tr, s_tr = _head_io(student, head, x)
        h_val, s_val = _head_io(student, head, x_val)
        s_tr, h_tr, h_val, s_val = upcast(s_tr), upcast(h_tr), upcast(h_val), upcast(s_val)
        r = network_ratios(fusion, s_tr, t, labels)
        g = fused_logit_grad(s_tr, t, labels, r, temperature)
        return torch.nn.functional.cross_entropy(head_lookahead_logits(s_val, h_val, h_tr, g, inner_lr), y_val)
    if lookahead != "all":
        raise ConfigError(f"unknown lookahead {lookahead!r}", "use lookahead: head or lookahead: all")
    named = {n: p for n, p in student.named_parameters() if p.requires_grad and (params is None or n in params)}
    if not named:
        raise ConfigError("lookahead: all found no trainable student parameters to look ahead with",
                          "check params= (names of student.named_parameters()) or use lookahead: head")
    theta = {n: p.detach().requires_grad_(True) for n, p in named.items()}
    s = functional_call(student, theta, (x,), strict=False)
    s = upcast(s.logits if hasattr(s, "logits") else s)
    kd, ce = _parts(s, t, labels, temperature)
    r = network_ratios(fusion, s, t, labels)
    inner = (r * kd + (1 - r) * ce).mean()
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    ahead = {n: p - inner_lr * g for (n, p), g in zip(theta.items(), grads)}
    s_val = functional_call(student, ahead, (x_val,), strict=False)
    s_val = s_val.logits if hasattr(s_val, "logits") else s_val
    return torch.nn.functional.cross_entropy(upcast(s_val), y_val)
