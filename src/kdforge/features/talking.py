"""Talking models: teacher and student exchange messages through learned encoders and decoders.

Zhao et al., "Talking Models: Distill Pre-trained Knowledge to Downstream Models via Interactive
Communication" (2023, arXiv:2310.03188). **From the paper** (its abstract; kdforge had no access to
the full text): each model trains (1) an *encoder* from its hidden states to a message in a shared
message space and (2) a *decoder* from any message back to its own hidden states; the teacher passes
knowledge by encoding its hidden states, and the student sends messages carrying the downstream
task's information to the teacher, whose answer is therefore tailored to the student.

**kdforge's reading** (the losses, the architecture and every detach are choices made here, not
the paper's). Per tapped pair (student feature ``h_s``, teacher feature ``h_t``, features on the
feature axis of each position), a :class:`TalkingChannel` holds four linear maps
``E_s: W_s -> m``, ``D_s: m -> W_s``, ``E_t: W_t -> m``, ``D_t: m -> W_t``, with messages
``z_s = E_s(h_s)``, ``z_t = E_t(h_t)``. With ``sg`` stop-gradient and the relative squared error
``rel(x̂, x)_p = ‖x̂_p - x_p‖² / sg(mean_q ‖x_q‖²)`` (the mean over the batch's real positions, so the
value does not depend on the scale of the activations), per position ``p``:

.. math::

    \\ell_{rec} &= rel(D_s(E_s(sg\\,h_s)), sg\\,h_s) + rel(D_t(E_t(h_t)), h_t)
        \\quad\\text{(each model learns its encoder/decoder)}\\\\
    \\ell_{agree} &= \\lVert z_s - z_t \\rVert^2 / \\operatorname{mean}_q \\tfrac12(\\lVert z_{s,q} \\rVert^2 + \\lVert z_{t,q} \\rVert^2)
        \\quad\\text{(one shared message space)}\\\\
    \\ell_{pass} &= rel(D_s(z_t), h_s) \\quad\\text{(teacher's message, decoded by the student)}\\\\
    \\ell_{talk} &= T^2\\,KL(sg\\,p(a) \\Vert p(z)) + T^2\\,KL(p(z_t^{out}) \\Vert p(a)) + CE(a, y)

with ``a = head_t(D_t(z_s))`` the teacher's **answer**: the student's message decoded into the
teacher's space and run through the rest of the frozen teacher (``head_t``: the modules after the
tapped one, e.g. its classifier; for an LM's last hidden state its LM head), ``z`` the student's
logits, ``z_t^{out}`` the teacher's own logits, ``p(x) = softmax(x / T)`` and ``y`` the label (the CE
only where there is one and ``answer_labels`` is on). The first KL is the student learning from the
tailored answer; the second and the CE train the channel (``E_s``, ``D_t``, and the student's features
through ``E_s``) so that the answer is the teacher's own prediction and right on the downstream task:
this is how the student's downstream information reaches the teacher. The agreement's normaliser is
not detached, so shrinking both messages cannot lower it (no collapse of the messages to 0).

All parts are 0 when the two paths agree: identity encoders/decoders, ``h_s = h_t``, ``head_t`` giving
the student's logits, and no labels. The teacher's parameters never change (``head_t`` runs with
detached parameters); only the channel and the student train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.errors import ShapeError
from kdforge.features.losses import Reduction, _check_mask, _reduce, _up

__all__ = ["TalkingChannel", "TalkingWeights", "run_frozen", "talking_loss", "talking_parts"]

_EPS = 1e-12


@dataclass(frozen=True)
class TalkingWeights:
    """Weights of the four parts of :func:`talking_loss` (module docstring) and the answer's settings."""

    reconstruction: float = 1.0
    agreement: float = 1.0
    passing: float = 1.0
    interactive: float = 1.0
    temperature: float = 1.0
    answer_labels: bool = True


