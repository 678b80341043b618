"""DAC-KL's learnable clipping sub-network and its soft region (:mod:`kdforge.losses.dac_kl`).

Liu et al. 2024 (*Multi-Granularity Semantic Revision for Large Language Model Distillation*):
"DAC-KL loss exploits a learnable sub-network to adaptively extract semantically dense areas from
the teacher's output". Published descriptions: the sub-network predicts an upper and a lower
clipping limit ``(u, l)`` of the teacher's distribution, the part between them is kept (with the
ground-truth token) and the KL is taken on the clipped distributions.

kdforge's reading (per position; ``p_(1) >= p_(2) >= ...`` the teacher's sorted probabilities,
``c_j^- = sum_{i<j} p_(i)`` and ``c_j^+ = c_j^- + p_(j)`` the cumulative mass before and through
class ``j``):

* the limits live in **cumulative-mass coordinates**: class ``j`` is in the region when its mass
  interval ``[c_j^-, c_j^+)`` meets the window ``[l, u)``, i.e. ``c_j^- < u`` and ``c_j^+ > l``;
  the teacher's top class and the label are always in it. At ``l <= 0`` and ``u = mass`` this is
  exactly :func:`~kdforge.losses.dac_kl.dense_region` (the fixed-mass rule);
* the membership is **soft** so that the limits get a gradient:
  ``w_j = sigmoid((u - c_j^-) / tau) * sigmoid((c_j^+ - l) / tau)`` (``tau``: the loss's
  ``region_temperature``, in mass units; ``tau = 0`` is the hard indicator above);
* :class:`DACClipNet` predicts ``(l, u)`` from per-position features of the (tempered) teacher
  distribution: its top-``m`` sorted probabilities, its entropy over ``log V`` and the mass
  beyond the top ``m``. The limits are **bounded**: ``u`` in ``(p_(1) - margin, 1 + margin)``
  (from "the top class only" to "everything", each end a ``margin`` beyond the last boundary so
  that the soft membership still has a gradient there) and ``l`` in ``(-margin, u)``; unbounded
  limits were absorbed, once a few ``tau`` outside ``[p_(1), 1]``, by a zero gradient (measured:
  docs/regimes.md). Its last layer starts at zero, so every position starts at ``u = mass``
  (clipped into its range) and ``l`` just above ``-margin``: at ``tau = 0`` the fixed-mass rule.

How the sub-network is *trained* is kdforge's (the abstract gives no rule): see
:mod:`kdforge.losses.dac_kl`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.functional import logsigmoid

from kdforge.errors import ConfigError

_EDGE = 1e-3  # the untrained limits stay this far (as a fraction of their range) inside it
_LOGIT_EDGE = math.log(_EDGE / (1 - _EDGE))

__all__ = ["DACClipNet", "clip_features", "region_log_weights", "with_stand_in_net"]


def clip_features(sorted_probs: torch.Tensor, top_m: int) -> torch.Tensor:
    """``[n, top_m + 2]`` from sorted (descending) teacher probabilities ``[n, V]``: the top ``top_m``
    (zero-padded when ``V < top_m``), the entropy divided by ``log V`` and the mass beyond the top ``top_m``."""
    n, v = sorted_probs.shape
    top = sorted_probs[:, :top_m]
    if v < top_m:
        top = torch.cat([top, top.new_zeros(n, top_m - v)], -1)
    entropy = -torch.xlogy(sorted_probs, sorted_probs).sum(-1) / math.log(max(v, 2))
    beyond = (1.0 - top.sum(-1)).clamp_min(0.0)
    return torch.cat([top, entropy.unsqueeze(-1), beyond.unsqueeze(-1)], -1)


class DACClipNet(nn.Module):
    """DAC-KL's clipping sub-network: per position, ``(l, u)`` in cumulative-mass coordinates.

    With ``(z_l, z_u) = gain * MLP(clip_features(sorted teacher probabilities))`` and ``p_(1)`` the
    top probability::

        u = lo + (hi - lo) * sigmoid(logit(f_0) + z_u),   lo = p_(1) - margin,  hi = 1 + margin,
        l = -margin + (u + margin) * sigmoid(logit(1e-3) + z_l)

    ``f_0 = (mass - lo) / (hi - lo)`` clipped to ``[1e-3, 1 - 1e-3]``, so the untrained net
    (``z = 0``) gives ``u = mass`` wherever ``mass`` is in range. Pass it to
    :func:`~kdforge.losses.dac_kl` as ``clip_net`` and optimise its parameters with the student (the
    Distiller's ``extra_modules``; the recipes do it for ``dac_kl: {learned: true}``).

    Args:
        top_m: sorted teacher probabilities the features include.
        hidden: width of the one hidden layer.
        init_mass: the initial upper limit (the fixed-mass rule's ``mass``).
        margin: how far beyond ``[p_(1), 1]`` the upper limit may go (and the lower one below 0);
            about ``2 tau`` keeps a gradient at both ends.
        momentum: of :attr:`region_stats`, the running means the loss records in training mode.
        gain: scales the MLP's outputs. Adam steps every parameter by about its learning rate and
            the recipes use the student's (often 1e-3): the gain gives the limits a usable pace.
    """

    def __init__(self, top_m: int = 8, hidden: int = 16, init_mass: float = 0.9, margin: float = 0.1,
                 momentum: float = 0.9, gain: float = 10.0) -> None:
        super().__init__()
        if top_m < 1 or hidden < 1:
            raise ConfigError(f"DACClipNet top_m and hidden must be >= 1, got {top_m}, {hidden}", "use e.g. top_m=8, hidden=16")
        if not (gain > 0 and margin > 0 and 0 < init_mass <= 1):
            raise ConfigError(f"DACClipNet needs gain > 0, margin > 0, init_mass in (0, 1]; got {gain}, {margin}, "
                              f"{init_mass}", "use e.g. gain=10, margin=0.1, init_mass=0.9")
        self.top_m, self.gain, self.margin, self.init_mass = top_m, float(gain), float(margin), float(init_mass)
        self.mlp = nn.Sequential(nn.Linear(top_m + 2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.momentum = momentum
        self.register_buffer("stats", torch.zeros(len(self.STATS)))
        self.register_buffer("stats_seen", torch.zeros((), dtype=torch.long))

    #: the running means of :attr:`region_stats`, in the order of the ``stats`` buffer
    STATS = ("lower", "upper", "region_size", "region_mass")

    @property
    def region_stats(self) -> dict[str, float]:
        """Running means over the training positions the loss saw: ``lower``, ``upper``,
        ``region_size`` (``sum_v w_v``, label included) and ``region_mass`` (``sum_v w_v p_v``); empty
        before the first training call."""
        if int(self.stats_seen) == 0:
            return {}
        return dict(zip(self.STATS, self.stats.tolist()))

    @torch.no_grad()
    def observe(self, lower: torch.Tensor, upper: torch.Tensor, log_w: torch.Tensor, t_logp: torch.Tensor) -> None:
        """Update :attr:`region_stats` with one batch (limits ``[n]``, membership and teacher logs ``[n, V]``)."""
        if lower.numel() == 0:
            return
        batch = torch.stack([lower.mean(), upper.mean(), log_w.exp().sum(-1).mean(),
                             (log_w + t_logp).exp().sum(-1).mean()]).to(self.stats)
        if int(self.stats_seen) == 0:
            self.stats.copy_(batch)
        else:
            self.stats.mul_(self.momentum).add_(batch, alpha=1 - self.momentum)
        self.stats_seen.add_(1)

    def forward(self, sorted_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(l [n], u [n])`` for sorted (descending) teacher probabilities ``[n, V]``."""
        probs = sorted_probs.detach()
        z = (self.mlp(clip_features(probs, self.top_m).to(self.mlp[0].weight.dtype)) * self.gain).to(probs.dtype)
        lo, hi = probs[:, 0] - self.margin, 1.0 + self.margin
        start = torch.logit(((self.init_mass - lo) / (hi - lo)).clamp(_EDGE, 1 - _EDGE))
        upper = lo + (hi - lo) * torch.sigmoid(start + z[:, 1])
        lower = -self.margin + (upper + self.margin) * torch.sigmoid(_LOGIT_EDGE + z[:, 0])
        return lower, upper


def region_log_weights(sorted_probs: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                       tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log w, log(1 - w))`` ``[n, V]`` in sorted order (module docstring); the top class has ``w = 1``.

    ``tau > 0``: ``w = sigmoid((u - c^-)/tau) * sigmoid((c^+ - l)/tau)``, computed in log space
    (``1 - sigmoid(a) sigmoid(b) = sigmoid(-a) + sigmoid(a) sigmoid(-b)``), differentiable in
    ``(l, u)``. ``tau = 0``: the hard indicator ``c^- < u and c^+ > l`` (no gradient).
    """
    after = sorted_probs.cumsum(-1)
    before = after - sorted_probs
    u, lo = upper.unsqueeze(-1), lower.unsqueeze(-1)
    if tau == 0:
        keep = (before < u) & (after > lo)
        keep[..., 0] = True
        zero = sorted_probs.new_zeros(())
        neg = sorted_probs.new_full((), float("-inf"))
        return torch.where(keep, zero, neg), torch.where(keep, neg, zero)
    a, b = (u - before) / tau, (after - lo) / tau
    log_w = logsigmoid(a) + logsigmoid(b)
    log_out = torch.logaddexp(logsigmoid(-a), logsigmoid(a) + logsigmoid(-b))
    top = torch.zeros_like(log_w, dtype=torch.bool)
    top[..., 0] = True
    return log_w.masked_fill(top, 0.0), log_out.masked_fill(top, float("-inf"))


def with_stand_in_net(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` of loss ``name``, plus a fresh :class:`DACClipNet` where a ``dac_kl`` term says
    ``learned: true`` without one: what the recipes attach, for checks and timing probes that call
    the loss outside a recipe (the preflight). Other params are returned unchanged (a copy)."""
    out = dict(params)
    if name == "dac_kl" and out.get("learned") and out.get("clip_net") is None:
        out["clip_net"] = DACClipNet(init_mass=float(out.get("mass", 0.9)))
    return out
