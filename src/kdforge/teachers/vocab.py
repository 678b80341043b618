"""Vocabulary checks between teacher and student (and between a cache and its users).

Logit distillation compares distributions over the *same* token ids, so teacher and student must
share a tokenizer. Two cases are common and handled differently:

* **Same tokenizer, padded embeddings.** Model families pad the embedding matrix to a multiple of
  64/128 (Qwen2.5: 151,936 rows in small models, 152,064 in large ones, for a 151,665-token
  tokenizer). The extra rows are never real tokens, so both logit tensors are sliced to the shared
  tokenizer size (:class:`VocabAlignment.apply`); a notice is logged once.
* **Different tokenizers** (e.g. Llama vs Gemma). Ids mean different strings; slicing would
  silently pair unrelated tokens. :func:`check_vocab` raises
  :class:`~kdforge.errors.VocabMismatchError` that points to kdforge's cross-tokenizer
  distillation: :class:`~kdforge.teachers.sources.CrossTokenizerTeacher` (positions aligned by
  character offsets) with the vocabulary-free losses ``uld`` / ``gold`` (docs/cross-tokenizer.md).

:func:`tokenizer_fingerprint` hashes everything that decides token -> id (vocabulary, BPE merges,
added/special tokens); teacher caches record it so a cache is never replayed under another
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from kdforge.errors import ConfigError, ShapeError, VocabMismatchError

log = logging.getLogger(__name__)

_CROSS_TOKENIZER_FIX = (
    "distill with the same tokenizer (pick a student from the teacher's family), or use cross-tokenizer "
    "distillation: wrap the teacher in kdforge.teachers.CrossTokenizerTeacher(teacher, teacher_tokenizer, "
    "student_tokenizer), set vocab_policy: cross_tokenizer and use the loss uld or gold "
    "(docs/cross-tokenizer.md)"
)
_CROSS_TOKENIZER_LIVE = (
    "distil from the live teacher wrapped in kdforge.teachers.CrossTokenizerTeacher with the loss uld or gold "
    "(a top-k cache stores no token offsets yet; docs/cross-tokenizer.md)"
)


def _vocab(tokenizer: Any) -> dict[str, int]:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise ShapeError(
            f"{type(tokenizer).__name__} has no get_vocab(); cannot compare vocabularies",
            "pass a Hugging Face tokenizer (AutoTokenizer.from_pretrained) or a tokenizers.Tokenizer",
        )
    return dict(get_vocab())


def tokenizer_size(tokenizer: Any) -> int:
    """Number of token ids the tokenizer can produce (``max id + 1``, added tokens included)."""
    vocab = _vocab(tokenizer)
    return max(vocab.values()) + 1 if vocab else 0


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over the token -> id map, BPE merges and special tokens of ``tokenizer``.

    Works for ``transformers`` tokenizers (fast or slow) and raw ``tokenizers.Tokenizer``.
    Settings that do not change ids (padding side, max length) are not included.
    """
    return tokenizer_identity(tokenizer)[0]


def tokenizer_identity(tokenizer: Any) -> tuple[str, int]:
    """``(tokenizer_fingerprint(tokenizer), tokenizer_size(tokenizer))`` reading the vocabulary
    once (``get_vocab`` of a 49k-token tokenizer is ~20 ms; the teacher-cache build needs both)."""
    vocab = _vocab(tokenizer)
    return _fingerprint(tokenizer, vocab), (max(vocab.values()) + 1 if vocab else 0)


