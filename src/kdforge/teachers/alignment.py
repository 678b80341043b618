"""Token alignment between two tokenizations of the same text, through character offsets.

Cross-tokenizer distillation compares the teacher's and the student's next-token distributions
at *matching text positions*. Both tokenizers cut the same text; a character position where a
token ends on **both** sides is a *shared boundary*. The tokens between two consecutive shared
boundaries form a *group*: ``n_s`` student tokens and ``n_t`` teacher tokens covering the same
text span. Example, ``"hello world"``::

    student: [BOS] "hello" " world"          ends: 0, 5, 11
    teacher: [BOS] "hel" "lo" " world"       ends: 0, 3, 5, 11
    shared boundaries: 5, 11  ->  groups {"hello"} <-> {"hel", "lo"},  {" world"} <-> {" world"}

A causal LM predicts token ``j`` at loss position ``j - 1``. For every group both models'
distributions at the group's *first* position are conditioned on the same text (everything up to
the previous shared boundary), so they can be compared there. The named ``span_policy`` decides
what happens to a group whose spans are cut differently (``n_s > 1`` or ``n_t > 1``):

* ``"skip"``: only one-to-one groups are compared (both models predict the same text span as one
  token); the others carry no distillation signal.
* ``"merge"``: every group is compared once, at its first position; each side's distribution
  there is multiplied by its own probability of the group's remaining actual tokens (the chain
  rule: the entry of the actual first token becomes the probability of the whole span, as TRL's
  GOLD "observed" merge). :class:`TokenAlignment` records which later positions fold into which
  first position; the losses apply it (:mod:`kdforge.losses.uld`).

Zero-width tokens (BOS/EOS/padding, offsets ``(c, c)``) cover no text: they are never targets and
never create a boundary, but a zero-width token at the start (BOS) is a valid context, so the first
text token is predicted when both sides start with one. Tokens with equal ends on one side (byte
pieces of one character) close a boundary only at the last of them. Text that no token covers
(WordPiece drops spaces) does not matter: only ends are compared.

The computation is vectorised per example (numpy set operations and cumulative sums over the
tokens, no Python loop per token); build it once per batch, in the collator or the teacher source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from kdforge.errors import ConfigError, ShapeError

__all__ = ["SPAN_POLICIES", "TokenAlignment", "align_offsets"]

#: named ways to treat a group whose text span the two tokenizers cut differently
SPAN_POLICIES = ("merge", "skip")


@dataclass(frozen=True)
class TokenAlignment:
    """Where each student loss position finds its teacher counterpart (one batch).

    Student loss positions ``P_s = T_s - 1``, teacher loss positions ``P_t = T_t - 1``
    (position ``p`` predicts token ``p + 1``).

    Attributes:
        teacher_pos: ``[B, P_s]`` int64, the teacher loss position paired with each student loss
            position (0 where unpaired; read it only where ``mask``).
        mask: ``[B, P_s]`` bool, the student positions that are compared (first position of a
            kept group).
        one_to_one: ``[B, P_s]`` bool, paired positions whose group is one token on both sides
            (both models predict exactly the same text span: agreement is measured there).
        student_merge: ``[B, P_s]`` int64, for a later position of a multi-token student group
            (``"merge"``) the group's first position, else -1.
        teacher_merge: ``[B, P_t]`` int64, the same on the teacher's positions.
        policy: the span policy that built it.
    """

    teacher_pos: torch.Tensor
    mask: torch.Tensor
    one_to_one: torch.Tensor
    student_merge: torch.Tensor
    teacher_merge: torch.Tensor
    policy: str

    def to(self, device: torch.device | str) -> TokenAlignment:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return TokenAlignment(**moved)

    @property
    def num_groups(self) -> int:
        """Number of compared positions in the batch (a host read: for logs and tests)."""
        return int(self.mask.sum().item())


def _as_array(x: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _groups(offsets: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text tokens of one row: their row indices, ends, and whether each closes its end value."""
    start, end = offsets[:, 0].astype(np.int64), offsets[:, 1].astype(np.int64)
    text = valid & (end > start)
    idx = np.flatnonzero(text)
    ends = end[idx]
    if ends.size and np.any(np.diff(ends) < 0):
        raise ShapeError(
            "token offsets go backwards (a token ends before the previous one)",
            "pass the offsets of one left-to-right tokenization of one text (return_offsets_mapping=True)",
        )
    closes = np.ones(ends.size, dtype=bool)
    if ends.size > 1:
        closes[:-1] = ends[:-1] < ends[1:]
    return idx, ends, closes


