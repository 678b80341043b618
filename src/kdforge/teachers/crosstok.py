"""Tokenizing one text for two tokenizers: the data side of cross-tokenizer distillation.

The student trains on its own tokens; the teacher must read the *same text* in its own tokens, and
:mod:`kdforge.teachers.alignment` pairs the positions through both tokenizations' character
offsets. Two ways to get there:

* :class:`CrossTokenizerCollator` (the data route, preferred): texts are tokenized by both
  tokenizers once, in the collator (``return_offsets_mapping``), and the batch carries the
  student's ``input_ids``/``attention_mask``/``labels`` plus :data:`TEACHER_KEYS`.
* :func:`retokenize` (the fallback, for batches that hold only the student's ids: an existing
  data pipeline, on-policy samples): each row is decoded with the student tokenizer, re-encoded
  by both with offsets; a row whose re-encoding differs from its ids (a lossy decode) gets no
  teacher positions and is counted in a warning.

:func:`shared_vocabulary` matches the two vocabularies by token string (what the GOLD-style
hybrid loss compares exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["TEACHER_KEYS", "CrossTokenizerCollator", "encode_student", "encode_texts", "retokenize", "shared_vocabulary"]

#: batch keys of the teacher's tokenization and both sides' character offsets
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "student_offsets", "teacher_offsets")


def _require_fast(tokenizer: Any, who: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"the {who} tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: it gives no character offsets",
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True) or wrap a tokenizers.Tokenizer in "
            "PreTrainedTokenizerFast(tokenizer_object=...)",
        )


def shared_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the tokens whose string both vocabularies hold: ``(student_ids [M], teacher_ids [M])``
    in matching order (sorted by teacher id). Strings are compared as stored in the vocabularies
    (byte-level BPE ``Ġthe`` matches ``Ġthe``; a WordPiece ``##ing`` matches nothing in a BPE)."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    pairs = sorted((t_id, s_vocab[tok]) for tok, t_id in t_vocab.items() if tok in s_vocab)
    t_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    s_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
    return s_ids, t_ids


def _pad(rows: Sequence[Sequence[Any]], fill: Any, width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width, *([2] if isinstance(fill, tuple) else [])),
                     0 if isinstance(fill, tuple) else fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(list(row), dtype=dtype)
    return out


def _teacher_side(texts: Sequence[str], teacher_tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = teacher_tokenizer(list(texts), return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    width = max((len(r) for r in ids), default=0)
    pad_id = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    return {
        "teacher_input_ids": _pad(ids, pad_id, width, torch.long),
        "teacher_attention_mask": _pad([[1] * len(r) for r in ids], 0, width, torch.long),
        "teacher_offsets": _pad(offs, (0, 0), width, torch.long),
    }


def encode_texts(texts: Sequence[str], student_tokenizer: Any, teacher_tokenizer: Any, *,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Both tokenizations of ``texts`` (right padding), with offsets and the student's labels.

    The student side is truncated to ``max_length`` tokens; the teacher reads exactly the text
    the student's tokens cover (so both sides end at the same character).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``-100`` at padding) ``[B, T_s]`` and
        :data:`TEACHER_KEYS` (``student_offsets [B, T_s, 2]``, ``teacher_* [B, T_t(, 2)]``).
    """
    _require_fast(student_tokenizer, "student")
    _require_fast(teacher_tokenizer, "teacher")
    batch, covered = encode_student(texts, student_tokenizer, max_length=max_length)
    batch.update(_teacher_side(covered, teacher_tokenizer))
    return batch


def encode_student(texts: Sequence[str], student_tokenizer: Any, *,
                   max_length: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The student's side of :func:`encode_texts`: ``input_ids``, ``attention_mask``, ``labels``,
    ``student_offsets`` ``[B, T_s(, 2)]``, and each text cut to what the (truncated) student
    tokens cover (the text the teacher must read)."""
    _require_fast(student_tokenizer, "student")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("encode_texts takes a list of strings", "pass [text, ...] (one string per example)")
    enc = student_tokenizer(list(texts), return_offsets_mapping=True, truncation=max_length is not None,
                            max_length=max_length)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    covered = [text[: max((e for _, e in off), default=0)] for text, off in zip(texts, offs)]
    width = max((len(r) for r in ids), default=0)
    pad_id = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else 0
    attention = _pad([[1] * len(r) for r in ids], 0, width, torch.long)
    input_ids = _pad(ids, pad_id, width, torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": input_ids.masked_fill(attention == 0, IGNORE_INDEX),
        "student_offsets": _pad(offs, (0, 0), width, torch.long),
    }
    return batch, covered


class CrossTokenizerCollator:
    """``collate_fn`` for cross-tokenizer KD: examples (strings or mappings with ``text_key``) ->
    :func:`encode_texts` of the batch.

    Args:
        student_tokenizer / teacher_tokenizer: fast tokenizers (they give character offsets).
        max_length: the student's sequence length (tokens); None: no truncation.
        text_key: where the text is when examples are mappings.
    """

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, *, max_length: int | None = None,
                 text_key: str = "text") -> None:
        _require_fast(student_tokenizer, "student")
        _require_fast(teacher_tokenizer, "teacher")
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length, self.text_key = max_length, text_key

    def __call__(self, examples: Sequence[str | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [e if isinstance(e, str) else e[self.text_key] for e in examples]
        return encode_texts(texts, self.student_tokenizer, self.teacher_tokenizer, max_length=self.max_length)


def retokenize(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, student_tokenizer: Any,
               teacher_tokenizer: Any) -> dict[str, torch.Tensor]:
    """:data:`TEACHER_KEYS` for a batch that holds only the student's ids (padding on either side).

    Each row's attended ids are decoded (special tokens dropped) and re-encoded by the student
    tokenizer with offsets; special tokens of the row stay in place as zero-width tokens. A row
    whose re-encoding is not its own ids gets no offsets (no teacher position is compared there);
    the count is logged as a warning.
    """
    _require_fast(student_tokenizer, "student")
    _require_fast(teacher_tokenizer, "teacher")
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    special = set(student_tokenizer.all_special_ids)
    s_offsets = torch.zeros(b, t, 2, dtype=torch.long)
    texts: list[str] = []
    lossy = 0
    for row in range(b):  # one decode/encode per example (Rust tokenizers; no loop per token)
        where = torch.nonzero(mask[row].bool()).flatten()
        ids = input_ids[row, where].tolist()
        keep = torch.tensor([i not in special for i in ids], dtype=torch.bool)
        text_ids = [i for i, k in zip(ids, keep.tolist()) if k]
        text = student_tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        enc = student_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != text_ids:
            lossy += 1
            texts.append("")
            continue
        row_off = torch.zeros(len(ids), 2, dtype=torch.long)
        if text_ids:
            row_off[keep] = torch.tensor(enc["offset_mapping"], dtype=torch.long)
        # special tokens: zero-width at the end of the text before them
        ends = torch.cummax(row_off[:, 1], dim=0).values
        row_off[~keep] = ends[~keep][:, None]
        s_offsets[row, where] = row_off
        texts.append(text)
    if lossy:
        log.warning("cross-tokenizer: %d of %d rows do not re-encode to their own ids after decoding; they carry "
                    "no teacher signal (tokenize the texts with CrossTokenizerCollator instead)", lossy, b)
    out = _teacher_side(texts, teacher_tokenizer)
    out["student_offsets"] = s_offsets
    return out
