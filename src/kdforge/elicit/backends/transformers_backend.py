"""Local Hugging Face ``transformers`` backend: batched ``generate`` with left padding.

Prompts that are chat messages go through ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)``; plain-text prompts are tokenized as they are. A batch is
left-padded (decoder-only models continue from the last real token, so padding must be on the
left) and generated in one ``model.generate`` call; the returned text is decoded from the new
tokens only, cut at the first stop string.

Sampling and seeds: ``temperature: 0`` is greedy and independent of batching. With sampling,
``torch`` draws one random stream per ``generate`` call, so the batch is seeded with the seed of
its first request: re-running the same job with the same ``batch_size`` reproduces it, a
different batch composition gives different (equally valid) samples.

Also provides :meth:`TransformersBackend.score_continuations`: exact log-likelihood of given
continuations (used by labeling to score each candidate label).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from kdforge.elicit.backends.base import Backend, register_backend, truncate_at_stop
from kdforge.elicit.backends.config import TransformersConfig
from kdforge.elicit.types import GenerationRequest, GenerationResult, Message
from kdforge.errors import ConfigError, DeviceError, GenerationError, KdforgeError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}", "use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available",
                          "use device: auto or device: cpu")
    return dev


def resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@register_backend("transformers")
class TransformersBackend(Backend):
    """A local causal LM as the teacher.

    Args:
        model: a loaded ``PreTrainedModel`` or a Hub id / local folder to load.
        tokenizer: a loaded tokenizer, a path, or ``None`` (same as ``model``).
        device / dtype: where and how to run (``"auto"``: CUDA in bf16 if available, else CPU
            fp32).
        batch_size: prompts per ``generate`` call.
        chat_template: apply the tokenizer's chat template to chat prompts.
        gguf_file: load a GGUF file inside ``model`` (dequantised by transformers).
    """

    name = "transformers"
    concurrency = 1

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        chat_template: bool = True,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        import torch

        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.use_chat_template = chat_template
        # kdforge.models reads the names (asset smollm2 / asset:smollm2, folder, .gguf file, Hub id) and
        # fails like `kdforge run` does
        from kdforge.models import ModelSource, load_causal_lm, load_tokenizer, resolve_model_path

        def source(name: str) -> ModelSource:
            return ModelSource(model=name, device=str(self.device), trust_remote_code=trust_remote_code,
                               dtype=str(resolve_dtype(dtype, self.device)).replace("torch.", ""))

        if isinstance(model, str | Path):
            self.model_name = str(model)
            name = str(Path(resolve_model_path(str(model))) / gguf_file) if gguf_file else str(model)
            model = load_causal_lm(source(name), what="teacher")
        else:
            name = None
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", "model") or "model"
            if dtype != "auto":
                model = model.to(resolve_dtype(dtype, self.device))
        if tokenizer is None or isinstance(tokenizer, str | Path):
            tokenizer = load_tokenizer(source(str(tokenizer) if tokenizer is not None else name or self.model_name),
                                       what="teacher" if tokenizer is None else "tokenizer")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ConfigError("the tokenizer has neither a pad nor an eos token",
                                  "set tokenizer.pad_token before building the backend")
            tokenizer.pad_token = tokenizer.eos_token
        self._torch = torch
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: TransformersConfig) -> TransformersBackend:
        return cls(cfg.model, cfg.tokenizer, device=cfg.device, dtype=cfg.dtype,
                   batch_size=cfg.batch_size, chat_template=cfg.chat_template,
                   gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "device": str(self.device),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "batch_size": self.batch_size}

    # ---- prompts ---------------------------------------------------------------------------
    def render(self, prompt: str | list[Message]) -> str:
        """The exact text fed to the model for a prompt (chat template applied to messages)."""
        if isinstance(prompt, str):
            return prompt
        if not self.use_chat_template:
            return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of {self.model_name!r} has no chat template, but the prompts are chat messages",
                "give plain-text prompts (prompt.chat: false), or set backend.chat_template: false",
            )
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: list[str], *, side: str) -> Any:
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = side
        try:
            # chat templates already contain the special tokens they need
            return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        finally:
            tok.padding_side = old

    # ---- generation ------------------------------------------------------------------------
    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        try:
            return await asyncio.to_thread(self._generate_sync, requests)
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except Exception as exc:  # a failed batch fails its requests, not the process
            if isinstance(exc, KdforgeError):  # already says what is wrong and how to fix it
                return [exc] * len(requests)
            return [GenerationError(f"local generation failed: {type(exc).__name__}: {exc}",
                                    "check the model, prompt lengths and device memory "
                                    "(lower backend.batch_size for out-of-memory)")] * len(requests)

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        torch = self._torch
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one generate call per distinct sampling setting
            key = repr(sorted((k, v) for k, v in r.params.items() if k != "seed"))
            groups.setdefault(key, []).append(i)
        out: list[GenerationResult | BaseException] = [GenerationError("not generated")] * len(requests)
        with self._lock, torch.inference_mode():
            for idx in groups.values():
                batch = [requests[i] for i in idx]
                for i, res in zip(idx, self._generate_group(batch), strict=True):
                    out[i] = res
        self.stats.requests += len(requests)
        return out

    def _generate_group(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        torch = self._torch
        p = batch[0].params
        enc = self._encode([self.render(r.prompt) for r in batch], side="left")
        do_sample = p["temperature"] > 0
        gen_kw: dict[str, Any] = {"max_new_tokens": p["max_tokens"], "do_sample": do_sample,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            gen_kw.update(temperature=p["temperature"], top_p=p["top_p"], top_k=0)
            if p.get("seed") is not None:
                torch.manual_seed(int(p["seed"]))
        else:  # greedy: silence sampling defaults a model's generation_config may carry
            gen_kw.update(temperature=None, top_p=None, top_k=None)
        if p.get("stop"):
            gen_kw.update(stop_strings=list(p["stop"]), tokenizer=self.tokenizer)
        seqs = self.model.generate(**enc, **gen_kw)
        new = seqs[:, enc["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        results = []
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        for row, plen in zip(new.tolist(), prompt_lens, strict=True):
            n = 0
            hit_eos = False
            for t in row:
                if t in eos_ids:
                    hit_eos = True
                    break
                n += 1
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, p.get("stop") or [])
            results.append(GenerationResult(
                text=text, finish_reason="stop" if (hit_eos or stopped) else "length",
                prompt_tokens=int(plen), completion_tokens=n, model=self.model_name))
        return results

    # ---- scoring ---------------------------------------------------------------------------
    def score_continuations(self, prompt: str | list[Message], continuations: list[str]) -> list[float]:
        """Sum of token log-probabilities (nats) of each continuation after ``prompt``.

        ``log p(c | x) = sum_t log softmax(logits_{t-1})[c_t]`` over the continuation tokens
        only; the prompt is rendered exactly as for generation (chat template included).
        """
        return self.score_many([prompt], continuations)[0]

    def score_many(self, prompts: list[str | list[Message]], continuations: list[str],
                   *, batch_size: int | None = None) -> list[list[float]]:
        """:meth:`score_continuations` for many prompts, batched: ``[len(prompts)][len(continuations)]``."""
        if not continuations:
            return [[] for _ in prompts]
        cont_ids = []
        for c in continuations:
            ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"continuation {c!r} tokenizes to nothing", "use non-empty label words")
            cont_ids.append(ids)
        prefixes = [self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
        if all(len(ids) == 1 for ids in cont_ids):
            # one-token continuations (label verbalizers): one forward per prompt scores them all
            # from the next-token distribution at its last position (same numbers, 1/k the work)
            first = [ids[0] for ids in cont_ids]
            step = max(1, (batch_size or self.batch_size))
            out: list[list[float]] = []
            for i in range(0, len(prefixes), step):
                out.extend(self._score_next(prefixes[i:i + step], first))
            return out
        pairs = [(prefix, ids) for prefix in prefixes for ids in cont_ids]
        step = max(1, (batch_size or self.batch_size)) * len(cont_ids)
        flat: list[float] = []
        for i in range(0, len(pairs), step):
            flat.extend(self._score_pairs(pairs[i:i + step]))
        k = len(cont_ids)
        return [flat[j * k:(j + 1) * k] for j in range(len(prompts))]

    def _score_next(self, prefixes: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """``log p(token | prefix)`` for each prefix (right-padded batch) and each token id."""
        torch = self._torch
        width = max(len(r) for r in prefixes)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in prefixes], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in prefixes], device=self.device)
        last = torch.tensor([len(r) - 1 for r in prefixes], device=self.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[torch.arange(len(prefixes), device=self.device), last].float(), dim=-1)
        return logp[:, token_ids].tolist()

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        torch = self._torch
        rows = [p + c for p, c in pairs]
        spans = [(len(p), len(p) + len(c)) for p, c in pairs]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_lp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, width-1]
        return [float(tok_lp[b, s - 1:e - 1].sum()) for b, (s, e) in enumerate(spans)]
