"""Teacher signals: what a loss receives from the teacher.

A teacher signal is either

* dense logits, a plain ``torch.Tensor`` of shape ``[..., vocab]`` (online teacher), or
* a :class:`SparseTeacher`: the teacher's top-k token ids and their log-probabilities
  (log-softmax over the *full* vocabulary at temperature 1), shape ``[..., k]`` each. This is
  what an offline cache stores (FIRST, MiniPLM offline inference, DistillKit's sparse signal).

What happens to the probability mass outside the top-k is chosen explicitly by the loss's
``sparse_policy`` argument (see :mod:`kdforge.losses.divergences`), never by accident.

**Sampled tail** (``num_exact`` set): the first ``num_exact`` entries are the exact top-k and the
remaining ones are tokens drawn from the teacher's *tail* (the distribution restricted to the
ids outside the top-k, renormalised), ``m`` draws with replacement, duplicates merged. A drawn id
``j`` drawn ``c_j`` times carries the weight ``w_j = r * c_j / m`` (``r = 1 - sum_topk p`` the
tail mass), stored as ``logprobs = log w_j``. The signal is then an unbiased estimate ``p_hat``
of the full distribution, ``E[p_hat] = p``, summing to 1 exactly ("random sampling KD",
Anshumann et al., 2025, *Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs*).
Only losses *linear in p* keep that property (forward KL / soft cross-entropy: their gradient
w.r.t. the student logits is ``q - p``); :mod:`kdforge.losses._core` refuses the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdforge.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher distribution per position.

    Attributes:
        ids: ``[..., k]`` int64 token ids (any order; padding ids may repeat with logprob -inf).
        logprobs: ``[..., k]`` float log p_teacher(id) at temperature 1, normalised over the full
            vocabulary (so ``logprobs.exp().sum(-1) <= 1``; the remainder is the tail mass).
        vocab_size: size of the full vocabulary the ids index into.
        num_exact: ``None`` (default): every entry is an exact top-k log-prob. An int ``e``: entries
            ``[..., :e]`` are the exact top-e, entries ``[..., e:]`` are sampled tail tokens whose
            ``logprobs`` are log importance weights (see the module docstring); padding slots
            have ``-inf``. Then ``logprobs.exp().sum(-1) == 1``: there is no tail left.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    vocab_size: int
    num_exact: int | None = None

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ShapeError(
                f"SparseTeacher ids {tuple(self.ids.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must have the same shape [..., k]",
                "build both from the same top-k call",
            )
        if self.ids.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"SparseTeacher ids must be integer, got {self.ids.dtype}", "cast with .long()")
        if self.num_exact is not None and not 0 <= self.num_exact <= self.k:
            raise ShapeError(
                f"SparseTeacher num_exact={self.num_exact} outside [0, k={self.k}]",
                "num_exact counts the exact top-k entries that precede the sampled ones",
            )

    @property
    def sampled(self) -> bool:
        """True when the signal carries sampled tail entries (an unbiased estimate of p)."""
        return self.num_exact is not None

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """Leading (position) shape, without k."""
        return self.ids.shape[:-1]

    def to(self, device: torch.device | str) -> SparseTeacher:
        return SparseTeacher(self.ids.to(device), self.logprobs.to(device), self.vocab_size, self.num_exact)

    def flatten(self) -> SparseTeacher:
        """Merge leading dims: ``[..., k] -> [N, k]``."""
        return SparseTeacher(self.ids.reshape(-1, self.k), self.logprobs.reshape(-1, self.k), self.vocab_size,
                             self.num_exact)

    def __getitem__(self, index) -> SparseTeacher:
        """Index the leading (position) dims only; the entry axis stays whole."""
        return SparseTeacher(self.ids[index], self.logprobs[index], self.vocab_size, self.num_exact)

    def tail_mass(self) -> torch.Tensor:
        """``1 - sum_k p_k`` per position, clamped at 0, shape ``[...]`` (~0 for a sampled signal)."""
        return (1.0 - self.logprobs.float().exp().sum(-1)).clamp_min(0.0)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> SparseTeacher:
        """Top-k of dense logits (log-softmax first, so logprobs are full-vocab normalised)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(min(k, logits.shape[-1]), dim=-1)
        return cls(ids, values, int(logits.shape[-1]))

    def to_dense_logprobs(self, fill: float | None = None) -> torch.Tensor:
        """Dense ``[..., vocab]`` log-probs (for tests/diagnostics only: memory heavy).

        Tokens outside the top-k get ``fill``; by default the tail mass spread uniformly over
        them (``-inf`` when there is no tail).
        """
        out_shape = (*self.shape, self.vocab_size)
        if fill is None:
            n_missing = max(self.vocab_size - self.k, 1)
            fill_t = (self.tail_mass() / n_missing).clamp_min(1e-45).log().unsqueeze(-1)
            dense = fill_t.expand(out_shape).clone()
        else:
            dense = torch.full(out_shape, fill, dtype=torch.float32, device=self.ids.device)
        return dense.scatter(-1, self.ids.long(), self.logprobs.float())


# ---- sampled tail --------------------------------------------------------------------------------


