"""Rationales: chain-of-thought answers with the final answer extracted and voted.

For each question the teacher writes ``n`` step-by-step solutions (``sampling.n``, sampled at
``temperature > 0``). From each one the final answer is extracted (:func:`extract_answer`);
the majority answer wins (self-consistency, Wang et al. 2022) and its *agreement* is the
confidence. Both the rationale and the answer are stored, as rationale distillation needs
them ("Distilling Step-by-Step", Hsieh et al. 2023: the student learns to produce the label
and, as a second task, the teacher's rationale).

Output ``OUTPUT_DIR/rationales.jsonl``: per question ``row``, ``answer`` (majority),
``agreement``, ``votes``, ``rationale`` (the first sample whose answer equals the majority;
the text before the final answer line), ``samples`` (every text with its extracted answer) and,
with a gold field, ``gold`` / ``correct``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.elicit.backends.base import Backend
from kdforge.elicit.data import PromptConfig, render_prompt
from kdforge.elicit.engine import GenerationEngine, collect
from kdforge.elicit.labeling import _write_jsonl, aggregate_votes, normalize, parse_label
from kdforge.elicit.types import SamplingParams, build_requests
from kdforge.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "{question}\n\nThink step by step. Then write the final answer on its own last line as "
    "'Answer: <answer>'."
)

# tried in order; the LAST match in the text is taken (models restate the answer at the end)
ANSWER_PATTERNS = [
    r"\\boxed\{([^{}]+)\}",
    r"(?im)\banswer\s*[:：]\s*(.+?)\s*$",
    r"(?i)(?:the\s+)?(?:final\s+)?answer\s+is\s*[:：]?\s*([^\n]+?)\s*(?:\.|$)",
]


class RationalesConfig(StrictModel):
    question_field: str = "question"
    template: str = Field(DEFAULT_TEMPLATE, description="prompt; row fields are available")
    answer_pattern: str | None = Field(None, description="regex with one group capturing the answer")
    choices: list[str] | None = Field(None, description="closed answer set (answers are mapped onto it)")
    gold_field: str | None = None


def extract_answer(text: str, pattern: str | None = None, choices: list[str] | None = None) -> str | None:
    """Final answer of a chain-of-thought text, or ``None``.

    Uses ``pattern`` (one capture group) if given, else ``\\boxed{..}``, an ``Answer: ..``
    line, or "the answer is ..", taking the last match. With ``choices`` the captured answer is
    mapped onto the closed set (:func:`~kdforge.elicit.labeling.parse_label`); without, it is
    cleaned (surrounding ``*``/quotes/period removed; numbers normalised: ``"1,000.0"`` ->
    ``"1000"``).
    """
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"answer_pattern {pattern!r} is not a valid regex: {exc}", "fix the regex") from None
        if rx.groups < 1:
            raise ConfigError(f"answer_pattern {pattern!r} has no capture group", "wrap the answer part in (...)")
        patterns = [pattern]
    else:
        patterns = ANSWER_PATTERNS
    found: str | None = None
    for pat in patterns:
        matches = re.findall(pat, text)
        if matches:
            m = matches[-1]
            found = m if isinstance(m, str) else m[0]
            break
    if found is None:
        if choices:  # fall back to the last line mentioning a choice
            for line in reversed([ln for ln in text.splitlines() if ln.strip()]):
                lab = parse_label(line, choices)
                if lab is not None:
                    return lab
        return None
    if choices:
        return parse_label(found, choices)
    return clean_answer(found)


def clean_answer(ans: str) -> str | None:
    ans = ans.strip().strip("*_`\"' ").rstrip(".").strip()
    num = ans.replace(",", "").replace("$", "")
    try:
        val = float(num)
    except ValueError:
        return ans or None
    return str(int(val)) if val == int(val) else str(val)


def split_rationale(text: str) -> str:
    """The reasoning part: the text before the final answer line (whole text if none)."""
    lines = text.rstrip().splitlines()
    if lines and re.match(r"(?i)^\s*(?:final\s+)?answer\s*[:：]", lines[-1]):
        lines = lines[:-1]
    return "\n".join(lines).strip()


def rationale_rows(
    rows: list[dict[str, Any]],
    backend: Backend,
    output_dir: str | Path,
    *,
    rationales: RationalesConfig,
    prompt: PromptConfig | None = None,
    params: SamplingParams | None = None,
    id_field: str | None = None,
    **engine_kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate, extract and vote rationales; writes ``rationales.jsonl``; returns (items, summary)."""
    prompt = prompt or PromptConfig()
    params = params or SamplingParams(n=5, temperature=0.7, max_tokens=512)
    out = Path(output_dir)
    for r in rows[:1]:
        if rationales.question_field not in r:
            raise ConfigError(f"rationales.question_field {rationales.question_field!r} is not a column",
                              f"use one of: {', '.join(map(str, r))}")
    prompts = [render_prompt(r, prompt, rationales.template) for r in rows]
    ids = [str(r[id_field]) for r in rows] if id_field else None
    reqs = build_requests(prompts, params, ids=ids, namespace="rationales")
    summary = GenerationEngine(backend, out / "generations", **engine_kwargs).run(reqs)
    by_id = {rec["id"]: rec for rec in collect(out / "generations", reqs)}
    items = []
    for j, r in enumerate(rows):
        texts = [by_id[q.id]["text"] for q in reqs[j * params.n:(j + 1) * params.n] if q.id in by_id]
        answers = [extract_answer(t, rationales.answer_pattern, rationales.choices) for t in texts]
        vote = aggregate_votes([normalize(a) if a is not None and not rationales.choices else a for a in answers])
        winner = vote["label"]
        chosen = next((t for t, a in zip(texts, answers, strict=True)
                       if a is not None and (a if rationales.choices else normalize(a)) == winner), None)
        item: dict[str, Any] = {
            "row": r, "answer": winner, "agreement": vote["agreement"], "votes": vote["votes"],
            "rationale": split_rationale(chosen) if chosen is not None else None,
            "samples": [{"text": t, "answer": a} for t, a in zip(texts, answers, strict=True)],
        }
        if rationales.gold_field:
            gold = r.get(rationales.gold_field)
            item["gold"] = gold
            item["correct"] = winner is not None and normalize(str(gold)) == normalize(str(winner))
        items.append(item)
    _write_jsonl(out / "rationales.jsonl", items)
    n = max(len(items), 1)
    result: dict[str, Any] = {
        "task": "rationales", "rows": len(items),
        "answered": sum(it["answer"] is not None for it in items),
        "mean_agreement": sum(it["agreement"] for it in items) / n,
        "generation": summary.to_dict(),
    }
    if rationales.gold_field:
        result["accuracy"] = sum(bool(it["correct"]) for it in items) / n
        # accuracy of a single sample (the first), to show what voting adds
        result["first_sample_accuracy"] = sum(
            bool(it["samples"]) and it["samples"][0]["answer"] is not None
            and normalize(str(it["samples"][0]["answer"])) == normalize(str(it["gold"])) for it in items) / n
    return items, result
