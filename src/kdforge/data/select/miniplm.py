"""MiniPLM difference sampling (Gu et al., 2024): refine a corpus with the teacher's knowledge.

Each document ``x`` gets the score

    s(x) = (1/n_T) log p_teacher(x) - (1/n_R) log p_reference(x)

(per-token averages; ``n_T``/``n_R`` are the tokens each model predicts, so the two models may use
different tokenizers: only the text is shared). The reference is a small model of the teacher's
family or one trained on the same data. A high score marks text the large teacher has learned
and the small reference has not: harder, more diverse, more teacher-specific knowledge. The
refined corpus keeps the top ``fraction`` by score (``mode="top"``, the paper's difference
sampling) or samples that many documents without replacement with probability proportional to
``exp(s / temperature)`` (``mode="sample"``; Gumbel-top-k, seeded).

The scoring pass is offline and runs once, batched, in chunks of ``chunk_size`` documents: each
chunk's scores are written atomically (:mod:`kdforge.io`) and listed in ``scores/manifest.json``
after it, so a killed pass resumes at the first missing chunk and gives the same scores as an
uninterrupted one (batches never cross chunks). The manifest records both models' identities and
the corpus fingerprint; a folder scored with other models or text is refused (or replaced with
``overwrite=True``).

Output folder::

    scores/manifest.json, scores/chunk-00000.jsonl ...   # the resumable pass
    scores.jsonl        # one line per document: index, both log-probs and token counts, score, kept
    dataset/            # the refined corpus, datasets.save_to_disk (text + miniplm_score [+ columns])
    selection.json      # settings and summary (kept count, score quantiles)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdforge.data.select.scorer import DocumentScorer
from kdforge.errors import CacheError, ConfigError, DataError
from kdforge.io import atomic_write, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["DocumentScore", "MiniPLMResult", "miniplm_select", "read_scores", "score_documents",
           "select_indices"]

FORMAT = "kdforge-miniplm-scores"
VERSION = 1


@dataclass(frozen=True)
class DocumentScore:
    """One document's scores (log-probs are sums over the model's own predicted tokens)."""

    index: int
    teacher_logprob: float
    teacher_tokens: int
    reference_logprob: float
    reference_tokens: int

    @property
    def score(self) -> float:
        """``teacher_logprob / teacher_tokens - reference_logprob / reference_tokens``; ``-inf``
        for a document too short for either model to predict a token (never kept first)."""
        if self.teacher_tokens == 0 or self.reference_tokens == 0:
            return -math.inf
        return self.teacher_logprob / self.teacher_tokens - self.reference_logprob / self.reference_tokens

    def to_json(self) -> dict[str, Any]:
        s = self.score
        return {"index": self.index, "teacher_logprob": self.teacher_logprob, "teacher_tokens": self.teacher_tokens,
                "reference_logprob": self.reference_logprob, "reference_tokens": self.reference_tokens,
                "score": s if math.isfinite(s) else None}


@dataclass(frozen=True)
class MiniPLMResult:
    """What :func:`miniplm_select` wrote and kept."""

    out_dir: Path
    scores: list[DocumentScore]
    kept: list[int]

    @property
    def dataset_dir(self) -> Path:
        return self.out_dir / "dataset"


def corpus_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 over the documents (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _chunk_name(i: int) -> str:
    return f"chunk-{i:05d}.jsonl"


def score_documents(texts: Sequence[str], teacher: DocumentScorer, reference: DocumentScorer,
                    out_dir: str | Path, *, chunk_size: int = 256, overwrite: bool = False) -> list[DocumentScore]:
    """Score every document with both models, resumably (see the module docstring).

    Args:
        texts: the documents.
        teacher, reference: :class:`~kdforge.data.select.scorer.DocumentScorer` s (e.g.
            :class:`~kdforge.data.select.scorer.CausalLMScorer`).
        out_dir: the scores go to ``out_dir/scores/``; an unfinished pass there is resumed.
        chunk_size: documents per chunk file (the resume granularity).
        overwrite: replace scores made with other models/text/settings instead of failing.

    Returns:
        one :class:`DocumentScore` per document, in corpus order.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}", "use e.g. 256")
    if not texts:
        raise DataError("the corpus to score is empty", "pass at least one document")
    folder = Path(out_dir) / "scores"
    header = {
        "format": FORMAT, "version": VERSION, "teacher": teacher.identity(), "reference": reference.identity(),
        "corpus": {"fingerprint": corpus_fingerprint(texts), "num_documents": len(texts)},
        "chunk_size": int(chunk_size), "chunks": [], "complete": False,
    }
    manifest = _resume_or_start(folder, header, overwrite)
    n_chunks = -(-len(texts) // chunk_size)
    done = {c["index"] for c in manifest["chunks"]}
    if done:
        log.info("resuming MiniPLM scoring: %d of %d chunks done", len(done), n_chunks)
    for c in range(n_chunks):
        if c in done:
            continue
        start, end = c * chunk_size, min((c + 1) * chunk_size, len(texts))
        part = texts[start:end]
        t_scores, r_scores = teacher(part), reference(part)
        if len(t_scores) != len(part) or len(r_scores) != len(part):
            raise ConfigError(f"a scorer returned {len(t_scores)}/{len(r_scores)} scores for {len(part)} documents",
                              "return one (sum_logprob, num_tokens) pair per document")
        lines = [DocumentScore(start + i, float(t[0]), int(t[1]), float(r[0]), int(r[1])).to_json()
                 for i, (t, r) in enumerate(zip(t_scores, r_scores))]
        name = _chunk_name(c)
        with atomic_write(folder / name, "w") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)
        manifest["chunks"] = sorted([*manifest["chunks"], {"index": c, "file": name, "rows": [start, end],
                                                           "sha256": sha256_file(folder / name)}],
                                    key=lambda e: e["index"])
        manifest["complete"] = len(manifest["chunks"]) == n_chunks
        write_json_atomic(folder / "manifest.json", manifest)
        log.info("MiniPLM scores: chunk %d/%d (%d documents)", c + 1, n_chunks, end - start)
    return read_scores(out_dir)


