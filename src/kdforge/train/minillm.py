"""MiniLLM (Gu et al., ICLR 2024) on the engine: a sampler and a loss, no trainer of its own.

MiniLLM minimises the sequence-level reverse KL ``KL(q_theta || p)`` by policy gradient on
continuations of the training prompts. In kdforge it is three existing pieces put together:

* the continuations come from GKD's on-policy batcher
  (:class:`~kdforge.train.onpolicy.OnPolicyBatcher`, ``lmbda = 1``: every batch is sampled; the
  prompt/completion split, batch building and EOS handling are GKD's), with a generation backend
  that samples from the **teacher-mixed** distribution ``alpha * p + (1 - alpha) * q_theta``
  (:class:`TeacherMixedGenerator`; with ``alpha = 0`` it is GKD's own
  :class:`~kdforge.train.generation.HFGenerator`);
* the online teacher scores the samples (any teacher source that ``scores_new_samples``);
* the registered loss ``minillm`` (:func:`kdforge.losses.minillm.minillm_loss`) turns the student
  and teacher logits on the sampled tokens into the single-step-decomposed, importance-weighted,
  length-normalised policy gradient.

:func:`minillm_setup` returns the ``Distiller`` keywords (``on_policy``, ``generate_fn``) and
:func:`minillm_objective` fills the loss term's ``alpha`` / ``length_norm`` from one
:class:`MiniLLMConfig`, so the sampler and the importance weights cannot disagree::

    cfg = MiniLLMConfig(alpha=0.2, max_new_tokens=32)
    Distiller(student, teacher, task=CausalLMTask(), objective=minillm_objective([LossTerm("minillm", 1.0)], cfg),
              **minillm_setup(cfg, teacher), ...)
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from kdforge.errors import ConfigError, GenerationError
from kdforge.losses.minillm import mixture_log_probs
from kdforge.teachers.forward import extract_logits
from kdforge.train.config import FriendlyModel
from kdforge.train.generation import HFGenerator, SamplingSettings, cut_after_eos, special_token_ids
from kdforge.train.objective import LossTerm
from kdforge.train.onpolicy import OnPolicyConfig

__all__ = ["MiniLLMConfig", "TeacherMixedGenerator", "minillm_objective", "minillm_setup", "sample_mixed"]


class MiniLLMConfig(FriendlyModel):
    """MiniLLM settings.

    Attributes:
        alpha: teacher share of the sampling mixture ``alpha * p + (1 - alpha) * q`` (the paper: 0.2;
            0 = the student's own samples, importance weights 1).
        length_norm: mean (not sum) of the future rewards in the long-term policy gradient.
        max_new_tokens: length of the sampled continuations.
        pad_token_id, eos_token_id: default to the student's generation config / config.
    """

    alpha: float = Field(0.2, ge=0.0, le=1.0)
    length_norm: bool = True
    max_new_tokens: int = Field(32, ge=1)
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def on_policy(self) -> OnPolicyConfig:
        """GKD's batcher settings for MiniLLM: every micro-batch sampled, at temperature 1, no filter."""
        return OnPolicyConfig(lmbda=1.0, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=self.max_new_tokens,
                              pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)


def _module(teacher: Any) -> torch.nn.Module:
    from kdforge.train.tasks import teacher_module

    return teacher_module(teacher)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_pad(prompts: Sequence[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p.numel():
            ids[i, width - p.numel():] = p
            attn[i, width - p.numel():] = 1
    return ids, attn


class _Stepper:
    """One model's incremental forward (KV cache, positions from the attention mask)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.device, self.cache = model, _device(model), None
        # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` before)
        self.key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, **{self.key: self.cache})
        self.cache = getattr(out, self.key, None)
        if self.cache is None:
            raise GenerationError(f"{type(self.model).__name__} returned no KV cache ({self.key})",
                                  "use a Hugging Face causal LM that supports use_cache=True, or alpha: 0")
        return extract_logits(out)[:, -1].float()


@torch.no_grad()
def sample_mixed(student: torch.nn.Module, teacher: Any, prompts: Sequence[torch.Tensor], alpha: float,
                 config: SamplingSettings, *, return_logprobs: bool = False) -> Any:
    """Sample one continuation per prompt from ``alpha * p_teacher + (1 - alpha) * q_student``.

    Token by token (temperature 1, no top-k/top-p: MiniLLM's importance weights need the exact
    sampling distribution), both models with their KV caches, prompts left-padded and positions
    taken from the attention mask. A row stops after its first EOS (kept); the teacher's logits
    are cut to the student's vocabulary (a teacher whose vocabulary only pads the student's).

    Args:
        student, teacher: causal LMs sharing a tokenizer (``teacher`` may be an ``OnlineTeacher``).
        prompts: 1-D token-id tensors (no padding).
        alpha: teacher share of the mixture, in ``[0, 1]``.
        config: sampling settings (``max_new_tokens``, ``pad_token_id``, ``eos_token_id``).
        return_logprobs: also return each sampled token's log-probability under the mixture.

    Returns:
        a list of 1-D int64 CPU tensors (and, with ``return_logprobs``, a list of float tensors of
        the same lengths).
    """
    t_model = _module(teacher)
    pad, eos = special_token_ids(student, config)
    ids, attn = _left_pad(prompts, pad)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    modes = (student.training, t_model.training)
    student.eval()
    t_model.eval()
    try:
        s_step, t_step = _Stepper(student), _Stepper(t_model)
        s_logits, t_logits = s_step(ids, attn, pos), t_step(ids, attn, pos).to(_device(student))
        vocab = s_logits.shape[-1]
        if t_logits.shape[-1] < vocab:
            raise ConfigError(f"the teacher's vocabulary ({t_logits.shape[-1]}) is smaller than the student's "
                              f"({vocab}); teacher-mixed sampling needs one vocabulary",
                              "use a teacher and student that share a tokenizer, or alpha: 0")
        done = torch.zeros(len(prompts), dtype=torch.bool, device=s_logits.device)
        tokens, logprobs = [], []
        for _ in range(config.max_new_tokens):
            logmix = mixture_log_probs(torch.log_softmax(s_logits, -1),
                                       torch.log_softmax(t_logits[:, :vocab], -1), alpha)
            tok = torch.multinomial(logmix.exp(), 1).squeeze(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens.append(tok)
            logprobs.append(logmix.gather(-1, tok[:, None]).squeeze(-1))
            if eos is not None:
                done = done | (tok == eos)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], -1)
            pos = pos[:, -1:] + 1
            s_logits = s_step(tok[:, None], attn, pos)
            t_logits = t_step(tok[:, None], attn, pos).to(s_logits.device)
    except (ConfigError, GenerationError):
        raise
    except Exception as exc:
        raise GenerationError(f"teacher-mixed sampling with {type(student).__name__} failed: {exc}",
                              "use Hugging Face causal LMs that accept past_key_values and position_ids, "
                              "or alpha: 0 (plain student sampling)") from exc
    finally:
        student.train(modes[0])
        t_model.train(modes[1])
    rows = torch.stack(tokens, 1).cpu()
    outs = [cut_after_eos(row, eos) for row in rows]
    if not return_logprobs:
        return outs
    lps = torch.stack(logprobs, 1).cpu()
    return outs, [lp[: o.numel()] for lp, o in zip(lps, outs)]


class TeacherMixedGenerator:
    """A GKD generation backend (:class:`~kdforge.train.generation.GenerateFn`) that samples from
    ``alpha * p_teacher + (1 - alpha) * q_student`` (:func:`sample_mixed`); ``alpha = 0`` is GKD's
    :class:`~kdforge.train.generation.HFGenerator` (the student's ``generate``)."""

    def __init__(self, teacher: Any, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"MiniLLM alpha must lie in [0, 1], got {alpha}", "use e.g. alpha=0.2 (the paper's)")
        self.teacher, self.alpha = teacher, float(alpha)
        self._plain = HFGenerator()

    def __call__(self, model: torch.nn.Module, prompts: list[torch.Tensor], config: SamplingSettings,
                 ) -> list[torch.Tensor]:
        if self.alpha == 0.0:
            return self._plain(model, prompts, config)
        return sample_mixed(model, self.teacher, prompts, self.alpha, config)

    def __repr__(self) -> str:
        return f"TeacherMixedGenerator(alpha={self.alpha})"


def minillm_setup(config: MiniLLMConfig, teacher: Any) -> dict[str, Any]:
    """``Distiller`` keywords for MiniLLM: ``on_policy`` (every batch sampled) and ``generate_fn``
    (teacher-mixed sampling with ``teacher``, the same model the trainer scores with)."""
    return {"on_policy": config.on_policy(), "generate_fn": TeacherMixedGenerator(teacher, config.alpha)}


def minillm_objective(terms: Sequence[LossTerm], config: MiniLLMConfig) -> list[LossTerm]:
    """Copies of ``terms`` whose ``minillm`` terms get ``alpha`` and ``length_norm`` from ``config``.

    Raises:
        ConfigError: no ``minillm`` term, one that sets ``alpha`` / ``length_norm`` to other values, or
            a temperature other than 1 (the sampler's).
    """
    out = [copy.deepcopy(t) for t in terms]
    hits = [t for t in out if t.name == "minillm" and t.source == "loss"]
    if not hits:
        raise ConfigError("MiniLLM needs a {name: minillm} term in the objective (the policy-gradient loss)",
                          "add {name: minillm, weight: 1.0} to the method's objective")
    wanted = {"alpha": config.alpha, "length_norm": config.length_norm}
    for term in hits:
        if term.params.get("temperature", 1.0) != 1.0:
            raise ConfigError(f"the minillm term sets temperature={term.params['temperature']}, but MiniLLM samples "
                              "at temperature 1 (the policy gradient needs the distribution the samples came from)",
                              "remove the temperature of the minillm term")
        for key, value in wanted.items():
            if key in term.params and term.params[key] != value:
                raise ConfigError(f"the minillm term sets {key}={term.params[key]!r} but the minillm settings say "
                                  f"{value!r}", f"set {key} once, in the minillm settings (the sampler reads it too)")
        term.params.update(wanted)
    return out
