"""Expansion: the teacher writes new examples from seed examples (self-instruct style).

Each round builds ``per_round`` prompts; each shows ``examples_per_prompt`` examples drawn
(seeded) from the seeds and the examples accepted so far, and asks for a new one (Self-Instruct,
Wang et al. 2023; Alpaca). Every candidate passes three gates (:class:`Deduplicator`):

1. **exact duplicate**: SHA-1 of the normalised text (case, accents, punctuation, spacing);
2. **near duplicate**: MinHash (``datasketch``) over word shingles with an LSH index; a
   candidate whose estimated Jaccard similarity to any kept example reaches
   ``near_dup_threshold`` is rejected;
3. **diversity**: ROUGE-L F1 against every kept example (Self-Instruct keeps instructions with
   ROUGE-L < 0.7 to all others); at or above ``diversity_threshold`` it is rejected.

Rounds continue until ``target`` new examples are accepted or ``max_rounds`` is reached. Every
round is one resumable generation job under ``OUTPUT_DIR/rounds/round-NNN``; the acceptance
pass is a deterministic function of the stored generations, so a killed run resumes exactly.

Output: ``OUTPUT_DIR/expanded.jsonl`` (accepted: ``text``, ``round``, ``source_id``) and
``OUTPUT_DIR/rejected.jsonl`` (``text``, ``reason``, ``similar_to``, ``score``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.elicit.backends.base import Backend
from kdforge.elicit.data import PromptConfig, render_prompt
from kdforge.elicit.engine import GenerationEngine, collect
from kdforge.elicit.labeling import _write_jsonl, normalize
from kdforge.elicit.types import SamplingParams, build_requests
from kdforge.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Here are some examples:\n{examples}\n\nWrite one new example that is different from all of "
    "them. Reply with the new example only."
)


class ExpansionConfig(StrictModel):
    text_field: str = Field("text", description="field of each seed row holding the example")
    target: int = Field(50, ge=1, description="new examples wanted")
    max_rounds: int = Field(10, ge=1)
    per_round: int = Field(8, ge=1, description="prompts per round")
    examples_per_prompt: int = Field(3, ge=1)
    template: str = Field(DEFAULT_TEMPLATE, description="prompt; {examples} is the numbered list")
    near_dup_threshold: float = Field(0.7, gt=0, le=1, description="MinHash Jaccard at which a candidate is a near duplicate")
    diversity_threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L F1 at which a candidate is too similar")
    shingle_size: int = Field(2, ge=1, description="words per MinHash shingle")
    num_perm: int = Field(128, ge=16)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(400, ge=1)
    seed: int = 0


def exact_key(text: str) -> str:
    return hashlib.sha1(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, k: int) -> set[str]:
    words = normalize(text).split()
    if len(words) <= k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts over normalised words (longest common subsequence)."""
    x, y = normalize(a).split(), normalize(b).split()
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y, 1):
            cur.append(prev[j - 1] + 1 if xi == yj else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(y), lcs / len(x)
    return 2 * p * r / (p + r)


class Deduplicator:
    """Keeps a growing set of texts; :meth:`check` says whether a candidate is novel enough.

    Args:
        near_dup_threshold: MinHash-estimated Jaccard (over ``shingle_size``-word shingles)
            at or above which a candidate is a near duplicate.
        diversity_threshold: ROUGE-L F1 at or above which a candidate is too similar.
        num_perm: MinHash permutations (more = more exact estimate, slower).
    """

    def __init__(self, near_dup_threshold: float = 0.7, diversity_threshold: float = 0.7,
                 *, shingle_size: int = 2, num_perm: int = 128, seed: int = 1) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise ConfigError("expansion needs datasketch for near-duplicate detection",
                              "pip install datasketch") from None
        self._MinHash = MinHash
        self.near = near_dup_threshold
        self.div = diversity_threshold
        self.k = shingle_size
        self.num_perm = num_perm
        self.seed = seed
        self.lsh = MinHashLSH(threshold=near_dup_threshold, num_perm=num_perm)
        self.texts: list[str] = []
        self._exact: dict[str, int] = {}
        self._hashes: list[Any] = []

    def _minhash(self, text: str) -> Any:
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed)
        for s in shingles(text, self.k):
            m.update(s.encode("utf-8"))
        return m

    def check(self, text: str) -> tuple[str | None, int | None, float]:
        """(reason or None if novel, index of the most similar kept text, similarity)."""
        key = exact_key(text)
        if key in self._exact:
            return "exact_duplicate", self._exact[key], 1.0
        m = self._minhash(text)
        best_i, best = None, 0.0
        for cand in self.lsh.query(m):
            sim = m.jaccard(self._hashes[cand])
            if sim > best:
                best_i, best = cand, sim
        if best_i is not None and best >= self.near:
            return "near_duplicate", best_i, best
        best_i, best = None, 0.0
        for i, t in enumerate(self.texts):
            sim = rouge_l_f1(text, t)
            if sim > best:
                best_i, best = i, sim
        if best_i is not None and best >= self.div:
            return "too_similar", best_i, best
        return None, best_i, best

    def add(self, text: str) -> int:
        """Keep ``text`` (no check); returns its index."""
        i = len(self.texts)
        m = self._minhash(text)
        self.texts.append(text)
        self._hashes.append(m)
        self._exact.setdefault(exact_key(text), i)
        self.lsh.insert(i, m)
        return i

    def add_if_novel(self, text: str) -> tuple[bool, str | None]:
        reason, _, _ = self.check(text)
        if reason is None:
            self.add(text)
            return True, None
        return False, reason


