"""On-policy distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes") for causal LMs.

With probability ``lmbda`` per micro-batch, the completions of the batch are replaced by
samples from the *student* (generated from the prompt part), then scored by the online teacher
with any registered divergence (GKD's generalized JSD, reverse KL...). With ``seq_kd=True`` the
batch first gets teacher-generated completions (sequence-level KD, Kim & Rush 2016); the
on-policy draw then applies on top, as in the paper's Algorithm 1.

Prompt/completion split: in a causal-LM batch the prompt of a row is its attended tokens before
the first label that is not ``-100``. Generation is a pluggable callable
(:class:`~kdforge.train.generation.GenerateFn`): ``backend: transformers`` (default,
:class:`~kdforge.train.generation.HFGenerator`) or ``backend: vllm``
(:class:`~kdforge.train.vllm_generation.VLLMGenerator`: a colocated vLLM engine re-synced with the
student's weights every ``vllm.sync_every`` optimizer steps), or any callable passed as
``generate_fn``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError
from kdforge.train.config import FriendlyModel
from kdforge.train.generation import GenerateFn, HFGenerator, special_token_ids
from kdforge.train.vllm_generation import VLLMGenerator, VLLMSettings

__all__ = [
    "GenerateFn", "HFGenerator", "OnPolicyBatcher", "OnPolicyConfig", "VLLMSettings", "build_batch",
    "make_generator", "split_prompts",
]

#: former private name, still imported by :mod:`kdforge.eval.onpolicy`; use
#: :func:`kdforge.train.generation.special_token_ids`
_special_ids = special_token_ids


class OnPolicyConfig(FriendlyModel):
    """GKD settings.

    Attributes:
        lmbda: probability that a micro-batch uses student-generated completions (GKD's lambda;
            0 = supervised KD on the data, 1 = fully on-policy).
        seq_kd: replace completions by teacher generations first (sequence-level KD).
        temperature, top_p, top_k, max_new_tokens: sampling parameters of generation.
        pad_token_id, eos_token_id: default to the model's generation config / config.
        backend: ``transformers`` (``model.generate``) or ``vllm`` (colocated engine, GPU only).
        vllm: engine and weight-sync settings of ``backend: vllm``.
    """

    lmbda: float = Field(0.5, ge=0.0, le=1.0)
    seq_kd: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm: VLLMSettings | None = None

    @model_validator(mode="after")
    def _backend_settings(self) -> OnPolicyConfig:
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError("vllm: engine settings are given but backend is 'transformers'; "
                             "set backend: vllm or remove the vllm key")
        return self


def make_generator(config: OnPolicyConfig) -> GenerateFn:
    """The generation backend ``config.backend`` names (vLLM checks its package and GPU here)."""
    if config.backend == "vllm":
        return VLLMGenerator(config.vllm)
    return HFGenerator()


def split_prompts(batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Prompt token ids of each row: attended tokens before the first label != -100 (CPU, 1-D)."""
    input_ids = batch["input_ids"].cpu()
    attn = batch.get("attention_mask")
    attn = torch.ones_like(input_ids) if attn is None else attn.cpu()
    labels = batch.get("labels")
    if labels is None:
        raise DataError(
            "on-policy distillation needs `labels` to tell the prompt from the completion",
            "set labels to -100 on prompt tokens and to the token ids on completion tokens",
        )
    labels = labels.cpu()
    prompts = []
    for ids_row, attn_row, lab_row in zip(input_ids, attn, labels):
        keep = attn_row.bool()
        ids_row, lab_row = ids_row[keep], lab_row[keep]
        completion = (lab_row != IGNORE_INDEX).nonzero()
        cut = int(completion[0]) if len(completion) else len(ids_row)
        if cut == 0:
            raise DataError("a row has no prompt tokens (its first label is not -100)",
                            "mask the prompt part of each example with -100 in labels")
        prompts.append(ids_row[:cut].clone())
    return prompts


def build_batch(prompts: list[torch.Tensor], completions: list[torch.Tensor], pad_token_id: int,
                device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded ``{input_ids, attention_mask, labels}`` of prompt+completion rows.

    Labels are -100 on prompt and padding, the token ids on the completion.
    """
    rows = [torch.cat([p.long(), c.long().cpu()]) for p, c in zip(prompts, completions)]
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, : r.numel()] = r
        attn[i, : r.numel()] = 1
        labels[i, p.numel() : r.numel()] = r[p.numel() :]
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


class OnPolicyBatcher:
    """Turns a data batch into the batch GKD trains on (data, teacher- or student-generated).

    The on-policy draw for micro-batch ``m`` of step ``s`` is a pure function of
    ``(seed, s, m)``, so it is identical across processes and after a resume. A backend with a
    ``set_step(step)`` method (:class:`~kdforge.train.vllm_generation.VLLMGenerator`) is told the
    optimizer step before it generates, to know when the weights changed.
    """

    def __init__(self, config: OnPolicyConfig, generate_fn: GenerateFn | None = None, seed: int = 0) -> None:
        self.config = config
        self.generate_fn: GenerateFn = generate_fn or make_generator(config)
        self.seed = seed

    def use_student(self, step: int, micro: int) -> bool:
        if self.config.lmbda <= 0.0:
            return False
        return random.Random(f"gkd:{self.seed}:{step}:{micro}").random() < self.config.lmbda

    def __call__(self, batch: Mapping[str, torch.Tensor], *, student: torch.nn.Module,
                 teacher: torch.nn.Module | None, step: int, micro: int) -> tuple[dict[str, Any], str]:
        """Return ``(batch, source)`` with source ``"data"``, ``"teacher"`` or ``"student"``."""
        source = "data"
        out: dict[str, Any] = dict(batch)
        device = batch["input_ids"].device
        if self.config.seq_kd or self.use_student(step, micro):
            prompts = split_prompts(batch)
            set_step = getattr(self.generate_fn, "set_step", None)
            if callable(set_step):
                set_step(step)
            if self.config.seq_kd:
                if teacher is None:
                    raise ConfigError("seq_kd=True needs an online teacher module", "pass teacher=")
                from kdforge.train.tasks import teacher_module

                t_model = teacher_module(teacher)
                pad, _ = special_token_ids(t_model, self.config)
                out = build_batch(prompts, self.generate_fn(t_model, prompts, self.config), pad, device)
                source = "teacher"
            if self.use_student(step, micro):
                pad, _ = special_token_ids(student, self.config)
                out = build_batch(prompts, self.generate_fn(student, prompts, self.config), pad, device)
                source = "student"
        return out, source