class TalkingChannel(nn.Module):
    """The encoders and decoders of one (student, teacher) feature pair: four linear maps.

    ``enc_s: W_s -> m``, ``dec_s: m -> W_s``, ``enc_t: W_t -> m``, ``dec_t: m -> W_t``, applied on the
    feature axis of a feature tensor (the last axis of ``[B, D]`` / ``[B, T, D]``, the channels of
    ``[B, C, H, W]``).
    """

    def __init__(self, student_width: int, teacher_width: int, message_dim: int) -> None:
        super().__init__()
        self.enc_s = nn.Linear(student_width, message_dim)
        self.dec_s = nn.Linear(message_dim, student_width)
        self.enc_t = nn.Linear(teacher_width, message_dim)
        self.dec_t = nn.Linear(message_dim, teacher_width)

    @staticmethod
    def apply(layer: nn.Linear, x: torch.Tensor, feature_axis: int) -> torch.Tensor:
        """``layer`` on axis ``feature_axis`` of ``x`` (float32 math, the layer's dtype otherwise)."""
        if x.shape[feature_axis] != layer.in_features:
            raise ShapeError(f"talking channel: a map expects width {layer.in_features}, the feature has "
                             f"{x.shape[feature_axis]} on axis {feature_axis} (shape {tuple(x.shape)})",
                             "check the tapped modules / layers of the talking term")
        x = x.to(layer.weight.dtype)
        if feature_axis == x.dim() - 1:
            return layer(x)
        return layer(x.movedim(feature_axis, -1)).movedim(-1, feature_axis)


