"""Teacher labeling: label unlabeled rows with a prompt and a closed answer set.

For each row the teacher is asked ``n`` times (``sampling.n``); each answer is parsed into one
of the allowed labels (:func:`parse_label`: normalised, aliases such as ``positive -> fresh``,
the earliest label word in the answer wins; unparseable answers count as abstentions). The
stored label is the majority vote with its *agreement* (share of valid votes for the winner)
as a confidence (self-consistency, Wang et al. 2022, "Self-Consistency Improves Chain of
Thought Reasoning in Language Models").

With a local backend, ``score_loglik: true`` also scores every label by the teacher's
log-likelihood ``log p(verbalizer | prompt)`` (verbalizer: ``" " + label`` unless
``verbalizers`` maps the label to the word the prompt asks for) and stores the softmax over labels
(``label_probs``) -- a soft label usable directly as a KD target, independent of sampling
noise (the "verbalizer" scoring used by lm-eval-harness style multiple choice). With
``calibrate: true`` the scores are also contextually calibrated (Zhao et al. 2021): the label
prior that the prompt alone induces, measured on a content-free input (``"N/A"``), is
subtracted in log space (``label_probs_calibrated``).

Output ``OUTPUT_DIR/labels.jsonl``: one object per row: ``row`` (the input), ``label``,
``agreement``, ``votes``, ``n_valid``, ``samples`` (raw answers) and, if requested,
``label_probs`` / ``loglik_label`` and ``gold`` / ``correct``.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from kdforge.config import StrictModel
from kdforge.elicit.backends.base import Backend
from kdforge.elicit.data import PromptConfig, render_prompt
from kdforge.elicit.engine import GenerationEngine, collect
from kdforge.elicit.types import SamplingParams, build_requests
from kdforge.errors import ConfigError
from kdforge.io import atomic_write

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{text}\n\nAnswer with exactly one word, one of: {labels}."


class LabelingConfig(StrictModel):
    labels: list[str] = Field(min_length=2, description="the allowed labels, e.g. [fresh, rotten]")
    aliases: dict[str, list[str]] = Field(default_factory=dict, description="label -> other words meaning it")
    template: str = Field(DEFAULT_TEMPLATE, description="prompt; row fields plus {labels}")
    text_field: str = "text"
    gold_field: str | None = Field(None, description="column with a reference label, for accuracy")
    score_loglik: bool = Field(False, description="also score each label by log-likelihood (local backend)")
    calibrate: bool = Field(
        False, description="contextual calibration of the log-likelihood scores with a content-free input")
    content_free: str = Field("N/A", description="the content-free text used by calibrate")
    verbalizers: dict[str, str] = Field(
        default_factory=dict,
        description="label -> text scored for it (default ' ' + label); match the prompt's wording")

    @model_validator(mode="after")
    def _verbalizers_known(self) -> LabelingConfig:
        unknown = set(self.verbalizers) - set(self.labels)
        if unknown:
            raise ValueError(f"verbalizers for unknown labels: {sorted(unknown)}")
        return self

    @field_validator("labels")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len({normalize(x) for x in v}) != len(v):
            raise ValueError("labels must be distinct after lower-casing")
        return v


def normalize(text: str) -> str:
    """Lower-case, strip accents and punctuation, collapse whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def parse_label(text: str, labels: list[str], aliases: dict[str, list[str]] | None = None) -> str | None:
    """Map a free-text answer to one of ``labels`` (or ``None``).

    The answer is normalised (:func:`normalize`); every label and alias is searched as a whole
    word/phrase; the one that occurs *earliest* wins (``"Fresh, not rotten"`` -> ``fresh``).
    """
    norm = f" {normalize(text)} "
    best: tuple[int, int, str] | None = None
    for label in labels:
        for word in [label, *(aliases or {}).get(label, [])]:
            w = normalize(word)
            if not w:
                continue
            pos = norm.find(f" {w} ")
            if pos >= 0 and (best is None or (pos, -len(w)) < best[:2]):
                best = (pos, -len(w), label)
    return best[2] if best else None