def _fingerprint(tokenizer: Any, vocab: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer  # a raw tokenizers.Tokenizer
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        h.update(json.dumps(model.get("merges"), ensure_ascii=False).encode())
        added = [(t.get("id"), t.get("content"), t.get("special")) for t in spec.get("added_tokens") or []]
        h.update(json.dumps(sorted(added, key=lambda x: (x[0] is None, x[0])), ensure_ascii=False).encode())
    specials = getattr(tokenizer, "all_special_tokens", None)
    if specials:
        h.update(json.dumps(sorted(specials), ensure_ascii=False).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class VocabAlignment:
    """How to bring teacher and student logits onto the same vocabulary.

    Attributes:
        shared_size: number of leading vocabulary entries both sides keep.
        teacher_size: teacher logits width before slicing.
        student_size: student logits width before slicing.
    """

    shared_size: int
    teacher_size: int
    student_size: int

    @property
    def needs_slicing(self) -> bool:
        return self.teacher_size != self.shared_size or self.student_size != self.shared_size

    def apply(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice ``[..., V_s]`` and ``[..., V_t]`` logits to ``[..., shared_size]`` (views, no copy)."""
        return (
            slice_logits(student_logits, self.shared_size),
            slice_logits(teacher_logits, self.shared_size),
        )


def slice_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``logits[..., :size]``, checking that ``logits`` has at least ``size`` entries."""
    if logits.shape[-1] < size:
        raise ShapeError(
            f"logits have {logits.shape[-1]} vocabulary entries, fewer than the shared size {size}",
            "check that teacher and student use the same tokenizer",
        )
    return logits[..., :size] if logits.shape[-1] != size else logits


def check_vocab(
    teacher_size: int,
    student_size: int,
    *,
    teacher_tokenizer: Any = None,
    student_tokenizer: Any = None,
    cross_tokenizer_fix: str | None = None,
) -> VocabAlignment:
    """Decide whether teacher and student logits can be compared, and over how many entries.

    Args:
        teacher_size: width of the teacher's logits (embedding rows, possibly padded).
        student_size: width of the student's logits.
        teacher_tokenizer / student_tokenizer: the tokenizers (one is enough when both models
            use it). Without any tokenizer, only equal sizes are accepted.
        cross_tokenizer_fix: the fix named when the tokenizers differ (default: the Python
            cross-tokenizer path; a recipe names its own, e.g. ``cross_tokenizer_kd``).

    Returns:
        :class:`VocabAlignment`; ``shared_size`` = the tokenizer size when the logits are padded
        beyond it (a notice is logged), else the common width.

    Raises:
        VocabMismatchError: the tokenizers map tokens to different ids (cross-tokenizer KD
            needed), or the sizes differ and no tokenizer tells which entries are real.
    """
    tok_t, tok_s = teacher_tokenizer, student_tokenizer
    if tok_t is None and tok_s is None:
        if teacher_size != student_size:
            raise VocabMismatchError(
                f"teacher logits have {teacher_size} entries and student logits {student_size}; "
                "without the tokenizers kdforge cannot tell padding from different vocabularies",
                "pass teacher_tokenizer/student_tokenizer (same-family padded embeddings are then "
                "sliced to the tokenizer size); if the tokenizers differ, " + _CROSS_TOKENIZER_FIX,
            )
        return VocabAlignment(teacher_size, teacher_size, student_size)

    if tok_t is not None and tok_s is not None and tokenizer_fingerprint(tok_t) != tokenizer_fingerprint(tok_s):
        vt, vs = _vocab(tok_t), _vocab(tok_s)
        overlap = min(max(vt.values(), default=-1), max(vs.values(), default=-1)) + 1
        inv_t = {i: t for t, i in vt.items() if i < overlap}
        inv_s = {i: t for t, i in vs.items() if i < overlap}
        differing = [i for i in range(overlap) if inv_t.get(i) != inv_s.get(i)]
        if differing or overlap == 0:
            example = ""
            if differing:
                i = differing[0]
                example = f" (e.g. id {i} is {inv_t.get(i)!r} for the teacher, {inv_s.get(i)!r} for the student)"
            raise VocabMismatchError(
                f"teacher and student tokenizers differ: {len(differing)} of {overlap} shared ids "
                f"map to different tokens{example}; logit distillation over token ids would pair "
                "unrelated tokens",
                cross_tokenizer_fix or _CROSS_TOKENIZER_FIX,
            )
        tok_size = overlap  # one tokenizer extends the other (e.g. extra chat tokens)
        log.info(
            "teacher and student tokenizers agree on the first %d ids and differ only in extra "
            "tokens; distilling over the shared %d ids",
            overlap,
            overlap,
        )
    else:
        tok_size = tokenizer_size(tok_t if tok_t is not None else tok_s)

    shared = min(teacher_size, student_size)
    if tok_size < shared:
        shared = tok_size
    elif tok_size > shared:
        raise VocabMismatchError(
            f"the tokenizer has {tok_size} ids but the {'teacher' if teacher_size < student_size else 'student'} "
            f"logits only {min(teacher_size, student_size)}; some real tokens have no logit",
            "resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)))",
        )
    if shared != teacher_size or shared != student_size:
        log.info(
            "vocabulary sizes differ (teacher %d, student %d) but the tokenizer is shared: slicing "
            "both logits to the %d tokenizer entries (embedding padding rows dropped)",
            teacher_size,
            student_size,
            shared,
        )
    return VocabAlignment(shared, teacher_size, student_size)


#: named ways to bring a teacher signal onto the student's vocabulary (see :func:`align_signal`)
VOCAB_POLICIES = ("exact", "shared_prefix", "cross_tokenizer")


def align_signal(
    signal: Any,
    *,
    vocab_size: int,
    positions: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    policy: str = "exact",
    validate: bool = True,
) -> tuple[Any, int | None]:
    """Bring a :class:`~kdforge.teachers.signal.TeacherSignal` onto the student's vocabulary and device.

    The one vocabulary transform of the trainer, with a named policy:

    * ``"exact"`` (default): dense teacher logits must have the student's width ``vocab_size``
      (else :class:`~kdforge.errors.VocabMismatchError`); sparse ids must index into it.
    * ``"shared_prefix"``: same tokenizer, padded embeddings (a family pads its matrices to a
      multiple of 64/128): both sides keep the first ``min(V_teacher, V_student)`` entries. The
      caller slices the student side to the returned size.
    * ``"cross_tokenizer"``: different tokenizers. The signal must come from a
      :class:`~kdforge.teachers.sources.CrossTokenizerTeacher` (a ``cross`` signal: teacher logits
      already gathered onto the student's positions by character offsets, any width); it is moved
      to ``device``/``dtype`` and handed to the vocabulary-free losses (``uld``, ``gold``). A
      ``cross`` signal is accepted under every policy (the source is the explicit choice); this
      policy refuses any other signal.

    Dense logits are cast to the student's ``dtype`` and moved to ``device``; a sparse signal
    with ``vocab_size`` 0 ("the student's", a cache) gets the student's. ``validate`` runs the
    checks that read values (ids within the vocabulary) — the trainer asks for them on the first
    batch and when the batch layout changes.

    An ensemble's ``members`` (for ``per_teacher`` terms) are aligned alike.

    Returns:
        ``(aligned signal, student width to slice to or None)``.
    """
    from dataclasses import replace

    members = getattr(signal, "members", None)
    aligned, student_slice = _align_one(signal, vocab_size=vocab_size, positions=positions, device=device,
                                        dtype=dtype, policy=policy, validate=validate)
    if members:
        done = tuple(_align_one(m, vocab_size=vocab_size, positions=positions, device=device, dtype=dtype,
                                policy=policy, validate=validate)[0] for m in members)
        aligned = replace(aligned, members=done)
    return aligned, student_slice


def _align_one(signal: Any, *, vocab_size: int, positions: tuple[int, ...], device: torch.device,
               dtype: torch.dtype, policy: str, validate: bool) -> tuple[Any, int | None]:
    """:func:`align_signal` of one signal (its members aside)."""
    from dataclasses import replace

    from kdforge.losses.signal import SparseTeacher

    if policy not in VOCAB_POLICIES:
        raise ConfigError(f"unknown vocab_policy {policy!r}", f"use one of: {', '.join(VOCAB_POLICIES)}")
    student_slice: int | None = None
    cross = getattr(signal, "cross", None)
    if cross is not None:
        if tuple(cross.logits.shape[:-1]) != tuple(positions):
            raise ShapeError(
                f"cross-tokenizer teacher logits {tuple(cross.logits.shape)} are not at the student's positions "
                f"{tuple(positions)}",
                "use CausalLMTask with CrossTokenizerTeacher (it gathers the teacher onto the student's positions)",
            )
        return replace(signal, cross=cross.to(device, dtype)), None
    if policy == "cross_tokenizer":
        raise ConfigError(
            f"vocab_policy cross_tokenizer needs a cross-tokenizer teacher signal, got a {signal.kind} one "
            "(the teacher's positions are its own tokens, not the student's)",
            "wrap the teacher: kdforge.teachers.CrossTokenizerTeacher(teacher, teacher_tokenizer, student_tokenizer)",
        )
    if signal.logits is not None:
        t = signal.logits
        if tuple(t.shape[:-1]) != tuple(positions):
            raise ShapeError(
                f"teacher logits {tuple(t.shape)} do not line up with the student's positions {tuple(positions)}",
                "feed teacher and student the same batch (same padding and length)",
            )
        width = t.shape[-1]
        if width != vocab_size:
            if policy != "shared_prefix":
                raise VocabMismatchError(
                    f"teacher has {width} output classes/tokens, student has {vocab_size}",
                    "use a student with the teacher's vocabulary (same tokenizer); for a shared tokenizer with "
                    "padded embeddings set vocab_policy: shared_prefix; for different tokenizers, "
                    + _CROSS_TOKENIZER_FIX,
                )
            shared = min(width, vocab_size)
            t = t[..., :shared]
            student_slice = shared if vocab_size != shared else None
        return replace(signal, logits=t.to(device=device, dtype=dtype), weights=_to(signal.weights, device)), student_slice
    if signal.sparse is not None:
        sp = signal.sparse
        if validate and sp.ids.numel():
            top = int(sp.ids.max().item())
            if top >= vocab_size:
                raise VocabMismatchError(
                    f"teacher token id {top} is outside the student's vocabulary of {vocab_size}",
                    "build the cache with the student's tokenizer, or use a student with the teacher's vocabulary; "
                    "for a teacher with another tokenizer, " + _CROSS_TOKENIZER_LIVE,
                )
        vocab = vocab_size if sp.vocab_size in (0, vocab_size) or policy == "shared_prefix" else sp.vocab_size
        if vocab != vocab_size:
            raise VocabMismatchError(
                f"the sparse teacher signal indexes a vocabulary of {sp.vocab_size}, the student has {vocab_size}",
                "use a student with the teacher's vocabulary, or set vocab_policy: shared_prefix for a padded one; "
                "for a teacher with another tokenizer, " + _CROSS_TOKENIZER_LIVE,
            )
        aligned = SparseTeacher(sp.ids.to(device).long(), sp.logprobs.to(device).float(), vocab, num_exact=sp.num_exact)
        return replace(signal, sparse=aligned, weights=_to(signal.weights, device)), None
    return signal, None


def _to(weights: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A signal's per-position ``weights`` on the student's device (they travel with the distribution)."""
    return None if weights is None else weights.to(device)
