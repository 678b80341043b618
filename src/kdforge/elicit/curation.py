"""Curation: filter and weight generated samples before a student trains on them.

Checks, applied in this order to each row's ``text_field`` (cheap ones first, the judge last so
it only sees survivors):

* **length**: ``min_words``/``max_words``/``min_chars``/``max_chars``;
* **format**: ``regex`` must match (``re.search``), and/or ``json: true`` -- the text (or its
  first ```json fenced block) must parse as JSON, with ``json_keys`` present if given;
* **self-consistency**: rows sharing ``group_field`` (e.g. the n samples of one prompt) vote on
  their answer (``answer_pattern`` capture, else the normalised text); rows that disagree with
  the majority are dropped, and a group whose majority share is below ``min_agreement`` is
  dropped whole. Weight = agreement;
* **judge**: a model (the teacher or another) scores each survivor with a rubric prompt; the
  first number in its reply is the score, averaged over ``sampling.n`` samples; rows below
  ``judge.threshold`` are dropped. Weight = score normalised to [0, 1] (LLM-as-a-judge,
  Zheng et al. 2023).

Output ``OUTPUT_DIR/curated.jsonl`` (kept rows with ``weight`` and ``scores``) and
``OUTPUT_DIR/rejected.jsonl`` (rows with ``reason``).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.config import StrictModel
from kdforge.elicit.backends.base import Backend
from kdforge.elicit.data import PromptConfig, render_prompt
from kdforge.elicit.engine import GenerationEngine, collect
from kdforge.elicit.labeling import _write_jsonl, aggregate_votes, normalize
from kdforge.elicit.types import SamplingParams, build_requests
from kdforge.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_JUDGE_TEMPLATE = (
    "Rate the following response for correctness, helpfulness and clarity on a scale from "
    "{min_score} to {max_score}.\n\nResponse:\n{text}\n\nReply with the score only."
)


class JudgeConfig(StrictModel):
    template: str = Field(DEFAULT_JUDGE_TEMPLATE, description="rubric prompt; row fields, {min_score}, {max_score}")
    min_score: float = 1
    max_score: float = 10
    threshold: float = Field(6, description="keep rows whose mean score >= threshold")

    @model_validator(mode="after")
    def _range(self) -> JudgeConfig:
        if self.max_score <= self.min_score:
            raise ValueError("judge.max_score must be greater than judge.min_score")
        return self


class CurationConfig(StrictModel):
    text_field: str = "text"
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    regex: str | None = Field(None, description="the text must match this regex (re.search)")
    json_format: bool = Field(False, alias="json", description="the text must be valid JSON")
    json_keys: list[str] = Field(default_factory=list, description="keys the JSON object must have")
    group_field: str | None = Field(None, description="rows with equal values vote together (self-consistency)")
    answer_pattern: str | None = Field(None, description="regex with one group: the answer voted on")
    min_agreement: float = Field(0.5, ge=0, le=1)
    judge: JudgeConfig | None = None
    weight: Literal["auto", "judge", "agreement", "none"] = Field(
        "auto", description="auto = product of the judge and agreement weights that apply")

    model_config = {**StrictModel.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _regexes(self) -> CurationConfig:
        for name in ("regex", "answer_pattern"):
            pat = getattr(self, name)
            if pat is not None:
                try:
                    rx = re.compile(pat)
                except re.error as exc:
                    raise ValueError(f"{name} is not a valid regex: {exc}") from None
                if name == "answer_pattern" and rx.groups < 1:
                    raise ValueError("answer_pattern needs one capture group")
        return self


def check_length(text: str, cfg: CurationConfig) -> str | None:
    words, chars = len(text.split()), len(text)
    if cfg.min_words is not None and words < cfg.min_words:
        return "too_short"
    if cfg.max_words is not None and words > cfg.max_words:
        return "too_long"
    if cfg.min_chars is not None and chars < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and chars > cfg.max_chars:
        return "too_long"
    return None


def parse_json_text(text: str) -> Any:
    """Parse ``text`` as JSON, or its first fenced ```json block; raises ValueError."""
    m = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    return json.loads(m.group(1) if m else text)


def check_format(text: str, cfg: CurationConfig) -> str | None:
    if cfg.regex is not None and re.search(cfg.regex, text) is None:
        return "regex_mismatch"
    if cfg.json_format or cfg.json_keys:
        try:
            obj = parse_json_text(text)
        except (ValueError, TypeError):
            return "invalid_json"
        if cfg.json_keys and (not isinstance(obj, dict) or any(k not in obj for k in cfg.json_keys)):
            return "json_missing_keys"
    return None


def parse_score(text: str, lo: float, hi: float) -> float | None:
    """First number in a judge reply, if it lies in [lo, hi] ("8/10" -> 8; "Score: 7.5" -> 7.5)."""
    for m in re.finditer(r"-?\d+(?:\.\d+)?", text):
        val = float(m.group())
        if lo <= val <= hi:
            return val
    return None


def answer_of(text: str, pattern: str | None) -> str | None:
    if pattern is None:
        return normalize(text) or None
    m = re.findall(pattern, text)
    if not m:
        return None
    last = m[-1] if isinstance(m[-1], str) else m[-1][0]
    return normalize(last) or None


def curate_rows(
    rows: list[dict[str, Any]],
    cfg: CurationConfig,
    *,
    backend: Backend | None = None,
    output_dir: str | Path,
    prompt: PromptConfig | None = None,
    params: SamplingParams | None = None,
    **engine_kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Filter/weight ``rows``; writes ``curated.jsonl``/``rejected.jsonl``; returns (kept, summary)."""
    out = Path(output_dir)
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for r in rows:
        if cfg.text_field not in r:
            raise ConfigError(f"curation.text_field {cfg.text_field!r} is not a column of the data",
                              f"use one of: {', '.join(map(str, r))}")
        text = str(r[cfg.text_field])
        reason = check_length(text, cfg) or check_format(text, cfg)
        if reason:
            rejected.append({"row": r, "reason": reason})
        else:
            kept.append({"row": r, "scores": {}, "weight": 1.0})

    if cfg.group_field is not None:
        groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for it in kept:
            if cfg.group_field not in it["row"]:
                raise ConfigError(f"curation.group_field {cfg.group_field!r} is missing from a row",
                                  "name a column every row has (e.g. the prompt id)")
            groups[json.dumps(it["row"][cfg.group_field], sort_keys=True, default=str)].append(it)
        survivors = []
        for members in groups.values():
            answers = [answer_of(str(m["row"][cfg.text_field]), cfg.answer_pattern) for m in members]
            vote = aggregate_votes(answers)
            for m, a in zip(members, answers, strict=True):
                m["scores"]["agreement"] = vote["agreement"]
                m["scores"]["majority"] = vote["label"]
                if vote["label"] is None or vote["agreement"] < cfg.min_agreement:
                    rejected.append({"row": m["row"], "reason": "low_agreement", "scores": m["scores"]})
                elif a != vote["label"]:
                    rejected.append({"row": m["row"], "reason": "disagrees_with_majority", "scores": m["scores"]})
                else:
                    survivors.append(m)
        kept = survivors

    gen_summary = None
    if cfg.judge is not None and kept:
        if backend is None:
            raise ConfigError("curation.judge needs a backend (the judge model)", "add a backend section")
        params = params or SamplingParams(n=1, temperature=0.0, max_tokens=8)
        j = cfg.judge
        prompts = [render_prompt({**it["row"], "text": it["row"][cfg.text_field],
                                  "min_score": _fmt(j.min_score), "max_score": _fmt(j.max_score)},
                                 prompt or PromptConfig(), j.template) for it in kept]
        reqs = build_requests(prompts, params, namespace="judge")
        summary = GenerationEngine(backend, out / "judge", **engine_kwargs).run(reqs)
        gen_summary = summary.to_dict()
        by_id = {rec["id"]: rec["text"] for rec in collect(out / "judge", reqs)}
        survivors = []
        for i, it in enumerate(kept):
            texts = [by_id.get(q.id) for q in reqs[i * params.n:(i + 1) * params.n]]
            scores = [s for t in texts if t is not None and (s := parse_score(t, j.min_score, j.max_score)) is not None]
            if not scores:
                rejected.append({"row": it["row"], "reason": "judge_unparseable", "judge_replies": texts})
                continue
            mean = sum(scores) / len(scores)
            it["scores"]["judge"] = mean
            it["scores"]["judge_samples"] = scores
            if mean < j.threshold:
                rejected.append({"row": it["row"], "reason": "judge_below_threshold", "scores": it["scores"]})
            else:
                survivors.append(it)
        kept = survivors

    for it in kept:
        it["weight"] = _weight(it["scores"], cfg)
    _write_jsonl(out / "curated.jsonl", kept)
    _write_jsonl(out / "rejected.jsonl", rejected)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    result: dict[str, Any] = {"task": "curate", "rows": len(rows), "kept": len(kept),
                              "rejected": len(rejected), "rejected_by_reason": reasons}
    if gen_summary is not None:
        result["generation"] = gen_summary
    return kept, result


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _weight(scores: dict[str, Any], cfg: CurationConfig) -> float:
    judge_w = None
    if "judge" in scores and cfg.judge is not None:
        judge_w = (scores["judge"] - cfg.judge.min_score) / (cfg.judge.max_score - cfg.judge.min_score)
    agree_w = scores.get("agreement")
    if cfg.weight == "none":
        return 1.0
    if cfg.weight == "judge":
        return judge_w if judge_w is not None else 1.0
    if cfg.weight == "agreement":
        return agree_w if agree_w is not None else 1.0
    w = 1.0
    for part in (judge_w, agree_w):
        if part is not None:
            w *= part
    return w
