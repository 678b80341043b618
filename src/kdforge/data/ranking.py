"""Retrieval triples from plain documents: (query, positive) = neighbouring sentences, mined negatives.

With no labelled retrieval data offline, the task is *next-sentence retrieval*: a query is a sentence
of a document, its one relevant passage is the sentence that follows it in the same paragraph, and
every other candidate passage is non-relevant. A bi-encoder must put a sentence close to its
continuation (same speaker, characters, topic) among thousands of sentences of the same prose.

* :func:`split_sentences` — a paragraph into sentences (``. ! ?`` followed by a capital or a quote;
  the titles ``Mr. Mrs. Dr. St.`` do not end a sentence).
* :func:`neighbour_pairs` — non-overlapping consecutive sentence pairs ``(s_0, s_1), (s_2, s_3), ...``
  of each paragraph, both within ``[min_chars, max_chars]`` characters; each sentence belongs to one
  pair only, so no query's positive is another query's text.
* :func:`mine_negatives` — ``k`` negatives per query from a pool of passages: ``"teacher"`` draws
  them from the teacher's top-``top`` passages other than the positive (hard negatives, as dense
  retrievers are trained on), ``"random"`` uniformly.
* :func:`collate_groups` — groups ``{"texts": [q, p, n_1..n_k], "teacher_scores": [1 + k],
  "teacher_embeddings": [2 + k, D]}`` into the batches of :class:`kdforge.train.RankingTask`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdforge.errors import ConfigError, DataError

__all__ = ["NEGATIVE_KINDS", "Pair", "collate_groups", "mine_negatives", "neighbour_pairs", "sample_pairs",
           "split_sentences"]

NEGATIVE_KINDS = ("teacher", "random")

_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])([\"'\u201d\u2019]?)\s+"
                           r"(?=[\"'\u201c\u2018(_]?[A-Z])")


@dataclass(frozen=True)
class Pair:
    """A query and its one relevant passage, with the document they come from."""

    query: str
    positive: str
    document: str


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one (unwrapped) paragraph, whitespace collapsed, closing quotes kept."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.start() + len(m.group(1))
        out.append(text[start:end])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s]


def neighbour_pairs(documents: Mapping[str, str], *, min_chars: int = 40, max_chars: int = 300) -> list[Pair]:
    """Non-overlapping (sentence, next sentence) pairs inside each paragraph (blank-line separated)."""
    if min_chars < 1 or max_chars < min_chars:
        raise ConfigError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}",
                          "e.g. min_chars: 40, max_chars: 300")
    pairs: list[Pair] = []
    for name, text in documents.items():
        for paragraph in re.split(r"\n\s*\n", text):
            sents = split_sentences(paragraph)
            i = 0
            while i + 1 < len(sents):
                a, b = sents[i], sents[i + 1]
                if min_chars <= len(a) <= max_chars and min_chars <= len(b) <= max_chars:
                    pairs.append(Pair(a, b, name))
                    i += 2
                else:
                    i += 1
    return pairs


def sample_pairs(pairs: Sequence[Pair], n: int | None, *, seed: int) -> list[Pair]:
    """``n`` pairs drawn without replacement (all of them, shuffled, when ``n`` is None or larger)."""
    out = list(pairs)
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]


def mine_negatives(scores: torch.Tensor, positives: torch.Tensor, *, kind: str = "teacher", count: int = 1,
                   top: int = 30, seed: int = 0) -> torch.Tensor:
    """Indices ``[Q, count]`` into the passage pool of each query's negatives (never its positive).

    Args:
        scores: ``[Q, N]`` the teacher's scores of every query against every pool passage (used by
            ``"teacher"`` only; its shape gives ``N`` for ``"random"``).
        positives: ``[Q]`` index of each query's positive in the pool.
        kind: ``"teacher"`` (uniform among the teacher's ``top`` best passages other than the
            positive) or ``"random"`` (uniform among all others).
        count: negatives per query, drawn without replacement.
    """
    if kind not in NEGATIVE_KINDS:
        raise ConfigError(f"unknown negative kind {kind!r}", f"use one of {', '.join(NEGATIVE_KINDS)}")
    q, n = scores.shape
    if positives.shape != (q,):
        raise DataError(f"positives has shape {tuple(positives.shape)}, expected ({q},)",
                        "give one positive index per query")
    top = min(top, n - 1)
    if count < 1 or n - 1 < count or (kind == "teacher" and top < count):
        raise ConfigError(f"cannot draw {count} negatives per query from {n - 1} other passages "
                          f"(top {top})", "lower negatives.count or raise negatives.top / the pool size")
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        weights = torch.ones(q, n)
    else:
        masked = scores.float().clone()
        masked[torch.arange(q), positives] = float("-inf")
        weights = torch.zeros(q, n)
        weights.scatter_(1, masked.topk(top, dim=1).indices, 1.0)
    weights[torch.arange(q), positives] = 0.0
    return torch.multinomial(weights, count, replacement=False, generator=g)


def collate_groups(tokenizer: Any, max_length: int) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A collate function: ``B`` groups -> ``input_ids``/``attention_mask`` ``[B * G, L]`` (query,
    positive, negatives of each group in order), ``teacher_scores`` ``[B, 1 + k]`` and
    ``teacher_embeddings`` ``[B * G, D]``."""

    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [t for it in items for t in it["texts"]]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "teacher_scores": torch.stack([it["teacher_scores"] for it in items]),
                "teacher_embeddings": torch.cat([it["teacher_embeddings"] for it in items])}

    return collate
