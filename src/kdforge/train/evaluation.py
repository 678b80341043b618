"""Evaluation of a :class:`~kdforge.train.Distiller`'s student: objective terms and fidelity."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kdforge.errors import ConfigError
from kdforge.train.metrics import FIDELITY_SUM_KEYS, fidelity_sums
from kdforge.train.sampler import EpochSampler
from kdforge.train.stream import dataset_of

__all__ = ["evaluate"]


def evaluate(d: Any, data: Dataset | DataLoader | None = None) -> dict[str, float]:
    """Objective and fidelity on ``data`` (default: ``eval_data``), no grad.

    Returns ``eval/loss``, ``eval/loss/<term>``, ``eval/agreement`` (top-1 agreement with the
    teacher), ``eval/kl_to_teacher`` (``KL(p_teacher || q_student)`` at T=1),
    ``eval/kl_from_teacher`` (``KL(q || p)``), ``eval/js_to_teacher``, ``eval/nll`` and
    ``eval/perplexity`` (causal LMs) or ``eval/accuracy`` (classification), each averaged over
    real positions of all processes, plus ``eval_fn``'s metrics.
    """
    data = d.eval_data if data is None else data
    if data is None:
        raise ConfigError("evaluate() needs eval data", "pass eval_data= to Distiller or data= to evaluate()")
    acc = d.accelerator
    dataset, collate = dataset_of(data, d.collate_fn, "eval_data")
    sampler = EpochSampler(len(dataset), shuffle=False, num_replicas=acc.num_processes, rank=acc.process_index)
    loader = d.stream.loader(dataset, sampler, collate)
    keys = ["count", *[f"term:{k}" for k in d.objective.keys], *FIDELITY_SUM_KEYS, "nll", "nll_count",
            "correct"]
    sums = torch.zeros(len(keys), dtype=torch.float64, device=acc.device)
    present: set[str] = set()
    training = d.student.training
    d.student.eval()
    from accelerate.utils import send_to_device

    with torch.no_grad():
        for batch in loader:
            batch = send_to_device(batch, acc.device)
            out = d.task_output(batch, chunked=False)
            stats: dict[str, torch.Tensor] = {}
            if out.teacher is not None or not d.objective.needs_teacher:
                value = d.objective(out, 1.0, values=d.schedules.current(d.state.step))  # sums
                stats.update({f"term:{k}": v for k, v in value.terms.items()})
            stats.update(fidelity_sums(out.student_logits, out.teacher, out.mask, out.labels))
            for k, v in stats.items():
                sums[keys.index(k)] += v.double().to(acc.device)
                present.add(k)
    d.student.train(training)
    if acc.num_processes > 1:
        sums = acc.reduce(sums, "sum")
    s = dict(zip(keys, sums.tolist()))
    count = max(s["count"], 1.0)
    metrics: dict[str, float] = {}
    term_keys = [k for k in d.objective.keys if f"term:{k}" in present]
    if term_keys:
        metrics["eval/loss"] = sum(t.weight * s[f"term:{t.key}"] for t in d.objective.terms) / count
        for k in term_keys:
            metrics[f"eval/loss/{k}"] = s[f"term:{k}"] / count
    for key in FIDELITY_SUM_KEYS:
        if key in present:
            metrics[f"eval/{key}"] = s[key] / count
    if "nll" in present and s["nll_count"] > 0:
        nll = s["nll"] / s["nll_count"]
        metrics["eval/nll"] = nll
        if d.task.unit == "tokens":
            metrics["eval/perplexity"] = math.exp(min(nll, 700.0))
        else:
            metrics["eval/accuracy"] = s["correct"] / s["nll_count"]
    if d.eval_fn is not None:
        for k, v in dict(d.eval_fn(acc.unwrap_model(d.student))).items():
            metrics[k if k.startswith("eval/") else f"eval/{k}"] = v
    return metrics