def _row(s_off: np.ndarray, s_valid: np.ndarray, t_off: np.ndarray, t_valid: np.ndarray, policy: str
         ) -> tuple[np.ndarray, ...]:
    s_idx, s_end, s_close = _groups(s_off, s_valid)
    t_idx, t_end, t_close = _groups(t_off, t_valid)
    shared = np.intersect1d(s_end[s_close], t_end[t_close], assume_unique=True)
    s_carrier = s_close & np.isin(s_end, shared)
    t_carrier = t_close & np.isin(t_end, shared)
    # group of each text token: shared boundaries strictly before its own closing one
    s_group = np.cumsum(s_carrier) - s_carrier
    t_group = np.cumsum(t_carrier) - t_carrier
    n_groups = shared.size
    s_size = np.bincount(s_group, minlength=n_groups + 1)[:n_groups]
    t_size = np.bincount(t_group, minlength=n_groups + 1)[:n_groups]
    # first token of each group (tokens after the last shared boundary belong to no group)
    s_first = np.full(n_groups, -1, dtype=np.int64)
    t_first = np.full(n_groups, -1, dtype=np.int64)
    in_s, in_t = s_group < n_groups, t_group < n_groups
    g, at = np.unique(s_group[in_s], return_index=True)  # groups are non-decreasing: first occurrence
    s_first[g] = s_idx[in_s][at]
    g, at = np.unique(t_group[in_t], return_index=True)
    t_first[g] = t_idx[in_t][at]
    s_pos, t_pos = s_first - 1, t_first - 1  # the loss positions predicting the first tokens
    keep = (s_pos >= 0) & (t_pos >= 0)
    one = keep & (s_size == 1) & (t_size == 1)
    if policy == "skip":
        keep = one

    def merge_index(idx: np.ndarray, group: np.ndarray, first: np.ndarray, ok: np.ndarray, width: int) -> np.ndarray:
        out = np.full(width, -1, dtype=np.int64)
        if policy != "merge":
            return out
        inside = group < n_groups
        g = group[inside]
        later = idx[inside] != first[g]
        sel = later & ok[g]
        out[idx[inside][sel] - 1] = first[g][sel] - 1
        return out

    s_merge = merge_index(s_idx, s_group, s_first, keep, max(len(s_off) - 1, 0))
    t_merge = merge_index(t_idx, t_group, t_first, keep, max(len(t_off) - 1, 0))
    return s_pos[keep], t_pos[keep], one[keep], s_merge, t_merge


def align_offsets(
    student_offsets: torch.Tensor | np.ndarray | Sequence,
    teacher_offsets: torch.Tensor | np.ndarray | Sequence,
    *,
    student_mask: torch.Tensor | np.ndarray | None = None,
    teacher_mask: torch.Tensor | np.ndarray | None = None,
    policy: str = "merge",
) -> TokenAlignment:
    """Align two tokenizations of the same texts by their character offsets.

    Args:
        student_offsets: ``[B, T_s, 2]`` (or ``[T_s, 2]`` for one text) character ``(start, end)``
            of each student token, as a fast tokenizer's ``return_offsets_mapping`` gives them;
            special tokens and padding are zero-width.
        teacher_offsets: ``[B, T_t, 2]`` the same for the teacher's tokenization of the same texts.
        student_mask / teacher_mask: ``[B, T]`` attention masks (1 = real token); default all real.
        policy: ``"merge"`` or ``"skip"`` (see the module docstring).

    Returns:
        :class:`TokenAlignment` over the student's ``T_s - 1`` loss positions.
    """
    if policy not in SPAN_POLICIES:
        raise ConfigError(f"unknown span_policy {policy!r}", f"use one of: {', '.join(SPAN_POLICIES)}")
    s_off, t_off = _as_array(student_offsets), _as_array(teacher_offsets)
    single = s_off.ndim == 2
    if single:
        s_off, t_off = s_off[None], t_off[None]
    if s_off.ndim != 3 or t_off.ndim != 3 or s_off.shape[-1] != 2 or t_off.shape[-1] != 2 or len(s_off) != len(t_off):
        raise ShapeError(
            f"offsets must be [B, T, 2] for both sides with the same B, got {s_off.shape} and {t_off.shape}",
            "tokenize the same texts with both tokenizers, return_offsets_mapping=True, padded per side",
        )
    b, ts, tt = s_off.shape[0], s_off.shape[1], t_off.shape[1]
    s_valid = np.ones((b, ts), bool) if student_mask is None else _as_array(student_mask).reshape(b, ts).astype(bool)
    t_valid = np.ones((b, tt), bool) if teacher_mask is None else _as_array(teacher_mask).reshape(b, tt).astype(bool)
    ps, pt = max(ts - 1, 0), max(tt - 1, 0)
    teacher_pos = np.zeros((b, ps), np.int64)
    mask = np.zeros((b, ps), bool)
    one_to_one = np.zeros((b, ps), bool)
    s_merge = np.full((b, ps), -1, np.int64)
    t_merge = np.full((b, pt), -1, np.int64)
    for row in range(b):  # one vectorised alignment per example
        sp, tp, one, sm, tm = _row(s_off[row], s_valid[row], t_off[row], t_valid[row], policy)
        teacher_pos[row, sp], mask[row, sp], one_to_one[row, sp] = tp, True, one
        s_merge[row], t_merge[row] = sm, tm
    return TokenAlignment(
        teacher_pos=torch.from_numpy(teacher_pos),
        mask=torch.from_numpy(mask),
        one_to_one=torch.from_numpy(one_to_one),
        student_merge=torch.from_numpy(s_merge),
        teacher_merge=torch.from_numpy(t_merge),
        policy=policy,
    )
