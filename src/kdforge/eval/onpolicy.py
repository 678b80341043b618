"""On-policy fidelity: how the teacher judges what the *student itself* generates.

The off-policy metrics of :mod:`kdforge.eval.lm` / :mod:`kdforge.eval.fidelity` score a student on
held-out *reference* text (teacher forcing). At inference a student conditions on its own
samples instead, and an error early in a continuation moves it to prefixes the training data
never showed (exposure bias). GKD (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes") trains on such prefixes; this module measures
them:

1. for each held-out prompt ``x`` the student samples a continuation ``y ~ q_S(. | x)``
   (the same sampler as training, :class:`~kdforge.train.onpolicy.HFGenerator` by default);
2. teacher and student score ``x + y``; over the ``N`` generated tokens ``y_t``:

   * ``teacher_nll = -(1/N) sum_t log p_T(y_t | x, y_<t)`` — how likely the teacher finds the
     student's text (a Monte-Carlo estimate of the cross-entropy ``H(q_S, p_T)`` per token;
     lower = text the teacher would write);
   * ``student_nll = -(1/N) sum_t log q_S(y_t | x, y_<t)`` — the student's own per-token entropy
     estimate (a collapsing, repetitive student has a low one);
   * ``kl_from_teacher = KL(q_S || p_T)``, ``kl_to_teacher = KL(p_T || q_S)``, ``js_to_teacher``
     and top-1 ``agreement``, full-vocabulary, per position of the student's own prefixes
     (:class:`~kdforge.eval.fidelity.FidelityAccumulator`). ``kl_from_teacher`` is the reverse
     KL that on-policy GKD with ``beta -> 1`` minimises;
   * ``distinct_2``: distinct token bigrams / all bigrams over the continuations (degeneration);
     ``mean_length`` and ``eos_rate`` of the continuations.

All token means are over real generated tokens of all prompts (summed first, divided once).
The sampling is seeded (``seed``), so two students are compared on the same prompts with the
same random stream; it is still a sample: report the number of tokens and, if it matters, seeds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from kdforge.errors import DataError
from kdforge.eval.fidelity import FidelityAccumulator
from kdforge.train.onpolicy import (
    IGNORE_INDEX,
    GenerateFn,
    HFGenerator,
    OnPolicyConfig,
    _special_ids,
    build_batch,
)

log = logging.getLogger(__name__)

__all__ = ["ONPOLICY_KEYS", "onpolicy_fidelity", "sample_continuations", "score_continuations"]

#: Keys of :func:`score_continuations` / :func:`onpolicy_fidelity`, in display order.
ONPOLICY_KEYS: tuple[str, ...] = (
    "teacher_nll", "student_nll", "kl_from_teacher", "kl_to_teacher", "js_to_teacher", "agreement",
    "distinct_2", "mean_length", "eos_rate", "n_tokens",
)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_continuations(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    config: OnPolicyConfig,
    *,
    generate_fn: GenerateFn | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Sample one continuation per prompt (1-D token ids, no prompt), in batches, seeded.

    The global torch RNG is forked, so calling this does not change later training randomness.
    """
    if not prompts:
        raise DataError("no prompts to continue", "pass at least one non-empty prompt")
    gen = generate_fn or HFGenerator()
    out: list[torch.Tensor] = []
    devices = [_device(model)] if _device(model).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            out.extend(gen(model, list(prompts[i: i + batch_size]), config))
    return out


def _distinct_2(completions: Sequence[torch.Tensor]) -> tuple[int, int]:
    grams: set[tuple[int, int]] = set()
    total = 0
    for c in completions:
        ids = c.tolist()
        pairs = list(zip(ids, ids[1:]))
        grams.update(pairs)
        total += len(pairs)
    return len(grams), total


@torch.no_grad()
def score_continuations(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    completions: Sequence[torch.Tensor],
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Teacher and student metrics on given continuations (see the module docstring).

    Args:
        student, teacher: causal LMs over the same vocabulary (logits ``[B, L, V]``).
        prompts: 1-D prompt ids; completions: 1-D continuation ids (same length as ``prompts``).
        pad_token_id: padding id of the scored batch (masked out, its value does not matter).
        eos_token_id: counted for ``eos_rate`` (a continuation that ends with it).

    Returns:
        ``{key: float}`` for :data:`ONPOLICY_KEYS` (token means; ``nan`` when nothing was generated).
    """
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts but {len(completions)} completions",
                        "pass one completion per prompt")
    fid = FidelityAccumulator(chunk_size=chunk_size)
    t_nll = s_nll = 0.0
    n = 0
    s_dev, t_dev = _device(student), _device(teacher)
    s_was, t_was = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            p, c = list(prompts[i: i + batch_size]), list(completions[i: i + batch_size])
            if not any(x.numel() for x in c):
                continue
            batch = build_batch(p, c, pad_token_id, "cpu")
            ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            target = labels[:, 1:]
            mask = target != IGNORE_INDEX
            s_logits = student(input_ids=ids.to(s_dev), attention_mask=attn.to(s_dev)).logits[:, :-1].float()
            t_logits = teacher(input_ids=ids.to(t_dev), attention_mask=attn.to(t_dev)).logits[:, :-1].float()
            t_logits = t_logits.to(s_logits.device)
            mask_d, tgt = mask.to(s_logits.device), target.clamp_min(0).to(s_logits.device)
            fid.update(s_logits, t_logits, mask_d)
            for logits, acc_name in ((s_logits, "s"), (t_logits, "t")):
                tok = torch.log_softmax(logits, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                value = -float(tok[mask_d].double().sum())
                if acc_name == "s":
                    s_nll += value
                else:
                    t_nll += value
            n += int(mask.sum())
    finally:
        student.train(s_was)
        teacher.train(t_was)
    distinct, total = _distinct_2(completions)
    lengths = [int(c.numel()) for c in completions]
    ends = sum(1 for c in completions if eos_token_id is not None and c.numel() and int(c[-1]) == eos_token_id)
    f = fid.compute("token")
    return {
        "teacher_nll": t_nll / n if n else math.nan,
        "student_nll": s_nll / n if n else math.nan,
        "kl_from_teacher": f["kl_from_teacher"],
        "kl_to_teacher": f["kl_to_teacher"],
        "js_to_teacher": f["js_to_teacher"],
        "agreement": f["agreement"],
        "distinct_2": distinct / total if total else math.nan,
        "mean_length": sum(lengths) / len(lengths),
        "eos_rate": ends / len(completions),
        "n_tokens": float(n),
    }


def onpolicy_fidelity(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    config: OnPolicyConfig,
    *,
    generate_fn: GenerateFn | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Sample continuations of ``prompts`` from ``student`` and score them with ``teacher``.

    Pass the teacher as ``student`` to get the reference row (the teacher on its own samples:
    ``kl_*`` are 0 and ``teacher_nll`` is the teacher's own entropy estimate).

    Example:
        >>> cfg = OnPolicyConfig(max_new_tokens=32, temperature=1.0)            # doctest: +SKIP
        >>> onpolicy_fidelity(student, teacher, [blk[:64] for blk in held_out], cfg)["teacher_nll"]
    """
    completions = sample_continuations(student, prompts, config, generate_fn=generate_fn, seed=seed,
                                       batch_size=batch_size)
    pad, eos = _special_ids(student, config)
    out: dict[str, Any] = score_continuations(student, teacher, prompts, completions, pad_token_id=pad,
                                              eos_token_id=eos, batch_size=batch_size)
    out["n_prompts"] = len(prompts)
    return out
