"""How metrics are named, ordered, compared and printed in reports."""

from __future__ import annotations

import math

# metrics where smaller is better; everything else (accuracy, agreement, rouge...) is larger-better
_LOWER = ("perplexity", "nll", "loss", "ece", "kl", "js", "brier", "latency", "size", "params",
          "error", "time")
_FRACTION = ("accuracy", "agreement", "exact_match", "rouge", "ece", "f1", "precision", "recall")
_PREFERRED = ("accuracy", "perplexity", "nll", "exact_match", "rouge_l", "agreement",
              "kl_to_teacher", "kl_from_teacher", "js_to_teacher", "token_accuracy", "ece",
              "answer_accuracy", "answer_ece")
COST_KEYS = ("params", "size_mb", "latency_ms", "throughput_per_s", "tokens_per_s", "samples_per_s")
_HIDDEN = ("n_tokens", "n_samples", "latency_ms_p95", "latency_ms_mean", "latency_per_item_ms",
           "trainable_params", "state_bytes", "size_bytes", "latency_batch_size",
           "speedup_vs_teacher", "compression_vs_teacher")
_LABELS = {
    "accuracy": "Accuracy", "perplexity": "Perplexity", "nll": "NLL", "ece": "ECE",
    "agreement": "Agreement w/ teacher", "kl_to_teacher": "KL(teacher‖student)",
    "kl_from_teacher": "KL(student‖teacher)", "js_to_teacher": "JS to teacher",
    "token_accuracy": "Next-token acc.", "exact_match": "Exact match", "rouge_l": "ROUGE-L",
    "answer_accuracy": "Answer acc.", "answer_ece": "Answer ECE", "answer_brier": "Answer Brier",
    "params": "Params", "size_mb": "Size", "latency_ms": "Latency", "throughput_per_s": "Throughput",
    "tokens_per_s": "Tokens/s", "samples_per_s": "Samples/s",
}


def lower_is_better(key: str) -> bool:
    k = key.lower().split("/")[-1]
    if "throughput" in k or "accuracy" in k or "agreement" in k:
        return False
    return any(tok in k for tok in _LOWER)


def is_fraction(key: str) -> bool:
    k = key.lower().split("/")[-1]
    return any(tok in k for tok in _FRACTION) and "answer_brier" not in k


def label(key: str) -> str:
    return _LABELS.get(key, key.replace("_", " ").replace("/", " / "))


def ordered_metric_keys(keys: set[str], primary: str | None) -> list[str]:
    """Quality metrics in display order: primary first, then a preferred order, then the rest."""
    quality = {k for k in keys if k not in COST_KEYS and not k.endswith("_std") and k not in _HIDDEN
               and not k.startswith("train_")}  # training statistics are not evaluation metrics
    out = [primary] if primary in quality else []
    out += [k for k in _PREFERRED if k in quality and k not in out]
    out += sorted(k for k in quality if k not in out)
    return out


def human_count(n: float) -> str:
    n = float(n)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.1f}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{n:.0f}"


def fmt_value(key: str, v: float | None, *, std: float | None = None) -> str:
    """``86.2%`` / ``62.0`` / ``0.031`` / ``825k`` / ``3.2 MB`` / ``0.41 ms``, with ``± std``."""
    if v is None or not math.isfinite(v):
        return "—"
    if key == "params":
        return human_count(v)
    if key == "size_mb":
        return f"{v:.1f} MB" if v >= 1 else f"{v * 1024:.0f} KB"
    if key == "latency_ms":
        if v >= 1000:
            return f"{v / 1000:.3g} s" + (f" ± {std / 1000:.2g}" if std else "")
        return f"{v:.3g} ms" + (f" ± {std:.2g}" if std else "")
    if key in ("throughput_per_s", "samples_per_s"):
        return f"{human_count(v)}/s"
    if key == "tokens_per_s":
        return f"{human_count(v)} tok/s"
    if is_fraction(key) and "ece" not in key and 0 <= v <= 1:
        s = f"{100 * v:.1f}%"
        return s + (f" ± {100 * std:.1f}" if std is not None else "")
    mag = abs(v)
    if mag >= 1e5:  # e.g. the perplexity of an untrained model: 2.4M, not 2404966.4
        return human_count(v) + (f" ± {human_count(std)}" if std is not None else "")
    digits = 1 if mag >= 100 else 2 if mag >= 10 else 3
    s = f"{v:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if std is not None else "")


def fmt_delta(key: str, delta: float) -> str:
    """Signed difference in the metric's own unit: ``+1.5 pts`` for fractions."""
    if is_fraction(key) and "ece" not in key:
        return f"{100 * delta:+.1f} pts"
    mag = abs(delta)
    digits = 1 if mag >= 10 else 2 if mag >= 1 else 3
    return f"{delta:+.{digits}f}"


def fmt_ratio(r: float) -> str:
    if r >= 1000:
        return f"{human_count(r)}×"
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×"


def fmt_tick(v: float) -> str:
    """Axis tick label: ``200``, ``0.05``, ``10M``."""
    return human_count(v) if abs(v) >= 1e5 else f"{v:g}"
