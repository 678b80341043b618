""":class:`EnsembleTeacher`: several teacher sources mixed into one distribution.

The ensemble's teacher is the weighted *mixture of probabilities* of its members,

    ``p(i) = sum_s w_s p_s(i)``,  ``w_s >= 0``, ``sum_s w_s = 1``   (per sample),

returned as log-probabilities ``log p`` (valid logits for any loss). It is computed in log space
without leaving it: with ``m = max_{s: w_s > 0} log p_s(i)``,

    ``log p(i) = m + log sum_{s: w_s > 0} w_s exp(log p_s(i) - m)``

(a logsumexp with weights), so two identical members give back exactly the member's
log-probabilities, and a zero weight removes a member exactly (fixed zero weights are not even
queried). Mixing logits (a product of experts) would be another teacher; this is the mixture.

Weighting rules (``weighting=``), all giving per-sample weights ``w [S, B]`` (recorded in
:attr:`EnsembleTeacher.last_weights`):

* ``"fixed"`` — ``weights=[...]`` (default uniform), normalised to sum to 1;
* ``"confidence"`` — ``w_s ∝ c_s``, ``c_s`` = member ``s``'s mean max-probability over the
  sample's positions;
* ``"entropy"`` — ``w = softmax_s(-H_s / temperature)``, ``H_s`` = the member's mean entropy
  over the sample's positions (lower entropy, higher weight; ``temperature -> 0`` picks the most
  certain member, large temperatures approach uniform);
* ``"per_domain"`` — ``domain_weights={domain: [w_1, ..., w_S]}``, each sample's domain read
  from ``batch[domain_key]`` (a list of names or a tensor of ids); ``default_weights`` for domains
  not in the table (else an error). Members with zero weight on the whole batch are not queried.

Positions of a sample: those where ``task.to_loss_positions(batch["attention_mask"])`` is 1 (all
positions when the batch has no attention mask).

Sparse members (top-k ``ids``/``logprobs``) are merged by id: per position, the union of the
members' ids, each id with ``sum_s w_s p_s(i)`` over the members that list it. An id outside a
member's top-k counts as 0 for that member (its share of that member's tail mass is unknown), so
the merged entries are a lower bound of the mixture and the rest is tail mass, as for any top-k
signal. Output size is fixed: the ``sparse_k`` most probable merged ids (default: the largest
member k, so the signal costs what one member's does), or ``sparse_k="union"`` for the sum of the
members' k (nothing dropped; unused slots are ``-inf`` padding entries). Dense members of a
sparse ensemble are reduced to their exact top-``sparse_k`` first. The sparse entropy treats the
tail mass as one token (a lower bound of the true entropy). Sampled-tail signals cannot be mixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdforge.errors import ConfigError, DataError, ShapeError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["WEIGHTINGS", "EnsembleTeacher", "mix_dense", "mix_sparse"]

WEIGHTINGS = ("fixed", "confidence", "entropy", "per_domain")
_CHUNK = 1024  # positions per block of the mixture (bounds the [S, chunk, V] float32 work)


class EnsembleTeacher(TeacherSource):
    """A weighted mixture of teacher sources (see the module docstring).

    Args:
        sources: the members: :class:`TeacherSource` objects (or models, wrapped as online teachers).
        weighting: ``"fixed"``, ``"confidence"``, ``"entropy"`` or ``"per_domain"``.
        weights: the fixed weights (``weighting="fixed"``; default uniform).
        temperature: of the entropy weighting (> 0).
        domain_key / domain_weights / default_weights: the ``per_domain`` table.
        sparse_k: entries of a sparse mixture (int, or ``"union"``; default the largest member k).
        per_member_signals: also return each queried member's own signal, its ``weights`` the
            member's per-sample weight at every position (``TeacherSignal.members``), for objective
            terms with ``per_teacher: true``: ``sum_s w_s loss(student, teacher_s)`` instead of
            ``loss(student, sum_s w_s p_s)``. Off by default: the members' distributions then stay
            alive until the loss.

    Example::

        teacher = EnsembleTeacher([OnlineTeacher(math_model), OnlineTeacher(code_model)],
                                  weighting="per_domain",
                                  domain_weights={"math": [0.8, 0.2], "code": [0.1, 0.9]})
    """

    def __init__(
        self,
        sources: Sequence[Any],
        weighting: str = "fixed",
        *,
        weights: Sequence[float] | None = None,
        temperature: float = 1.0,
        domain_key: str = "domain",
        domain_weights: Mapping[Any, Sequence[float]] | None = None,
        default_weights: Sequence[float] | None = None,
        sparse_k: int | str | None = None,
        per_member_signals: bool = False,
    ) -> None:
        from kdforge.teachers.sources import as_source

        self.sources: list[TeacherSource] = [as_source(s) for s in sources]
        if not self.sources or any(s is None for s in self.sources):
            raise ConfigError("an EnsembleTeacher needs at least one teacher source (None given or empty list)",
                              "pass e.g. EnsembleTeacher([OnlineTeacher(a), OnlineTeacher(b)])")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown ensemble weighting {weighting!r}", f"use one of {', '.join(WEIGHTINGS)}")
        n = len(self.sources)
        self.weighting = weighting
        self.fixed = _normalised(weights if weights is not None else [1.0] * n, n, "weights")
        if weighting != "fixed" and weights is not None:
            raise ConfigError(f"weights= is the fixed weighting's table, but weighting={weighting!r}",
                              "drop weights= or use weighting='fixed'")
        if not temperature > 0:
            raise ConfigError(f"the entropy weighting's temperature must be > 0, got {temperature}", "use e.g. 1.0")
        self.temperature = float(temperature)
        self.domain_key = domain_key
        self.domain_weights: dict[Any, torch.Tensor] = {}
        self.default_weights = None
        if weighting == "per_domain":
            if not domain_weights:
                raise ConfigError("weighting='per_domain' needs domain_weights={domain: [one weight per source]}",
                                  f"e.g. domain_weights={{'math': [{', '.join(['0.5'] * n)}]}}")
            self.domain_weights = {k: _normalised(v, n, f"domain_weights[{k!r}]") for k, v in domain_weights.items()}
            if default_weights is not None:
                self.default_weights = _normalised(default_weights, n, "default_weights")
        if sparse_k is not None and sparse_k != "union" and not (isinstance(sparse_k, int) and sparse_k >= 1):
            raise ConfigError(f"sparse_k must be a positive int or 'union', got {sparse_k!r}", "use e.g. sparse_k=32")
        self.sparse_k = sparse_k
        self.per_member_signals = per_member_signals
        self.last_weights: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"EnsembleTeacher({len(self.sources)} sources, weighting={self.weighting!r})"

    # -- contract ----------------------------------------------------------------------------------
    @property
    def provides(self) -> frozenset[str]:  # type: ignore[override]
        if all("dense" in s.provides for s in self.sources):
            return frozenset({"dense"})
        return frozenset({"sparse"}) if all(s.provides & {"dense", "sparse"} for s in self.sources) else frozenset()

    @property
    def scores_new_samples(self) -> bool:  # type: ignore[override]
        return all(s.scores_new_samples for s in self.sources)

    def modules(self) -> list[nn.Module]:
        seen: dict[int, nn.Module] = {}
        for s in self.sources:
            for m in s.modules():
                seen.setdefault(id(m), m)
        return list(seen.values())

    def place(self, device: torch.device | str) -> None:
        for s in self.sources:
            s.place(device)

    def on_step_end(self, student: nn.Module, step: int) -> None:
        for s in self.sources:
            s.on_step_end(student, step)

    def state_dict(self) -> dict[str, Any]:
        """Flat: member ``i``'s entries under ``"<i>.<key>"`` (the checkpoint splits tensors from the rest)."""
        return {f"{i}.{k}": v for i, s in enumerate(self.sources) for k, v in s.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        parts: list[dict[str, Any]] = [{} for _ in self.sources]
        for key, value in state.items():
            head, _, rest = str(key).partition(".")
            if not head.isdigit() or int(head) >= len(self.sources):
                from kdforge.errors import CheckpointError

                raise CheckpointError(f"the checkpoint's ensemble state has an entry {key!r} for no member of this "
                                      f"{len(self.sources)}-member ensemble",
                                      "resume with the same list of teacher sources")
            parts[int(head)][rest] = value
        for s, st in zip(self.sources, parts, strict=True):
            s.load_state_dict(st)

    # -- signal ------------------------------------------------------------------------------------
    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        """The members' mixture at ``task``'s loss positions (dense if every member is dense)."""
        if features is not None:
            raise ConfigError(
                "feature terms need one teacher's intermediate features, but the teacher is an ensemble",
                "distil features from one member (a separate OnlineTeacher), or remove the feature terms",
            )
        prior = self._prior_weights(batch)  # [S, B] or None (per-sample weights come from the signals)
        live = list(range(len(self.sources))) if prior is None else [s for s in range(len(self.sources))
                                                                      if bool((prior[s] > 0).any())]
        signals = {s: self.sources[s].signal(batch, task) for s in live}
        members = [signals[s] for s in live]
        for sig in members:
            if sig.kind == "none":
                raise ConfigError("an ensemble member gave no distribution (features or sequences only)",
                                  "ensemble sources that give dense logits or a sparse top-k")
        first = members[0]
        batch_size = int(first.logits.shape[0] if first.logits is not None else first.sparse.shape[0])
        mask = _position_mask(batch, task, first)
        if prior is not None:
            w = prior[live]
            w = w[:, None].expand(-1, batch_size) if w.dim() == 1 else w
        elif self.weighting == "confidence":
            w = torch.stack([_per_sample(_max_prob(sig), mask) for sig in members])
            w = w / w.sum(0, keepdim=True)
        else:  # entropy
            h = torch.stack([_per_sample(_entropy(sig), mask) for sig in members])
            w = torch.softmax(-h / self.temperature, dim=0)
        if w.shape[1] != batch_size:
            raise ShapeError(f"{w.shape[1]} per-sample weights for a batch of {batch_size}",
                             f"give one {self.domain_key!r} entry per sample")
        full = torch.zeros(len(self.sources), batch_size, dtype=torch.float32)
        full[live] = w.detach().float().cpu()
        self.last_weights = full
        kept = _weighted_members(members, w) if self.per_member_signals else None
        if all(sig.kind == "dense" for sig in members):
            return TeacherSignal(logits=mix_dense([sig.logits for sig in members], w), members=kept)
        k_max = max(sig.sparse.k for sig in members if sig.sparse is not None)
        k_out = self.sparse_k if isinstance(self.sparse_k, int) else k_max
        k_dense = max(k_max, k_out)  # dense members enter as their exact top-k
        sparse = [sig.sparse if sig.sparse is not None else SparseTeacher.from_logits(sig.logits, k_dense)
                  for sig in members]
        return TeacherSignal(sparse=mix_sparse(sparse, w, k=None if self.sparse_k == "union" else k_out),
                             members=kept)

    def _prior_weights(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Weights known before querying the members: fixed ``[S]``, per-domain ``[S, B]``, else None."""
        if self.weighting == "fixed":
            return self.fixed
        if self.weighting != "per_domain":
            return None
        if self.domain_key not in batch:
            raise DataError(f"weighting='per_domain' reads each sample's domain from batch[{self.domain_key!r}], "
                            f"which is missing (keys: {sorted(batch)})",
                            f"add a {self.domain_key!r} column to the dataset (kept by the collator), or set domain_key")
        domains = batch[self.domain_key]
        domains = domains.tolist() if torch.is_tensor(domains) else list(domains)
        rows = []
        for d in domains:
            row = self.domain_weights.get(d, self.default_weights)
            if row is None:
                raise DataError(f"sample domain {d!r} is not in the ensemble's domain_weights "
                                f"({sorted(map(str, self.domain_weights))})",
                                "add it to domain_weights, or give default_weights for unlisted domains")
            rows.append(row)
        return torch.stack(rows, dim=1)


# ---- the mixture -------------------------------------------------------------------------------------


def _weighted_logsumexp(lp: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum_s w_s exp(lp_s)`` along ``dim``, over ``w > 0`` only, exact for equal members."""
    live = w > 0
    neg_inf = torch.tensor(float("-inf"), dtype=lp.dtype, device=lp.device)
    m = torch.where(live, lp, neg_inf).amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    terms = torch.where(live, w * torch.exp(lp - m), torch.zeros_like(lp))
    return (m + torch.log(terms.sum(dim, keepdim=True))).squeeze(dim)


def mix_dense(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Log of the weighted mixture of the members' softmaxes.

    Args:
        logits: ``S`` tensors ``[B, ..., V]`` (any float dtype; one device).
        weights: ``[S]`` or per-sample ``[S, B]``, non-negative, summing to 1 over ``S``.

    Returns:
        float32 log-probabilities ``[B, ..., V]``: ``log sum_s w_s softmax(logits_s)``.
    """
    shape = tuple(logits[0].shape)
    for x in logits:
        if tuple(x.shape) != shape:
            raise ShapeError(f"ensemble members' logits differ in shape: {tuple(x.shape)} vs {shape}",
                             "ensemble teachers that share the vocabulary and the loss positions")
    device, vocab = logits[0].device, shape[-1]
    s_count, b = len(logits), shape[0]
    w = weights.to(device=device, dtype=torch.float32)
    w = w[:, None].expand(s_count, b) if w.dim() == 1 else w
    inner = int(torch.tensor(shape[1:-1]).prod()) if len(shape) > 2 else 1
    w_pos = w[:, :, None].expand(s_count, b, inner).reshape(s_count, -1, 1)  # [S, N, 1]
    flat = [x.reshape(-1, vocab) for x in logits]
    out = torch.empty(flat[0].shape[0], vocab, dtype=torch.float32, device=device)
    for start in range(0, out.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        lp = torch.stack([torch.log_softmax(x[rows].float(), dim=-1) for x in flat])  # [S, n, V]
        out[rows] = _weighted_logsumexp(lp, w_pos[:, rows], dim=0)
    return out.reshape(shape)


def mix_sparse(members: Sequence[SparseTeacher], weights: torch.Tensor, k: int | None = None) -> SparseTeacher:
    """Weighted mixture of top-k signals merged by id (see the module docstring).

    Args:
        members: ``S`` signals ``[B, ..., k_s]`` over the same positions.
        weights: ``[S]`` or ``[S, B]``, non-negative, summing to 1.
        k: entries kept (the most probable merged ids); None keeps ``sum_s k_s`` (padded with -inf).

    Returns:
        :class:`SparseTeacher` ``[B, ..., k]`` sorted by decreasing probability.
    """
    lead = tuple(members[0].shape)
    vocabs = {m.vocab_size for m in members} - {0}
    if len(vocabs) > 1:
        raise ShapeError(f"ensemble members index different vocabularies {sorted(vocabs)}",
                         "ensemble teachers that share the student's vocabulary")
    for m in members:
        if m.sampled:
            raise ConfigError("a sampled-tail teacher signal cannot be mixed (its tail entries are importance weights)",
                              "build the caches of ensemble members as exact top-k (no tail_samples)")
        if tuple(m.shape) != lead:
            raise ShapeError(f"ensemble members cover different positions: {tuple(m.shape)} vs {lead}",
                             "ensemble teachers must score the same batch at the same loss positions")
    device = members[0].ids.device
    s_count, b = len(members), lead[0]
    w = weights.to(device=device, dtype=torch.float32)
    w = w[:, None].expand(s_count, b) if w.dim() == 1 else w
    inner = int(torch.tensor(lead[1:]).prod()) if len(lead) > 1 else 1
    ids = torch.cat([m.ids.to(device).long().reshape(-1, m.k) for m in members], dim=-1)  # [N, Kt]
    lps = torch.cat([m.logprobs.to(device).float().reshape(-1, m.k) for m in members], dim=-1)
    w_slot = torch.cat([w[s][:, None].expand(b, inner).reshape(-1, 1).expand(-1, m.k)
                        for s, m in enumerate(members)], dim=-1)  # [N, Kt]
    total = ids.shape[-1]
    k_out = total if k is None else min(k, total)
    out_ids = torch.empty(ids.shape[0], k_out, dtype=torch.int64, device=device)
    out_lp = torch.empty(ids.shape[0], k_out, dtype=torch.float32, device=device)
    for start in range(0, ids.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        r_ids, r_lp, r_w = ids[rows], lps[rows], w_slot[rows]
        same = r_ids[:, :, None] == r_ids[:, None, :]  # [n, Kt, Kt]: slot i, slot j hold one id
        contrib = torch.where(same, r_w[:, None, :], torch.zeros((), device=device))
        merged = _weighted_logsumexp(r_lp[:, None, :].expand_as(contrib), contrib, dim=-1)  # [n, Kt]
        first = ~torch.tril(same, diagonal=-1).any(-1)  # the first slot of each id keeps the merged value
        merged = torch.where(first, merged, torch.full_like(merged, float("-inf")))
        values, idx = merged.topk(k_out, dim=-1)
        out_ids[rows], out_lp[rows] = r_ids.gather(-1, idx), values
    vocab = next(iter(vocabs)) if vocabs else 0
    return SparseTeacher(out_ids.reshape(*lead, k_out), out_lp.reshape(*lead, k_out), vocab)


# ---- per-sample statistics ---------------------------------------------------------------------------


def _max_prob(sig: TeacherSignal) -> torch.Tensor:
    """``max_i p(i)`` per position ``[B, ...]``."""
    if sig.logits is not None:
        return _blocks(sig.logits, lambda lp: lp.amax(-1).exp())
    return sig.sparse.logprobs.float().amax(-1).exp()


def _entropy(sig: TeacherSignal) -> torch.Tensor:
    """Entropy per position ``[B, ...]`` (sparse: top-k entries plus the tail as one token)."""
    if sig.logits is not None:
        return _blocks(sig.logits, lambda lp: -(lp.exp() * lp).nan_to_num(0.0).sum(-1))
    lp = sig.sparse.logprobs.float()
    h = -(lp.exp() * lp).nan_to_num(0.0).sum(-1)
    tail = sig.sparse.tail_mass()
    return h - (tail * tail.clamp_min(1e-30).log())


def _blocks(logits: torch.Tensor, fn: Any) -> torch.Tensor:
    """``fn(log_softmax(block))`` over blocks of positions of ``[B, ..., V]`` logits -> ``[B, ...]``."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.cat([fn(torch.log_softmax(flat[i:i + _CHUNK].float(), dim=-1))
                     for i in range(0, flat.shape[0], _CHUNK)])
    return out.reshape(logits.shape[:-1])


def _per_sample(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x [B, ...]`` over each sample's (masked) positions -> ``[B]``."""
    x = x.float().reshape(x.shape[0], -1)
    if mask is None:
        return x.mean(-1)
    m = mask.to(x.device).float().reshape(x.shape[0], -1)
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def _position_mask(batch: Mapping[str, Any], task: Any, sig: TeacherSignal) -> torch.Tensor | None:
    lead = tuple(sig.logits.shape[:-1]) if sig.logits is not None else tuple(sig.sparse.shape)
    am = batch.get("attention_mask")
    if not torch.is_tensor(am) or len(lead) < 2:
        return None
    mask = task.to_loss_positions(am, batch, what="attention mask")
    return mask.bool() if tuple(mask.shape) == lead else None


def _normalised(weights: Sequence[float], n: int, what: str) -> torch.Tensor:
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.numel() != n or bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ConfigError(f"{what} must be {n} finite non-negative numbers, not all zero (one per source); "
                          f"got {list(weights)}", f"e.g. {what}=[{', '.join(['1'] * n)}]")
    return w / w.sum()


def _weighted_members(members: Sequence[TeacherSignal], w: torch.Tensor) -> tuple[TeacherSignal, ...]:
    """Each member's distribution alone, its ``weights`` its per-sample weight ``w [S, B]`` spread
    over the sample's positions (the shape of the member's distribution without the last axis)."""
    from dataclasses import replace

    out = []
    for sig, w_s in zip(members, w, strict=True):
        dist = sig.logits if sig.logits is not None else sig.sparse.ids
        lead = tuple(dist.shape[:-1])
        per_pos = w_s.detach().float().to(dist.device).reshape(-1, *[1] * (len(lead) - 1)).expand(lead)
        out.append(replace(sig, features=None, sequences=None, members=None, weights=per_pos))
    return tuple(out)
