"""The ``ddk:`` method key of the ``llm_kd`` recipe: DDK domain reweighting from YAML.

DDK (Liu et al., 2024, "DDK: Distilling Domain Knowledge for Efficient LLMs",
:mod:`kdforge.train.ddk`) samples a multi-domain training set with domain weights that follow
the student's deficit: every ``update_every`` steps the student's held-out cross-entropy per
domain ``l_S[i]`` is compared with the teacher's ``l_T[i]`` and the mixture moves, smoothly,
toward the domains where the ratio ``l_S / l_T`` is largest.

What this module adds to ``llm_kd`` (which only registers the key):

* the domains come from the data layer: ``data.domain_field`` names the column holding each
  row's domain (:class:`kdforge.data.DataSpec`); every training domain needs held-out rows;
* the held-out rows DDK measures on (``ddk.dev_examples`` per domain, the first ones of each
  domain in the held-out split) are **removed from the final scores of every method** once any
  method uses DDK, so the table never scores a model on rows that steered its training;
* the teacher's per-domain loss is measured **once** on those rows with the run's teacher (the
  teacher is frozen), so DDK works with the top-k cache as well as with the online teacher;
* the sampler's state (weights, the teacher's losses, the history) is checkpointed by the
  trainer and restored on ``--resume``; ``ddk/weight/<domain>`` is in every train log and
  ``ddk_weights.json`` / ``ddk_weights.png`` land in the sub-run's folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from pydantic import Field

from kdforge.errors import ConfigError, DataError
from kdforge.recipes.lm_data import LMData
from kdforge.train.ddk import DDKConfig, DDKSampler

log = logging.getLogger(__name__)

__all__ = ["DDKSpec", "carve_dev", "ddk_sampler", "teacher_domain_losses"]


class DDKSpec(DDKConfig):
    """DDK for one ``llm_kd`` method (:class:`kdforge.train.ddk.DDKConfig`) plus the size of the
    held-out rows it measures on."""

    dev_examples: int = Field(8, ge=1, description="held-out rows per domain that DDK measures on; removed "
                                                   "from the final scores of every method")


def carve_dev(data: LMData, dev_examples: int) -> tuple[LMData, dict[str, Any]]:
    """Split the held-out rows: the first ``dev_examples`` of each domain become DDK's measuring
    sets ``{domain: LMBlockDataset}``; the rest stay held out for the final scores.

    Raises:
        ConfigError: the data has no domains (``data.domain_field``).
        DataError: a training domain has no held-out row left for the final scores, or none at all.
    """
    from kdforge.data.text import LMBlockDataset

    if data.train_domains is None or data.eval_domains is None:
        raise ConfigError("ddk needs each row's domain, and the data has none",
                          "set data.domain_field to the column naming each row's domain (a dataset given "
                          "by data.path, not a corpus)")
    held = data.eval_domains
    dev_rows: dict[str, list[int]] = {}
    for i, d in enumerate(held):
        rows = dev_rows.setdefault(d, [])
        if len(rows) < dev_examples:
            rows.append(i)
    counts = {d: held.count(d) for d in dev_rows}
    for d in sorted(set(data.train_domains)):
        if d not in counts:
            raise DataError(f"training domain {d!r} has no held-out rows for DDK to measure",
                            "hold out rows of every domain (eval_fraction, or an eval split with each domain)")
        if counts[d] <= dev_examples:
            raise DataError(f"domain {d!r} has {counts[d]} held-out rows; DDK measures on {dev_examples} of them "
                            "and none would be left to score the models",
                            "lower ddk.dev_examples, raise data.eval_examples, or hold out more rows")
    taken = {i for rows in dev_rows.values() for i in rows}
    keep = torch.tensor([i for i in range(len(held)) if i not in taken], dtype=torch.long)

    def rows_of(indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in (("labels", data.eval_labels), ("attention_mask", data.eval_mask))
                if v is not None}

    dev = {d: LMBlockDataset(data.eval[torch.tensor(rows)], rows_of(rows)) for d, rows in sorted(dev_rows.items())}
    extras = rows_of(keep)
    summary = {**data.summary, "eval_examples": int(keep.numel()),
               "ddk_dev_examples": {d: len(r) for d, r in sorted(dev_rows.items())}}
    rest = replace(data, eval=data.eval[keep], eval_labels=extras.get("labels"),
                   eval_mask=extras.get("attention_mask"), eval_domains=[held[i] for i in keep.tolist()],
                   summary=summary)
    log.info("DDK measures on %s held-out rows per domain; %d rows left for the final scores",
             {d: len(r) for d, r in dev_rows.items()}, keep.numel())
    return rest, dev


def teacher_domain_losses(teacher: torch.nn.Module, dev: Mapping[str, Any], *, batch_size: int = 8
                          ) -> dict[str, float]:
    """The teacher's mean next-token cross-entropy (nats per labelled position) on each domain's
    measuring rows (labels ``-100`` and padding not counted), by :func:`kdforge.eval.lm.evaluate_language_models`."""
    from kdforge.eval.lm import evaluate_language_models

    out: dict[str, float] = {}
    for domain, data in dev.items():
        batches = [{key: torch.stack([data[i][key] for i in range(start, min(start + batch_size, len(data)))])
                    for key in data[0]} for start in range(0, len(data), batch_size)]
        nll = evaluate_language_models({"teacher": teacher}, batches)["teacher"]["metrics"]["nll"]
        if not math.isfinite(nll):
            raise DataError(f"DDK's held-out rows of domain {domain!r} have no labelled position",
                            "give every domain held-out rows with response tokens")
        out[domain] = float(nll)
    log.info("DDK: teacher held-out loss per domain %s", {d: round(v, 3) for d, v in out.items()})
    return out


def ddk_sampler(spec: DDKSpec, data: LMData, dev: Mapping[str, Any], teacher_loss: Mapping[str, float], *,
                seed: int) -> DDKSampler:
    """The sampler of one sub-run (attach ``sampler.callback`` to the trainer)."""
    from accelerate import PartialState

    if data.train_domains is None:
        raise ConfigError("ddk needs each training row's domain", "set data.domain_field")
    state = PartialState()
    return DDKSampler.from_config(spec.model_dump(exclude={"dev_examples"}), data.train_domains, dict(dev),
                                  teacher_loss=dict(teacher_loss), seed=seed,
                                  num_replicas=state.num_processes, rank=state.process_index)