def sample_tail(
    logits: torch.Tensor,
    k: int,
    m: int,
    seeds: Sequence[int],
    *,
    chunk: int = 256,
) -> tuple[SparseTeacher, torch.Tensor]:
    """Exact top-``k`` plus ``m`` draws from the renormalised tail, per position.

    For each position with teacher distribution ``p = softmax(logits)``: keep the top-``k`` ids
    and their exact log-probs; draw ``m`` ids (with replacement) from ``p`` restricted to the other
    ids and renormalised; merge duplicates into counts ``c_j``. The returned signal has
    ``k + m`` entries, ``num_exact = k``; sampled slot ``j`` has ``logprobs = log(r * c_j / m)``
    with ``r = sum_{i not in top-k} p_i`` (computed directly by a logsumexp over the tail, not as
    ``1 - sum_topk``), unused slots ``-inf`` (id repeated from the first sampled slot). So
    ``E[p_hat_i] = p_i`` for every id ``i`` and ``sum_i p_hat_i = 1``.

    Determinism: the uniforms of row ``b`` come from ``numpy.random.Generator(PCG64(
    SeedSequence(seeds[b])))``, drawn on the CPU, and ids are found by inverse CDF in float64;
    so the draws depend only on the row's seed and logits (not on the batch, process or world
    size): a data-parallel or resumed cache build writes the same bytes.

    Args:
        logits: ``[B, T, V]`` teacher logits (any float dtype, any device).
        k: exact entries per position (``0 <= k < V``; 0 gives pure sampling from ``p``).
        m: draws per position (``1 <= m <= 255``).
        seeds: one integer (or sequence of integers) seed per row ``b``.
        chunk: positions processed at once (bounds the float64 ``[chunk, V]`` CDF).

    Returns:
        ``(signal, counts)``: ``SparseTeacher`` ``[B, T, k + m]`` with ``num_exact = k``, and the
        int64 counts ``[B, T, m]`` of the sampled slots (0 = unused slot).
    """
    if logits.ndim != 3:
        raise ShapeError(f"sample_tail needs logits [B, T, V], got {tuple(logits.shape)}", "pass a batch of sequences")
    b_size, t_len, vocab = logits.shape
    if not 0 <= k < vocab:
        raise ConfigError(f"k={k} must lie in [0, vocab={vocab})", "keep at least one id in the tail to sample from")
    if not 1 <= m <= 255:
        raise ConfigError(f"tail_samples={m} must lie in [1, 255]", "use e.g. 16 or 32 (counts are stored in a byte)")
    if len(seeds) != b_size:
        raise ShapeError(f"{len(seeds)} seeds for {b_size} rows", "pass one seed per row")
    device = logits.device
    out_ids = torch.empty(b_size, t_len, k + m, dtype=torch.int64, device=device)
    out_lp = torch.empty(b_size, t_len, k + m, dtype=torch.float32, device=device)
    out_counts = torch.empty(b_size, t_len, m, dtype=torch.int64, device=device)
    for b in range(b_size):
        seed = seeds[b]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [int(s) for s in seed] if isinstance(seed, (tuple, list)) else int(seed))))
        uniforms = torch.from_numpy(rng.random((t_len, m))).to(device)
        for t0 in range(0, t_len, chunk):
            rows = slice(t0, min(t0 + chunk, t_len))
            ids, lp, counts = _sample_rows(logits[b, rows], k, m, uniforms[rows])
            out_ids[b, rows], out_lp[b, rows], out_counts[b, rows] = ids, lp, counts
    return SparseTeacher(out_ids, out_lp, vocab, num_exact=k), out_counts


def _sample_rows(logits: torch.Tensor, k: int, m: int, uniforms: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, V]`` logits, ``[n, m]`` float64 uniforms -> ids/log-probs ``[n, k+m]``, counts ``[n, m]``."""
    lp = torch.log_softmax(logits.double(), dim=-1)  # float64: exact enough for a CDF over 10^5 ids
    n, vocab = lp.shape
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], torch.zeros(n, 0, dtype=torch.int64, device=lp.device))
    tail_lp = lp.scatter(-1, top_ids, float("-inf")) if k else lp
    log_r = torch.logsumexp(tail_lp, dim=-1, keepdim=True)  # [n, 1] log tail mass
    cdf = torch.cumsum(torch.exp(tail_lp - log_r.clamp_min(-1e300)), dim=-1)  # renormalised tail
    total = cdf[:, -1:]
    x = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    draws = torch.searchsorted(cdf, x.contiguous(), right=True).clamp_max(vocab - 1)  # [n, m]
    # merge duplicates: slot i keeps its id if no earlier slot holds it; its count = occurrences
    eq = draws.unsqueeze(-1) == draws.unsqueeze(-2)  # [n, m, m]
    counts = eq.sum(-1)
    first = ~torch.tril(eq, diagonal=-1).any(-1)
    counts = torch.where(first, counts, 0)
    # order: by count (desc), then id (asc); unused slots last
    key = (m + 1 - counts) * (vocab + 1) + torch.where(first, draws, vocab)
    order = key.argsort(dim=-1)
    draws, counts = draws.gather(-1, order), counts.gather(-1, order)
    draws = torch.where(counts > 0, draws, draws[:, :1])  # unused slots repeat the first id
    empty = torch.isneginf(log_r)  # no tail at all (top-k holds every id with mass): no samples
    counts = torch.where(empty, 0, counts)
    weights = log_r + torch.log(counts.double() / m)  # -inf where count == 0
    ids = torch.cat([top_ids, draws], dim=-1)
    out_lp = torch.cat([top_lp, weights], dim=-1).float()
    return ids, out_lp, counts
