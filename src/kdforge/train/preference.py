"""Preference distillation: preference pairs from sampled answers, and DPO / rejection-SFT on them.

Two ways to say which of a student's sampled answers is better:

* a **checker** (Kimi k1.5 "long-to-short", Team Kimi 2025): among the correct answers to a
  prompt the *shortest* is chosen; every wrong answer and every strictly longer correct answer
  is a rejected partner (:func:`build_pairs`). No pair when no answer is correct, or when all
  are correct and equally long.
* the **teacher's likelihood** (LLaVA-MoD, Shu et al. 2024, preference stage): the answer the
  teacher finds most likely (mean log-prob per token) is chosen, the least likely rejected
  (:func:`teacher_pairs`).

Then either DPO against a frozen reference (the teacher, or the student before training;
:func:`kdforge.losses.preference.dpo_loss`) — :func:`train_dpo` — or rejection-sampled SFT on the
chosen answers only (cross-entropy on their tokens) — :func:`train_sft`. Both are short
single-process loops: a pair is two whole sequences, which the position-wise
:class:`~kdforge.train.Distiller` objective does not model.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kdforge.errors import DataError
from kdforge.losses.preference import dpo_loss, sequence_logprobs

__all__ = ["Answer", "PreferencePair", "build_pairs", "encode_responses", "response_logprobs",
           "teacher_pairs", "train_dpo", "train_sft"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """One sampled answer: its text, whether the checker accepts it, its length in tokens."""

    text: str
    correct: bool
    length: int


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def build_pairs(prompt: str, answers: Sequence[Answer], *, max_pairs: int | None = None,
                rng: random.Random | None = None) -> list[PreferencePair]:
    """Long-to-short pairs for one prompt: shortest correct answer vs each worse one.

    Rejected candidates are the wrong answers and the correct ones strictly longer than the
    chosen one (ties in length are not a preference), de-duplicated by text; with ``max_pairs``
    a random subset (``rng``) of them is kept, wrong answers first. Returns ``[]`` when no answer
    is correct.
    """
    correct = [a for a in answers if a.correct]
    if not correct:
        return []
    best = min(correct, key=lambda a: (a.length, a.text))
    wrong = list(dict.fromkeys(a.text for a in answers if not a.correct and a.text != best.text))
    longer = list(dict.fromkeys(a.text for a in correct if a.length > best.length))
    if max_pairs is not None:
        r = rng or random.Random(0)
        r.shuffle(wrong)
        r.shuffle(longer)
        picked = (wrong + longer)[:max_pairs]
    else:
        picked = wrong + longer
    return [PreferencePair(prompt, best.text, rejected) for rejected in picked]


def teacher_pairs(prompt: str, texts: Sequence[str], scores: Sequence[float]) -> list[PreferencePair]:
    """LLaVA-MoD-style pair: the answer with the highest teacher score (e.g. mean log-prob per
    token) chosen, the lowest rejected; ``[]`` when fewer than two distinct answers."""
    unique = dict(zip(texts, scores, strict=True))
    if len(unique) < 2:
        return []
    ranked = sorted(unique.items(), key=lambda kv: kv[1])
    return [PreferencePair(prompt, ranked[-1][0], ranked[0][0])]


def encode_responses(tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                     device: torch.device | str = "cpu", append_eos: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` of ``prompt + response (+ EOS)`` and ``labels``
    that keep only the response tokens (prompt and padding are -100), shifted for a causal LM:
    ``labels[:, t]`` is the token predicted at position ``t``. With ``append_eos`` the EOS token
    ends every response, so that a preference for short answers is a preference for stopping."""
    rows, label_rows = [], []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"]
        if not r_ids:
            raise DataError(f"empty response for prompt {p!r}", "drop empty answers before building pairs")
        if append_eos and tokenizer.eos_token_id is not None:
            r_ids = [*r_ids, int(tokenizer.eos_token_id)]
        ids = p_ids + r_ids
        rows.append(ids)
        label_rows.append([-100] * len(p_ids) + r_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), int(pad or 0), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        labels[i, : len(r) - 1] = torch.tensor(lab[1:])  # position t predicts token t+1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                      average: bool = False) -> torch.Tensor:
    """``[B]`` summed log-prob of the response tokens of ``batch`` (:func:`encode_responses`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"], average=average)


def _batches(n: int, batch_size: int, steps: int, rng: random.Random):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        yield order[:batch_size]
        order = order[batch_size:]


def train_dpo(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer,
              pairs: Sequence[PreferencePair], *, steps: int, batch_size: int = 8, lr: float = 1e-5,
              beta: float = 0.1, seed: int = 0,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """DPO on ``pairs`` for ``steps`` AdamW steps; the reference stays frozen.

    The reference log-probs are computed once per pair (no grad). Returns per-step
    ``{"loss", "margin", "chosen_logp"}`` (``margin`` = mean of ``(pi_c - ref_c) - (pi_r - ref_r)``).
    """
    if not pairs:
        raise DataError("DPO has no preference pairs", "sample more answers per prompt (k) or more prompts")
    device = next(policy.parameters()).device
    reference.eval()
    ref = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            prompts = [p.prompt for p in chunk]
            c = response_logprobs(reference, encode_responses(tokenizer, prompts, [p.chosen for p in chunk], device=device))
            r = response_logprobs(reference, encode_responses(tokenizer, prompts, [p.rejected for p in chunk], device=device))
            ref += list(zip(c.tolist(), r.tolist(), strict=True))
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    policy.train()
    history = []
    for step, idx in enumerate(_batches(len(pairs), min(batch_size, len(pairs)), steps, random.Random(seed))):
        chunk = [pairs[i] for i in idx]
        prompts = [p.prompt for p in chunk]
        both = encode_responses(tokenizer, prompts + prompts, [p.chosen for p in chunk] + [p.rejected for p in chunk],
                                device=device)
        logp = response_logprobs(policy, both)
        pc, pr = logp[: len(chunk)], logp[len(chunk):]
        rc = torch.tensor([ref[i][0] for i in idx], device=device)
        rr = torch.tensor([ref[i][1] for i in idx], device=device)
        loss = dpo_loss(pc, pr, rc, rr, beta=beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        row = {"loss": float(loss.detach()), "margin": float(((pc - rc) - (pr - rr)).detach().mean()),
               "chosen_logp": float(pc.detach().mean())}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    policy.eval()
    return history


def train_sft(policy: torch.nn.Module, tokenizer, examples: Sequence[tuple[str, str]], *, steps: int,
              batch_size: int = 8, lr: float = 1e-5, seed: int = 0) -> list[dict[str, float]]:
    """Rejection-sampled SFT: cross-entropy on the response tokens of ``(prompt, response)``."""
    if not examples:
        raise DataError("rejection-sampled SFT has no accepted answers",
                        "sample more answers per prompt (k) or more prompts")
    device = next(policy.parameters()).device
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    policy.train()
    history = []
    for idx in _batches(len(examples), min(batch_size, len(examples)), steps, random.Random(seed)):
        batch = encode_responses(tokenizer, [examples[i][0] for i in idx], [examples[i][1] for i in idx],
                                 device=device)
        n = (batch["labels"] != -100).sum().clamp(min=1)
        loss = -response_logprobs(policy, batch).sum() / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        history.append({"loss": float(loss.detach())})
    policy.eval()
    return history