def aggregate_votes(answers: list[str | None]) -> dict[str, Any]:
    """Majority vote over parsed answers (``None`` = abstention).

    Returns ``label`` (``None`` if no valid answer; ties go to the label seen first),
    ``agreement`` = votes(label) / valid votes, ``votes`` (label -> count), ``n_valid``.
    """
    valid = [a for a in answers if a is not None]
    counts = Counter(valid)
    if not valid:
        return {"label": None, "agreement": 0.0, "votes": {}, "n_valid": 0}
    top = max(counts.values())
    label = next(a for a in valid if counts[a] == top)  # first seen among the tied
    return {"label": label, "agreement": top / len(valid), "votes": dict(counts), "n_valid": len(valid)}


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def label_rows(
    rows: list[dict[str, Any]],
    backend: Backend,
    output_dir: str | Path,
    *,
    labeling: LabelingConfig,
    prompt: PromptConfig | None = None,
    params: SamplingParams | None = None,
    id_field: str | None = None,
    **engine_kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Label ``rows`` with the teacher; writes ``labels.jsonl``; returns (labeled rows, summary)."""
    prompt = prompt or PromptConfig()
    params = params or SamplingParams(n=1, temperature=0.0, max_tokens=8)
    out = Path(output_dir)
    label_list = ", ".join(labeling.labels)
    prompts = []
    for r in rows:
        if labeling.text_field not in r:
            raise ConfigError(f"labeling.text_field {labeling.text_field!r} is not a column of the data",
                              f"use one of: {', '.join(map(str, r))}")
        prompts.append(render_prompt({**r, "labels": label_list}, prompt, labeling.template))
    ids = [str(r[id_field]) for r in rows] if id_field else None
    reqs = build_requests(prompts, params, ids=ids, namespace="label")
    summary = GenerationEngine(backend, out / "generations", **engine_kwargs).run(reqs)
    by_id = {rec["id"]: rec for rec in collect(out / "generations", reqs)}
    scores: list[list[float]] | None = None
    if labeling.score_loglik:
        verbalizers = [labeling.verbalizers.get(lab, " " + lab) for lab in labeling.labels]
        many = getattr(backend, "score_many", None)
        scores = (many(prompts, verbalizers) if many is not None
                  else [backend.score_continuations(p, verbalizers) for p in prompts])
        if labeling.calibrate:
            # Zhao et al. 2021 ("Calibrate Before Use"): the label prior the prompt alone induces,
            # measured on a content-free input, is divided out: log p(y|x) - log p(y|"N/A").
            free = render_prompt({**rows[0], labeling.text_field: labeling.content_free, "labels": label_list},
                                 prompt, labeling.template)
            prior = backend.score_continuations(free, verbalizers)
            calibrated = [[a - b for a, b in zip(row, prior, strict=True)] for row in scores]
    labeled = []
    for j, r in enumerate(rows):
        samples = [by_id.get(q.id, {}).get("text") for q in reqs[j * params.n:(j + 1) * params.n]]
        answers = [parse_label(s, labeling.labels, labeling.aliases) if s is not None else None for s in samples]
        item: dict[str, Any] = {"row": r, **aggregate_votes(answers), "samples": samples}
        if scores is not None:
            lls = scores[j]
            item["loglik"] = dict(zip(labeling.labels, lls, strict=True))
            item["label_probs"] = dict(zip(labeling.labels, softmax(lls), strict=True))
            item["loglik_label"] = labeling.labels[max(range(len(lls)), key=lls.__getitem__)]
            if labeling.calibrate:
                cal = calibrated[j]
                item["label_probs_calibrated"] = dict(zip(labeling.labels, softmax(cal), strict=True))
                item["calibrated_label"] = labeling.labels[max(range(len(cal)), key=cal.__getitem__)]
        if labeling.gold_field:
            gold = r.get(labeling.gold_field)
            item["gold"] = gold
            item["correct"] = item["label"] is not None and normalize(str(gold)) == normalize(item["label"])
        labeled.append(item)
    _write_jsonl(out / "labels.jsonl", labeled)
    result = _summarize(labeled, labeling)
    result.update(task="label", generation=summary.to_dict())
    log.info("labeled %d rows: %s", len(labeled), {k: v for k, v in result.items() if k != "generation"})
    return labeled, result


def _summarize(labeled: list[dict[str, Any]], cfg: LabelingConfig) -> dict[str, Any]:
    n = len(labeled)
    dist = Counter(x["label"] for x in labeled)
    res: dict[str, Any] = {
        "rows": n,
        "unlabeled": dist.pop(None, 0),
        "label_counts": dict(dist),
        "mean_agreement": sum(x["agreement"] for x in labeled) / max(n, 1),
    }
    if cfg.gold_field:
        res["accuracy"] = sum(bool(x["correct"]) for x in labeled) / max(n, 1)
        if cfg.score_loglik:
            res["loglik_accuracy"] = sum(
                normalize(str(x["gold"])) == normalize(x["loglik_label"]) for x in labeled) / max(n, 1)
        if cfg.score_loglik and cfg.calibrate:
            res["calibrated_accuracy"] = sum(
                normalize(str(x["gold"])) == normalize(x["calibrated_label"]) for x in labeled) / max(n, 1)
    return res


def _write_jsonl(path: Path, items: list[dict[str, Any]]) -> None:
    import json

    with atomic_write(path, "w") as fh:
        for it in items:
            fh.write(json.dumps(it, ensure_ascii=False, default=str) + "\n")