def _resume_or_start(folder: Path, header: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    path = folder / "manifest.json"
    if not path.exists():
        for f in folder.glob("chunk-*.jsonl"):
            f.unlink()
        return header
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    keys = ("format", "version", "teacher", "reference", "corpus", "chunk_size")
    diff = ["manifest"] if old is None else [k for k in keys if old.get(k) != header[k]]
    if diff:
        if not overwrite:
            raise CacheError(f"{folder} holds MiniPLM scores made with other settings (differs in: {', '.join(diff)})",
                             "choose another output folder, or pass overwrite=True (--overwrite) to rescore")
        log.warning("rescoring %s (differs in: %s)", folder, ", ".join(diff))
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return header
    kept = [c for c in old.get("chunks", []) if (folder / c["file"]).is_file()
            and sha256_file(folder / c["file"]) == c["sha256"]]
    if len(kept) != len(old.get("chunks", [])):
        log.warning("%d damaged or missing score chunks in %s will be recomputed",
                    len(old["chunks"]) - len(kept), folder)
    header["chunks"] = kept
    header["complete"] = bool(old.get("complete")) and len(kept) == len(old["chunks"])
    listed = {c["file"] for c in kept}
    for f in folder.glob("chunk-*.jsonl"):
        if f.name not in listed:
            f.unlink()
    return header


def read_scores(out_dir: str | Path) -> list[DocumentScore]:
    """The scores of a finished pass, in corpus order."""
    folder = Path(out_dir) / "scores"
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CacheError(f"{folder} holds no readable MiniPLM score manifest",
                         "run the scoring pass (kdforge select --method miniplm) first") from None
    if not manifest.get("complete"):
        raise CacheError(f"the MiniPLM scoring pass in {folder} is unfinished",
                         "run the same command again: it resumes at the first missing chunk")
    out: list[DocumentScore] = []
    for chunk in manifest["chunks"]:
        for line in (folder / chunk["file"]).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            out.append(DocumentScore(r["index"], r["teacher_logprob"], r["teacher_tokens"],
                                     r["reference_logprob"], r["reference_tokens"]))
    return out


def select_indices(scores: Sequence[float], fraction: float, *, mode: Literal["top", "sample"] = "top",
                   temperature: float = 1.0, seed: int = 0) -> list[int]:
    """Indices of the kept documents, ascending.

    ``k = round(fraction * N)`` (at least 1). ``top``: the ``k`` highest scores (ties: lower
    index first). ``sample``: ``k`` draws without replacement with ``P ∝ exp(score/temperature)``,
    as Gumbel-top-k: ``argtopk(score/temperature + Gumbel(seed))``. Non-finite scores rank last.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}", "e.g. 0.5 keeps half the documents")
    if mode not in ("top", "sample"):
        raise ConfigError(f"unknown selection mode {mode!r}", "use 'top' or 'sample'")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}", "e.g. 1.0")
    s = np.asarray(scores, dtype=np.float64)
    k = max(1, int(round(fraction * len(s))))
    key = np.where(np.isfinite(s), s, -np.inf)
    if mode == "sample":
        gumbel = np.random.default_rng(seed).gumbel(size=len(s))
        key = np.where(np.isfinite(key), key / temperature + gumbel, -np.inf)
    order = np.lexsort((np.arange(len(s)), -key))  # descending key, then ascending index
    return sorted(int(i) for i in order[:k])


def miniplm_select(documents: Sequence[str] | Any, teacher: DocumentScorer, reference: DocumentScorer,
                   out_dir: str | Path, *, fraction: float = 0.5, mode: Literal["top", "sample"] = "top",
                   temperature: float = 1.0, seed: int = 0, text_field: str = "text", chunk_size: int = 256,
                   overwrite: bool = False) -> MiniPLMResult:
    """Score ``documents`` (resumably), keep a ``fraction`` and write the refined dataset.

    Args:
        documents: a list of texts, or a ``datasets.Dataset`` (its other columns are kept).
        teacher, reference: document scorers (:class:`~kdforge.data.select.scorer.CausalLMScorer`).
        out_dir: output folder (layout in the module docstring).
        fraction, mode, temperature, seed: see :func:`select_indices`.
        text_field: the text column of a ``datasets.Dataset``.
        chunk_size, overwrite: see :func:`score_documents`.
    """
    from datasets import Dataset

    out = Path(out_dir)
    if isinstance(documents, Dataset):
        if text_field not in documents.column_names:
            raise DataError(f"the dataset has columns {documents.column_names}, no {text_field!r}",
                            "set text_field to its text column")
        texts, base = [str(t) for t in documents[text_field]], documents
        if "miniplm_score" in base.column_names:  # refining an already refined set
            base = base.remove_columns("miniplm_score")
    else:
        texts = [str(t) for t in documents]
        base = Dataset.from_dict({text_field: texts})
    scores = score_documents(texts, teacher, reference, out, chunk_size=chunk_size, overwrite=overwrite)
    values = [d.score for d in scores]
    kept = select_indices(values, fraction, mode=mode, temperature=temperature, seed=seed)
    kept_set = set(kept)
    with atomic_write(out / "scores.jsonl", "w") as fh:
        for d in scores:
            fh.write(json.dumps({**d.to_json(), "kept": d.index in kept_set}) + "\n")
    refined = base.select(kept).add_column("miniplm_score", [values[i] for i in kept])
    _save_dataset_atomic(refined, out / "dataset")
    finite = np.array([v for v in values if math.isfinite(v)])
    write_json_atomic(out / "selection.json", {
        "method": "miniplm", "fraction": fraction, "mode": mode, "temperature": temperature, "seed": seed,
        "num_documents": len(texts), "num_kept": len(kept),
        "score_quantiles": {q: float(np.quantile(finite, float(q))) for q in ("0.0", "0.25", "0.5", "0.75", "1.0")}
        if finite.size else {},
        "kept_score_min": min((values[i] for i in kept), default=None),
    })
    log.info("MiniPLM: kept %d of %d documents in %s", len(kept), len(texts), out / "dataset")
    return MiniPLMResult(out, scores, kept)


def _save_dataset_atomic(dataset: Any, target: Path) -> None:
    """``save_to_disk`` into a temporary sibling, then swap it in (a crash leaves the old one)."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
