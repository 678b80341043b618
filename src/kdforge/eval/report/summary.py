"""The numbers a report leads with: best student vs baseline and teacher, seeds, teacher hacking."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdforge.eval.monitor import FLAG_KEY, detect_teacher_hacking
from kdforge.eval.report import fmt
from kdforge.eval.report.runs import ModelEntry, RunData


@dataclass
class Headline:
    """Best student against the best baseline and the teacher on the primary metric."""

    metric: str
    best: ModelEntry
    text: str
    cards: list[tuple[str, str, str]] = field(default_factory=list)  # (label, value, note)
    verdict: str | None = None


def _best(models: list[ModelEntry], key: str, higher: bool) -> ModelEntry | None:
    cands = [m for m in models if m.value(key) is not None]
    if not cands:
        return None
    return max(cands, key=lambda m: m.value(key) if higher else -m.value(key))  # type: ignore[operator]


def _relative(key: str, v: float, ref: float) -> str:
    """Signed relative change, as a ratio once it exceeds 100% (``+22.6%``, ``97×``)."""
    if ref == 0:
        return fmt.fmt_delta(key, v - ref)
    rel = (v - ref) / abs(ref)
    if abs(rel) >= 1 and ref > 0 and v > 0:
        return fmt.fmt_ratio(v / ref)
    return f"{100 * rel:+.1f}%"


def compare_phrase(key: str, v: float, ref: float, higher_is_better: bool, ref_name: str) -> str:
    """``+1.7 pts over X`` / ``-0.4 pts vs X`` / ``19.8% lower perplexity than X``."""
    better = v > ref if higher_is_better else v < ref
    if fmt.is_fraction(key) and "ece" not in key:
        return f"{fmt.fmt_delta(key, v - ref)} {'over' if better else 'vs'} {ref_name}"
    if ref == 0:
        return f"{fmt.fmt_delta(key, v - ref)} vs {ref_name}"
    rel = abs(v - ref) / abs(ref)
    amount = f"{fmt.fmt_ratio(v / ref)}" if v > ref and rel >= 1 and ref > 0 else f"{100 * rel:.1f}%"
    word = "higher" if v > ref else "lower"
    if amount.endswith("×"):
        return f"{amount} the {fmt.label(key).lower()} of {ref_name}"
    return f"{amount} {word} {fmt.label(key).lower()} than {ref_name}"


def significance(a: ModelEntry, b: ModelEntry, key: str) -> str | None:
    """``clear`` when |Δ| > 2 standard errors over seeds, ``noise`` when not; None without seeds."""
    sa, sb = a.std(key), b.std(key)
    na, nb = a.n_seeds, b.n_seeds
    if sa is None or sb is None or na < 2 or nb < 2:
        return None
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    delta = abs((a.value(key) or 0) - (b.value(key) or 0))
    return "clear" if delta > 2 * se else "noise"


def headline(run: RunData) -> Headline | None:
    key = run.primary_metric
    if not key:
        return None
    hib = run.higher_is_better
    students = [m for m in run.models if m.role == "student"]
    best = _best(students, key, hib)
    if best is None:
        return None
    base = _best([m for m in run.models if m.role == "baseline"], key, hib)
    teacher = next((m for m in run.models if m.role == "teacher"), None)
    v = best.value(key) or 0.0
    fraction = fmt.is_fraction(key) and "ece" not in key
    parts = [f"{best.name}: {fmt.fmt_value(key, v)}"]
    cards = [(fmt.label(key), fmt.fmt_value(key, v, std=best.std(key)),
              f"{best.name}" + (f", {best.n_seeds} seeds" if best.n_seeds > 1 else ""))]
    verdict = None
    if base is not None:
        bv = base.value(key) or 0.0
        delta = fmt.fmt_delta(key, v - bv) if fraction else _relative(key, v, bv)
        parts.append(f"({compare_phrase(key, v, bv, hib, base.name)})")
        cards.append((f"vs {base.name}", delta, f"{base.name}: {fmt.fmt_value(key, bv, std=base.std(key))}"))
        better = v > bv if hib else v < bv
        sig = significance(best, base, key)
        if not better:
            verdict = f"No student beats {base.name} on {fmt.label(key).lower()} in this run."
            if sig == "noise":
                verdict += " The difference is within seed noise."
        elif sig == "clear":
            verdict = f"The gain over {base.name} exceeds 2 standard errors across seeds."
        elif sig == "noise":
            verdict = f"The difference from {base.name} is within seed noise (under 2 standard errors)."
        elif best.n_seeds < 2:
            verdict = "Single seed: repeat over seeds before trusting the difference."
    tail = []
    if teacher is not None:
        tv = teacher.value(key)
        if tv is not None:
            gap = fmt.fmt_delta(key, v - tv) if fraction else _relative(key, v, tv)
            cards.append(("vs teacher", gap, f"teacher: {fmt.fmt_value(key, tv)}"))
        for cost_key, word in (("params", "smaller"), ("size_mb", "smaller")):
            t_c, s_c = teacher.value(cost_key), best.value(cost_key)
            if t_c and s_c:
                ratio = t_c / s_c
                tail.append(f"{fmt.fmt_ratio(ratio)} {word} than the teacher")
                cards.append(("compression", fmt.fmt_ratio(ratio),
                              f"{fmt.fmt_value(cost_key, s_c)} vs {fmt.fmt_value(cost_key, t_c)}"))
                break
        t_l, s_l = teacher.value("latency_ms"), best.value("latency_ms")
        if t_l and s_l:
            ratio = t_l / s_l
            tail.append(f"{fmt.fmt_ratio(ratio)} faster" if ratio >= 1 else f"{fmt.fmt_ratio(1 / ratio)} slower")
            cards.append(("speed-up", fmt.fmt_ratio(ratio),
                          f"{fmt.fmt_value('latency_ms', s_l)} vs {fmt.fmt_value('latency_ms', t_l)}"))
    text = " ".join(parts)
    if tail:
        text += ", " + ", ".join(tail)
    return Headline(metric=key, best=best, text=text, cards=cards, verdict=verdict)


def hacking_onsets(run: RunData) -> dict[str, int]:
    """Model name -> first teacher-hacking step: logged flags first, else the detector run on
    the model's eval history (first seed that shows it)."""
    out: dict[str, int] = {}
    for m in run.models:
        for hist in m.histories:
            logged = [int(r.get("step", 0)) for r in hist if r.get(FLAG_KEY) in (1, 1.0, True)]
            if logged:
                step = min(logged)
            else:
                flagged = [c.step for c in detect_teacher_hacking(hist) if c.flagged]
                if not flagged:
                    continue
                step = flagged[0]
            out[m.name] = min(step, out.get(m.name, step))
    return out
