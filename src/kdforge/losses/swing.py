"""Swing distillation: temperature raised where a position is likely private, plus noisy soft targets.

Li et al., *Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework* (2022).
Plain KD copies what the teacher memorised: where its training data held a secret (a phone
number, an e-mail), the teacher's sharp next-token distribution teaches the secret to the
student. Swing distillation gives each position ``i`` its own temperature from the likelihood
``pi_i in [0, 1]`` that the position is private,

    ``T_i = T + pi_i * (T_private - T)``,

so the teacher's distribution there is flattened toward uniform (the secret's token gets no more
mass than its neighbours), and it perturbs the soft targets with noise,

    ``log p~_i = log_softmax(z^t_i / T_i + sigma_i * eps_i)``, ``eps ~ N(0, I)``,
    ``sigma_i = noise * (pi_i if noise_private_only else 1)``,

before the usual ``T_i^2 * KL(p~_i || softmax(z^s_i / T_i))``. With ``pi = 0`` everywhere and
``noise = 0`` it is plain :func:`~kdforge.losses.forward_kl` at ``T`` (tested).

Where ``pi`` comes from: ``privacy=`` a tensor ``[...]`` from any scorer (e.g.
:func:`pii_char_flags` mapped to tokens), or ``private_ids=`` token/class ids whose *target*
(``labels``) marks a position private (the target is what the teacher's distribution at that
position would leak; e.g. the ids of digit tokens from :func:`pii_token_ids`). The canary
exposure of :mod:`kdforge.eval.exposure` measures the leakage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from kdforge.errors import ConfigError
from kdforge.losses._core import (
    Teacher,
    check_positions,
    check_reduction,
    check_student,
    check_teacher,
    check_temperature,
    diagnose_nonfinite,
    kl,
    real_positions,
    reduce,
    select,
    upcast,
    value_checks_enabled,
)
from kdforge.losses.signal import SparseTeacher
from kdforge.losses.spec import register_loss

__all__ = ["PII_PATTERNS", "pii_char_flags", "pii_token_ids", "swing_kd", "swing_temperatures"]

#: regexes of the simple PII detector: e-mail addresses, phone-like numbers, any digit run
PII_PATTERNS: dict[str, str] = {
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "phone": r"\+?\d[\d\s().-]{6,}\d",
    "digits": r"\d+",
}


def pii_char_flags(text: str, patterns: Iterable[str] = ("email", "phone", "digits")) -> list[bool]:
    """Per character of ``text``: True inside a match of one of :data:`PII_PATTERNS` (by name) or
    of a regex given directly."""
    flags = [False] * len(text)
    for name in patterns:
        for m in re.finditer(PII_PATTERNS.get(name, name), text):
            flags[m.start():m.end()] = [True] * (m.end() - m.start())
    return flags


def pii_token_ids(vocab: Sequence[str] | dict[str, int], pattern: str = r"\d") -> list[int]:
    """Ids of the tokens whose text matches ``pattern`` (default: contains a digit): the
    ``private_ids`` of :func:`swing_kd` for a tokenizer's vocabulary (``tokenizer.get_vocab()``)
    or a list of token strings."""
    items = vocab.items() if isinstance(vocab, dict) else ((tok, i) for i, tok in enumerate(vocab))
    rx = re.compile(pattern)
    return sorted(i for tok, i in items if rx.search(tok))


def swing_temperatures(privacy: torch.Tensor, temperature: float, private_temperature: float) -> torch.Tensor:
    """``T_i = T + pi_i * (T_private - T)`` for privacy scores ``pi`` in ``[0, 1]``."""
    return temperature + privacy.clamp(0.0, 1.0) * (private_temperature - temperature)


@register_loss("swing_kd",
               description="swing distillation: per-position temperature up where private, noisy soft targets",
               paper="Li et al. 2022, Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework",
               sparse_ok=False)
def swing_kd(
    student_logits: torch.Tensor,
    teacher: Teacher,
    *,
    private_temperature: float = 8.0,
    noise: float = 0.0,
    noise_private_only: bool = False,
    private_ids: list[int] | None = None,
    privacy: torch.Tensor | None = None,
    seed: int | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Swing distillation (module docstring): ``T_i^2 KL(p~_i || q_i)`` at per-position ``T_i``.

    Args:
        student_logits: ``[..., V]``.
        teacher: dense teacher logits ``[..., V]``.
        private_temperature: ``T_private``, the temperature of a surely private position.
        noise: ``sigma``, std of the Gaussian noise on the teacher's tempered logits (0: none).
        noise_private_only: scale the noise by ``pi_i`` (only private positions get it).
        private_ids: ids whose presence in ``labels`` makes a position private (``pi = 1``).
        privacy: ``pi`` ``[...]`` in ``[0, 1]`` from a scorer (max-combined with ``private_ids``).
        seed: seed of the noise (None: the global RNG).
        mask, temperature, reduction, labels, check_finite: as :func:`~kdforge.losses.forward_kl`
            (``temperature`` is ``T`` of the non-private positions).
    """
    check_student(student_logits)
    if isinstance(teacher, SparseTeacher):
        raise ConfigError("swing_kd needs dense teacher logits, got a SparseTeacher", "use a live or dense teacher")
    check_teacher(student_logits, teacher)
    check_temperature(temperature)
    check_temperature(private_temperature)
    check_reduction(reduction)
    if noise < 0:
        raise ConfigError(f"swing_kd noise must be >= 0, got {noise}", "use noise=0 for none")
    lead = tuple(student_logits.shape[:-1])
    check_positions("mask", mask, lead)
    check_positions("privacy", privacy, lead)
    pi = torch.zeros(lead, device=student_logits.device) if privacy is None else \
        privacy.to(student_logits.device, torch.float32).clamp(0.0, 1.0)
    if private_ids:
        if labels is None:
            raise ConfigError("swing_kd private_ids mark positions by their labels, but no labels were given",
                              "pass labels (the next-token targets), or privacy= scores")
        check_positions("labels", labels, lead)
        ids = torch.tensor(private_ids, device=student_logits.device)
        pi = torch.maximum(pi, torch.isin(labels.to(student_logits.device), ids).float())
    real = real_positions(lead, mask, student_logits.device)
    s = upcast(select(student_logits, real))
    t = upcast(select(teacher.detach(), real))
    pi = select(pi.unsqueeze(-1), real).squeeze(-1)
    temps = swing_temperatures(pi, temperature, private_temperature).to(s.dtype).unsqueeze(-1)
    t_scaled = t / temps
    if noise > 0:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=t.device).manual_seed(seed)
        eps = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
        sigma = noise * (pi.unsqueeze(-1).to(t.dtype) if noise_private_only else 1.0)
        t_scaled = t_scaled + sigma * eps
    logp = torch.log_softmax(t_scaled, -1)
    logq = torch.log_softmax(s / temps, -1)
    per_pos = kl(logp, logq) * temps.squeeze(-1) ** 2
    if check_finite and value_checks_enabled() and per_pos.numel() and not bool(torch.isfinite(per_pos.detach()).all()):
        raise diagnose_nonfinite("swing_kd", s, t)
    return reduce(per_pos, real, lead, reduction)
