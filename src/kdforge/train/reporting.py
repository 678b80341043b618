"""What a :class:`~kdforge.train.Distiller` run reports: the window of train metrics between two
log lines, its reduction over processes, and the eval record sent to trackers and callbacks.

A train log record (``split: train``) holds, for the steps since the previous one, the mean of
each summed metric (``loss``, ``loss/<term>``, ``grad_norm``, ``sched/<name>``...) over the
steps, summed over processes (``grad_norm`` and scheduled values, equal on all processes, are
averaged instead), plus ``lr`` and ``<unit>_per_s`` (real positions per second of step time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

# the Distiller's logger: its eval lines keep the name users filter on
logger = logging.getLogger("kdforge.train.distiller")

__all__ = ["Window", "evaluate_and_report", "global_losses", "train_logs"]


class Window:
    """Metrics summed over the optimizer steps since the last log."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.steps, self.positions, self.time = 0, 0, 0.0

    def add(self, stats: Mapping[str, Any], positions: int, seconds: float) -> None:
        for key, value in stats.items():
            self.values[key] = self.values.get(key, 0.0) + value
        self.steps += 1
        self.positions += positions
        self.time += seconds


def global_losses(d: Any, metrics: Mapping[str, Any]) -> dict[str, float]:
    """This step's ``loss``/``loss/<term>`` summed over processes (each holds its share)."""
    keys = sorted(k for k in metrics if k == "loss" or k.startswith("loss/"))
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(d.accelerator.device)
                          for k in keys])
    if d.accelerator.num_processes > 1:
        values = d.accelerator.reduce(values, "sum")
    return dict(zip(keys, values.tolist()))


def train_logs(d: Any, window: Window, start: float) -> dict[str, Any]:
    """The train log record of ``window`` (module docstring); ``start``: the run's ``perf_counter``."""
    acc = d.accelerator
    keys = sorted(window.values)
    values = torch.stack([torch.as_tensor(window.values[k], dtype=torch.float32).to(acc.device) for k in keys])
    if acc.num_processes > 1:
        values = acc.reduce(values, "sum")
        # grad_norm and scheduled values are identical on all processes: undo the sum
        for i, k in enumerate(keys):
            if k == "grad_norm" or k.startswith("sched/"):
                values[i] /= acc.num_processes
    logs: dict[str, Any] = {"step": d.state.step, "split": "train", "epoch": round(d.state.epoch_float, 4),
                            "time": round(time.perf_counter() - start, 3)}
    for k, v in zip(keys, values.tolist()):
        logs[k] = v / window.steps
    logs["lr"] = d.scheduler.get_last_lr()[0]
    logs[f"{d.task.unit}_per_s"] = window.positions / max(window.time, 1e-9)
    return logs


def evaluate_and_report(d: Any, start: float) -> dict[str, Any]:
    """Run ``d.evaluate()``; log, track and hand the record to the callbacks (``on_evaluate``)."""
    metrics = d.evaluate()
    record = {"step": d.state.step, "split": "eval", "epoch": round(d.state.epoch_float, 4),
              "time": round(time.perf_counter() - start, 3), **metrics}
    d.state.last_eval = record
    logger.info("eval step %d %s", d.state.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                          if isinstance(v, float)))
    if getattr(d.accelerator, "trackers", None):
        d.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=d.state.step)
    for cb in d.callbacks:
        cb.on_evaluate(d.state, record)
    return record