def run_frozen(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``modules`` in order with their parameters detached: gradients reach ``x`` only,
    never the (teacher's) parameters, whatever their ``requires_grad``."""
    for module in modules:
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = dict(module.named_buffers())
        weight = next(iter(params.values()), None)
        if weight is not None:
            x = x.to(device=weight.device, dtype=weight.dtype)
        x = torch.func.functional_call(module, {**params, **buffers}, (x,))
    return x


def _per_position(sq: torch.Tensor, positions: int) -> torch.Tensor:
    """Squared errors summed over the feature axis already: mean over any axes after the positions
    (the ``H·W`` of a conv map) so that each position counts once."""
    return sq.flatten(positions).mean(-1) if sq.dim() > positions else sq


def _rel(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``‖pred - target‖²`` per position over the mean real-position ``‖target‖²`` (detached)."""
    pred, target = _up(pred), _up(target)
    if pred.shape != target.shape:
        raise ShapeError(f"talking: decoded {tuple(pred.shape)} and target {tuple(target.shape)} differ",
                         "decoders map back to their own model's feature shape")
    err = _per_position(((pred - target) ** 2).sum(axis), mask.dim())
    scale = _per_position((target.detach() ** 2).sum(axis), mask.dim())
    return err / scale[mask].mean().clamp_min(_EPS) if bool(mask.any()) else err * 0


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² KL(softmax(p/T) ‖ softmax(q/T))`` over the last axis."""
    log_p = torch.log_softmax(_up(p_logits) / temperature, -1)
    log_q = torch.log_softmax(_up(q_logits) / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def talking_parts(channel: TalkingChannel, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                  answer_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  student_logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, temperature: float = 1.0,
                  answer_labels: bool = True) -> dict[str, torch.Tensor]:
    """The four parts of the talking loss per real position (module docstring), each ``[*P]``.

    Args:
        channel: the pair's encoders and decoders.
        student: ``[*P, W_s, ...]`` student feature (``P`` the position axes of ``mask``, then the
            feature axis, then e.g. the ``H, W`` of a conv map).
        teacher: ``[*P, W_t, ...]`` teacher feature, the same trailing axes (detached here).
        mask: ``[*P]`` bool, the real positions.
        answer_fn: the rest of the frozen teacher, from a teacher feature to logits (None: no
            ``interactive`` part; it is then 0).
        student_logits: ``[*P', K]`` the student's logits, ``P'`` = ``P``, or ``[B, T-1]`` for an LM's
            ``[B, T]`` features (the last position predicts nothing).
        teacher_logits: the teacher's logits at the same positions.
        labels: ``[*P']`` labels (``-100`` or out of range: none).
        temperature: ``T`` of both KLs.
        answer_labels: add the CE of the answer to the label.

    Returns:
        ``{"reconstruction", "agreement", "passing", "interactive"}`` -> ``[*P]`` (0 off the mask).
    """
    mask = _check_mask(student, mask, "talking")
    _check_mask(teacher, mask, "talking (teacher)")
    axis = mask.dim()
    if student.shape[axis + 1:] != teacher.shape[axis + 1:]:
        raise ShapeError(f"talking: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must "
                         "have the same positions (the axes after the feature axis)",
                         "tap stages with the same spatial size on both models")
    teacher = teacher.detach()
    z_s = channel.apply(channel.enc_s, student, axis)
    z_t = channel.apply(channel.enc_t, teacher, axis)
    own = channel.apply(channel.enc_s, student.detach(), axis)
    rec = (_rel(channel.apply(channel.dec_s, own, axis), student.detach(), mask, axis)
           + _rel(channel.apply(channel.dec_t, z_t, axis), teacher, mask, axis))
    diff = _per_position(((_up(z_s) - _up(z_t)) ** 2).sum(axis), axis)
    size = _per_position((_up(z_s) ** 2).sum(axis) + (_up(z_t) ** 2).sum(axis), axis) / 2
    agree = diff / size[mask].mean().clamp_min(_EPS) if bool(mask.any()) else diff * 0
    passing = _rel(channel.apply(channel.dec_s, z_t, axis), student, mask, axis)
    talk = torch.zeros_like(rec)
    if answer_fn is not None:
        if student_logits is None or teacher_logits is None:
            raise ShapeError("talking: the interactive part needs the student's and the teacher's logits",
                             "pass student_logits and teacher_logits (dense), or set interactive_weight: 0")
        decoded = channel.apply(channel.dec_t, z_s, axis)
        n_pos = student_logits.shape[: student_logits.dim() - 1]
        shifted = n_pos != mask.shape
        if shifted:  # an LM: features [B, T, ...], logits [B, T-1, V]
            if mask.dim() != 2 or tuple(n_pos) != (mask.shape[0], mask.shape[1] - 1):
                raise ShapeError(f"talking: logits {tuple(student_logits.shape)} do not match positions "
                                 f"{tuple(mask.shape)}", "pass the logits of the feature positions")
            decoded = decoded[:, :-1]
        answer = _up(answer_fn(decoded)).to(student_logits.device)
        if answer.shape != student_logits.shape or teacher_logits.shape != student_logits.shape:
            raise ShapeError(f"talking: the teacher's answer {tuple(answer.shape)}, student logits "
                             f"{tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ",
                             "the teacher head must map the tapped feature to the model's logits")
        part = _kl(answer.detach(), student_logits, temperature) + _kl(teacher_logits.detach(), answer, temperature)
        if answer_labels and labels is not None:
            y = labels.to(answer.device).long()
            ok = (y >= 0) & (y < answer.shape[-1])
            ce = F.cross_entropy(answer.flatten(0, -2), torch.where(ok, y, 0).flatten(), reduction="none")
            part = part + ce.view_as(y) * ok
        if shifted:
            part = torch.cat([part, part.new_zeros(part.shape[0], 1)], dim=1)
        talk = part.to(rec.device)
    zero = torch.zeros((), dtype=rec.dtype, device=rec.device)
    return {k: torch.where(mask, v, zero) for k, v in
            {"reconstruction": rec, "agreement": agree, "passing": passing, "interactive": talk}.items()}


def talking_loss(channel: TalkingChannel, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                 weights: TalkingWeights = TalkingWeights(),
                 answer_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 student_logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """Weighted sum of :func:`talking_parts` (``interactive`` only when ``answer_fn`` is given and its
    weight is not 0), reduced over the real positions (``"none"``: ``[*P]``)."""
    fn = answer_fn if weights.interactive else None
    parts = talking_parts(channel, student, teacher, mask, answer_fn=fn, student_logits=student_logits,
                          teacher_logits=teacher_logits, labels=labels, temperature=weights.temperature,
                          answer_labels=weights.answer_labels)
    per_pos = (weights.reconstruction * parts["reconstruction"] + weights.agreement * parts["agreement"]
               + weights.passing * parts["passing"] + weights.interactive * parts["interactive"])
    return _reduce(per_pos, mask.to(per_pos.device, torch.bool), reduction)
