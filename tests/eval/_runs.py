"""Synthetic run folders in the layout of docs/run-format.md (deterministic numbers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]


def _reliability(shift: float) -> dict:
    conf = [(b + 0.5) / 15 for b in range(15)]
    return {
        "bin_confidence": [None if b < 5 else c for b, c in enumerate(conf)],
        "bin_accuracy": [None if b < 5 else max(0.0, min(1.0, c - shift)) for b, c in enumerate(conf)],
        "bin_count": [0] * 5 + [10 * (b - 4) for b in range(5, 15)],
    }


def _history(seed: int, final_loss: float, final_acc: float, hacking: bool = False) -> list[dict]:
    recs = []
    for step in range(0, 201, 10):
        frac = step / 200
        recs.append({"step": step, "split": "train", "epoch": frac * 3,
                     "loss": final_loss + 2.0 * math.exp(-5 * frac) + 0.01 * seed,
                     "loss/kd": 0.5 + math.exp(-4 * frac), "loss/ce": 0.3 + math.exp(-3 * frac),
                     "lr": 1e-3 * (1 - frac)})
        if step % 50 == 0:
            kl = 1.5 * math.exp(-3 * frac) + 0.2
            nll = 1.0 - 0.4 * frac if not hacking or frac <= 0.5 else 0.8 + 0.6 * (frac - 0.5)
            recs.append({"step": step, "split": "eval", "eval/accuracy": final_acc - 0.2 * (1 - frac),
                         "eval/kl_to_teacher": kl, "eval/nll": nll})
    return recs


def write_run(root: Path, *, hacking: bool = False) -> Path:
    """A Fashion-MNIST-like comparison: teacher, labels-only baseline, two KD students, 3 seeds."""
    root.mkdir(parents=True, exist_ok=True)
    models = [
        {"name": "teacher CNN", "role": "teacher", "params": 825_000, "size_mb": 3.2,
         "metrics": {"accuracy": 0.9105, "ece": 0.021, "latency_ms": 0.40},
         "reliability": _reliability(0.01), "per_class": dict(zip(CLASSES, [0.86, 0.98, 0.85, 0.91, 0.84])),
         "run_dir": "teacher"},
        {"name": "labels only", "role": "baseline", "params": 20_490, "size_mb": 0.08,
         "metrics": {"accuracy": 0.8196, "accuracy_std": 0.0024, "ece": 0.045, "latency_ms": 0.05},
         "per_seed": [{"seed": s, "accuracy": a} for s, a in enumerate([0.8171, 0.8196, 0.8221])],
         "reliability": _reliability(0.06), "per_class": dict(zip(CLASSES, [0.78, 0.95, 0.70, 0.83, 0.72])),
         "run_dir": [f"baseline/seed{s}" for s in range(3)]},
        {"name": "KD T=2 a=0.5", "role": "student", "params": 20_490, "size_mb": 0.08,
         "metrics": {"accuracy": 0.8370, "accuracy_std": 0.0022, "ece": 0.018, "latency_ms": 0.05,
                     "agreement": 0.874},
         "per_seed": [{"seed": s, "accuracy": a} for s, a in enumerate([0.8348, 0.8370, 0.8392])],
         "reliability": _reliability(0.02), "per_class": dict(zip(CLASSES, [0.80, 0.96, 0.73, 0.85, 0.75])),
         "run_dir": [f"kd/seed{s}" for s in range(3)]},
        {"name": "DKD", "role": "student", "params": 20_490, "size_mb": 0.08,
         "metrics": {"accuracy": 0.8293, "accuracy_std": 0.0024, "ece": 0.030, "latency_ms": 0.05,
                     "agreement": 0.861},
         "per_seed": [{"seed": s, "accuracy": a} for s, a in enumerate([0.8269, 0.8293, 0.8317])],
         "run_dir": [f"dkd/seed{s}" for s in range(3)]},
    ]
    (root / "results.json").write_text(json.dumps({
        "recipe": "fashion_mnist_kd", "created": "2026-11-23T12:00:00Z",
        "primary_metric": "accuracy", "higher_is_better": True, "models": models}, indent=2))
    runs = {"teacher": [(0, 0.25, 0.91)]}
    runs.update({f"baseline/seed{s}": [(s, 0.45, 0.82)] for s in range(3)})
    runs.update({f"kd/seed{s}": [(s, 0.60, 0.837)] for s in range(3)})
    runs.update({f"dkd/seed{s}": [(s, 0.62, 0.829)] for s in range(3)})
    for rel, [(seed, loss, acc)] in runs.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        hist = _history(seed, loss, acc, hacking=hacking and rel.startswith("kd/"))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))
    return root
