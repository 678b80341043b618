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
  beyond the top ``m``. Its last layer starts at zero, so every position starts at
  ``(l, u) = (init_lower, init_mass)``: the fixed-mass DAC-KL (softened by ``tau``).

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

    ``(l, u) = gain * MLP(clip_features(sorted teacher probabilities))``, unbounded (``u >= 1`` keeps
    every class, ``l <= 0`` clips nothing at the top). Pass it to :func:`~kdforge.losses.dac_kl`
    as ``clip_net`` and optimise its parameters with the student (the Distiller's
    ``extra_modules``; the recipes do it for ``dac_kl: {learned: true}``).

    Args:
        top_m: sorted teacher probabilities the features include.
        hidden: width of the one hidden layer.
        init_mass: the initial upper limit ``u`` (the fixed-mass rule's ``mass``).
        init_lower: the initial lower limit ``l`` (below 0: nothing clipped at the top; the
            default ``-0.5`` keeps the soft membership of the top classes at ``sigmoid(0.5 / tau)``).
        momentum: of :attr:`region_stats`, the running means the loss records in training mode.
        gain: the limits are ``gain * MLP(...)``. Adam steps every parameter by about its learning
            rate, so the limits move by up to about ``gain * lr`` per step: the recipes optimise the
            net with the student's learning rate (often 1e-3, which alone would move ``u`` by at most
            0.06 in a 60-step run), and the gain gives it a usable pace.
    """

    def __init__(self, top_m: int = 8, hidden: int = 16, init_mass: float = 0.9, init_lower: float = -0.5,
                 momentum: float = 0.9, gain: float = 10.0) -> None:
        super().__init__()
        if top_m < 1 or hidden < 1:
            raise ConfigError(f"DACClipNet top_m and hidden must be >= 1, got {top_m}, {hidden}", "use e.g. top_m=8, hidden=16")
        if not gain > 0:
            raise ConfigError(f"DACClipNet gain must be > 0, got {gain}", "use e.g. gain=10")
        if not init_lower < init_mass:
            raise ConfigError(f"DACClipNet init_lower ({init_lower}) must be below init_mass ({init_mass})",
                              "use e.g. init_lower=-0.5, init_mass=0.9")
        self.top_m, self.gain = top_m, float(gain)
        self.mlp = nn.Sequential(nn.Linear(top_m + 2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.mlp[2].weight)
        with torch.no_grad():
            self.mlp[2].bias.copy_(torch.tensor([init_lower, init_mass]) / self.gain)
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
        features = clip_features(sorted_probs.detach(), self.top_m).to(self.mlp[0].weight.dtype)
        out = (self.mlp(features) * self.gain).to(sorted_probs.dtype)
        return out[:, 0], out[:, 1]


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