def clean_candidate(text: str) -> str:
    """Strip list numbering/labels and surrounding quotes; keep the first paragraph."""
    text = text.strip()
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    text = re.sub(r"^\s*(?:\d+[.)]|[-*•]|(?:new\s+)?example\s*\d*\s*[:.])\s*", "", text, flags=re.I)
    return text.strip().strip("\"'“”").strip()


def expand_rows(
    rows: list[dict[str, Any]],
    backend: Backend,
    output_dir: str | Path,
    *,
    expansion: ExpansionConfig,
    prompt: PromptConfig | None = None,
    params: SamplingParams | None = None,
    **engine_kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Grow ``rows`` (the seeds) with teacher-written examples; returns (accepted, summary)."""
    cfg = expansion
    prompt = prompt or PromptConfig()
    params = params or SamplingParams(temperature=1.0, top_p=0.95, max_tokens=128)
    out = Path(output_dir)
    seeds = []
    for r in rows:
        if cfg.text_field not in r:
            raise ConfigError(f"expansion.text_field {cfg.text_field!r} is not a column of the seeds",
                              f"use one of: {', '.join(map(str, r))}")
        seeds.append(str(r[cfg.text_field]))
    dedup = Deduplicator(cfg.near_dup_threshold, cfg.diversity_threshold,
                         shingle_size=cfg.shingle_size, num_perm=cfg.num_perm)
    for s in seeds:
        if dedup.check(s)[0] != "exact_duplicate":
            dedup.add(s)
    n_seed_kept = len(dedup.texts)
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    rng = random.Random(cfg.seed)
    gen_summaries = []
    for rnd in range(cfg.max_rounds):
        if len(accepted) >= cfg.target:
            break
        pool = list(dedup.texts)
        prompts = []
        for _ in range(cfg.per_round):
            shown = rng.sample(pool, min(cfg.examples_per_prompt, len(pool)))
            examples = "\n".join(f"{i}. {t}" for i, t in enumerate(shown, 1))
            prompts.append(render_prompt({"examples": examples}, prompt, cfg.template))
        reqs = build_requests(prompts, params, namespace=f"expand-round-{rnd}")
        rdir = out / "rounds" / f"round-{rnd:03d}"
        summary = GenerationEngine(backend, rdir, **engine_kwargs).run(reqs)
        gen_summaries.append(summary.to_dict())
        for rec in collect(rdir, reqs):
            if len(accepted) >= cfg.target:
                break
            text = clean_candidate(rec["text"])
            nwords = len(text.split())
            if nwords < cfg.min_words or nwords > cfg.max_words:
                rejected.append({"text": text, "reason": "length", "round": rnd, "source_id": rec["id"]})
                continue
            reason, sim_i, score = dedup.check(text)
            if reason is None:
                dedup.add(text)
                accepted.append({"text": text, "round": rnd, "source_id": rec["id"]})
            else:
                rejected.append({"text": text, "reason": reason, "round": rnd, "source_id": rec["id"],
                                 "similar_to": dedup.texts[sim_i] if sim_i is not None else None,
                                 "score": round(score, 4)})
        log.info("round %d: %d accepted so far, %d rejected", rnd, len(accepted), len(rejected))
    _write_jsonl(out / "expanded.jsonl", accepted)
    _write_jsonl(out / "rejected.jsonl", rejected)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    result = {
        "task": "expand", "seeds": len(seeds), "seeds_kept": n_seed_kept,
        "accepted": len(accepted), "rejected": len(rejected), "rejected_by_reason": reasons,
        "rounds": len(gen_summaries), "target_reached": len(accepted) >= cfg.target,
        "generation": {
            "generated": sum(s["generated"] for s in gen_summaries),
            "skipped": sum(s["skipped"] for s in gen_summaries),
            "failed": sum(s["failed"] for s in gen_summaries),
            "completion_tokens": sum(s["completion_tokens"] for s in gen_summaries),
        },
    }
    return accepted, result
