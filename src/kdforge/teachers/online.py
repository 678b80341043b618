"""Online teacher: a frozen language model queried for logits or its top-k distribution.

The teacher is frozen (``requires_grad_(False)``), put in ``eval()`` mode and run under
``torch.no_grad()`` on its own device and dtype, so it can sit on another GPU than the student
or in bf16 while the student trains in fp32. Outputs are returned on the device of the
``input_ids`` passed in.

``torch.no_grad`` rather than ``torch.inference_mode``: inference tensors cannot be saved for
backward, and a KD loss multiplies the teacher's probabilities with the student's log-probs,
which autograd must save. ``no_grad`` tensors are ordinary constants for the student's graph.

Top-k (the sparse signal of FIRST, MiniPLM offline inference and DistillKit) is computed without
materialising a float32 copy of the ``[B, T, V]`` logits: ids come from ``topk`` on the raw
logits (monotone in the log-probs), the normaliser ``logsumexp`` is computed in float32 over
chunks of positions.

Example::

    teacher = load_teacher("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16")
    signal = teacher.topk(input_ids, attention_mask, k=16)   # SparseTeacher [B, T, 16]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import AssetError, ConfigError, DeviceError, ShapeError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.forward import check_lm_input, run_model, run_model_features
from kdforge.teachers.forward import extract_logits as _extract_logits
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bfloat16"``/``"bf16"``/... or a ``torch.dtype`` to a ``torch.dtype`` (``None``/"auto" -> None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(sorted(_DTYPES))}"
        ) from None


#: rows per block of :func:`topk_logprobs` (a ``[32, V]`` float32 buffer stays in cache)
_TOPK_BLOCK_ROWS = 32


def topk_logprobs(logits: torch.Tensor, k: int, *, chunk_tokens: int = 1024) -> SparseTeacher:
    """Top-k ids and full-vocabulary log-probabilities (T=1) of ``logits`` ``[..., V]``.

    ``logprob_i = z_i - logsumexp(z)`` with the normaliser in float32. Memory: one float32
    ``[min(chunk_tokens, 32), V]`` block at a time instead of a float32 copy of all logits.

    The rows are processed in blocks of 32 through one small reused float32 buffer: the top-k of
    the logits (of their float32 copy in the buffer for other dtypes) gives the ids, then one
    fused ``log_softmax`` pass writes the block's log-probabilities into the same buffer, from
    which the ``k`` entries are gathered. Same values as ``log_softmax`` on a float32 copy; top-k
    and normaliser together measured 107-122 vs 134-138 CPU ms per ``[1024, 49152]`` float32
    block against the previous ``sub``/``exp``/``sum`` passes (1 thread, shared box), a per-token
    cost the teacher-cache build pays on top of the forward (a fresh block-sized buffer would cost
    as much again in page faults).

    Returns:
        :class:`SparseTeacher` with ``ids`` int64 and ``logprobs`` float32, ``[..., k]``, sorted
        by decreasing probability.
    """
    vocab = int(logits.shape[-1])
    if k < 1:
        raise ConfigError(f"top-k needs k >= 1, got {k}", "choose e.g. k=16")
    k = min(k, vocab)
    flat = logits.reshape(-1, vocab)
    ids_out = torch.empty(flat.shape[0], k, dtype=torch.int64, device=logits.device)
    lp_out = torch.empty(flat.shape[0], k, dtype=torch.float32, device=logits.device)
    rows = max(1, min(chunk_tokens, _TOPK_BLOCK_ROWS))
    buf = torch.empty(min(rows, flat.shape[0]), vocab, dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        raw = flat[start : start + rows]
        work = buf[: raw.shape[0]]
        if raw.dtype != torch.float32:
            raw = work.copy_(raw)  # the float32 copy: top-k and normaliser on the same values as before
        ids = raw.topk(k, dim=-1).indices
        logp = torch.ops.aten._log_softmax.out(raw, -1, False, out=work)  # in place for a copy
        ids_out[start : start + rows] = ids
        torch.gather(logp, 1, ids, out=lp_out[start : start + rows])
    lead = tuple(logits.shape[:-1])
    return SparseTeacher(ids_out.reshape(*lead, k), lp_out.reshape(*lead, k), vocab)


class OnlineTeacher(TeacherSource):
    """A frozen teacher model producing logits or a sparse top-k signal.

    Args:
        model: any ``AutoModelForCausalLM`` or ``nn.Module`` whose forward takes
            ``input_ids`` (and ``attention_mask``) and returns logits ``[B, T, V]`` (a tensor, a
            tuple whose first item is the logits, or an object with ``.logits``).
        device: where the teacher runs (default: where its parameters already are).
        dtype: the teacher's parameter dtype (``"bfloat16"``, ``torch.float16``...; default: keep).
        vocab_size: if set, logits are sliced to ``[..., :vocab_size]`` (drops embedding padding
            rows beyond the tokenizer; see :mod:`kdforge.teachers.vocab`).
        name: identifier written to cache manifests (default: ``model.config._name_or_path``).

    As a :class:`~kdforge.teachers.sources.TeacherSource` it gives dense logits (and captured
    features) at the task's loss positions. Given an explicit ``device``, it stays there (a second
    GPU, say); otherwise the trainer places it on its own device.
    """

    provides = frozenset({"dense", "features"})
    scores_new_samples = True

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        vocab_size: int | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"OnlineTeacher needs a torch nn.Module, got {type(model).__name__}",
                "load the model with load_teacher(...) or AutoModelForCausalLM.from_pretrained",
            )
        torch_dtype = resolve_dtype(dtype)
        if device is not None or torch_dtype is not None:
            try:
                model = model.to(device=device, dtype=torch_dtype)
            except (RuntimeError, AssertionError) as exc:
                raise DeviceError(
                    f"cannot move the teacher to device={device} dtype={torch_dtype}: {exc}",
                    "check that the device exists (torch.cuda.is_available()) and has memory",
                ) from None
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.pinned = device is not None
        self.vocab_size = vocab_size
        config = getattr(model, "config", None)
        self.name = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self._weights_hash: str | None = None

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.model.parameters()).dtype
        except StopIteration:
            return torch.float32

    def train(self, mode: bool = True) -> OnlineTeacher:
        """The teacher always stays in eval mode; calling ``train()`` is a no-op by design."""
        self.model.eval()
        return self

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ShapeError(
                f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}",
                "add a batch dimension with input_ids.unsqueeze(0)",
            )
        check_lm_input(self.model, input_ids, "teacher")  # ids within the vocabulary, length within positions
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        with torch.no_grad():
            logits = _extract_logits(self.model(**kwargs))
        if self.vocab_size is not None:
            logits = _slice_vocab(logits, self.vocab_size)
        return logits

    def logits_width(self) -> int | None:
        """Width ``V`` of :meth:`logits` read off the LM head (``get_output_embeddings()``'s
        ``[V, H]`` weight, then ``vocab_size``), without a forward; None when the model has no
        such head (run a forward to know)."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        width = int(weight.shape[0])
        if self.vocab_size is None:
            return width
        return self.vocab_size if width >= self.vocab_size else None  # too narrow: the forward raises

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits ``[B, T, V]`` (teacher dtype) on ``input_ids.device``; no gradient."""
        return self._forward(input_ids, attention_mask).to(input_ids.device)

    __call__ = logits

    def topk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, k: int = 16
    ) -> SparseTeacher:
        """Top-k teacher distribution ``[B, T, k]`` per logit position, on ``input_ids.device``.

        Position ``t`` holds the teacher's distribution over token ``t+1`` given tokens ``<= t``
        (the usual causal-LM logit alignment). Log-probs are normalised over the full vocabulary.
        """
        logits = self._forward(input_ids, attention_mask)
        with torch.no_grad():
            sparse = topk_logprobs(logits, k)
        return sparse.to(input_ids.device)

    # -- TeacherSource ---------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.model]

    def place(self, device: torch.device | str) -> None:
        """Move the model to ``device`` unless it was given its own device at construction."""
        if not self.pinned and self.device != torch.device(device):
            self.model.to(device)

    def signal(self, batch: Any, task: Any, *, features: Any = None) -> TeacherSignal:
        """Dense logits at ``task``'s loss positions (no gradient), and the requested ``features``."""
        args, kwargs = task.model_inputs(batch)
        feats = None
        if features is not None:
            logits, feats = run_model_features(self.model, features, *args, **kwargs)
        else:
            logits = run_model(self.model, *args, **kwargs)
        if self.vocab_size is not None:
            logits = _slice_vocab(logits, self.vocab_size)
        return TeacherSignal(logits=task.to_loss_positions(logits, batch, what="teacher logits"), features=feats)

    def weights_hash(self) -> str:
        """SHA-256 over parameter/buffer names, shapes, dtypes and bytes (computed once)."""
        if self._weights_hash is None:
            self._weights_hash = model_weights_hash(self.model)
        return self._weights_hash


def _slice_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if logits.shape[-1] < vocab_size:
        raise ShapeError(
            f"teacher logits have {logits.shape[-1]} entries, fewer than vocab_size={vocab_size}",
            "set vocab_size to at most the teacher's output size",
        )
    return logits[..., :vocab_size]


def model_weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes, dtypes, raw bytes), in state-dict order."""
    import hashlib

    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.numel():
            data = t.contiguous().cpu().reshape(-1).view(torch.uint8)
            h.update(data.numpy().tobytes())
    return h.hexdigest()


def load_teacher(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    gguf_file: str | None = None,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> OnlineTeacher:
    """Load a causal LM through :func:`kdforge.models.load_causal_lm` and wrap it frozen.

    The name is read like ``kdforge run``'s ``teacher.model`` (same errors): an offline asset
    (``smollm2`` or ``asset:smollm2``), a local ``save_pretrained`` folder, a ``.gguf`` file, or a Hub
    id (offline: a fast :class:`~kdforge.errors.AssetError`; the token from ``HF_TOKEN``).

    Args:
        name_or_path: an asset name, a local folder or ``.gguf`` file, or a Hub id.
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: e.g. ``"cuda:1"`` (the teacher is then pinned there) or ``"auto"`` (the accelerator
            when there is one); default: the CPU, and the trainer places it (or whatever
            ``kwargs['device_map']`` says).
        gguf_file: file name inside ``name_or_path`` for GGUF checkpoints.
        vocab_size: slice logits to this many entries (see :class:`OnlineTeacher`).
        **kwargs: ``revision``, ``trust_remote_code``, ``device_map``, ``attn_implementation`` (the
            fields of :class:`~kdforge.models.ModelSource`); any other keyword goes to
            ``from_pretrained`` as is.
    """
    from kdforge.models import ModelSource, classify_model_name, load_causal_lm, resolve_device

    name = str(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    dtype_name = "auto" if torch_dtype is None else str(torch_dtype).replace("torch.", "")
    source_keys = {"revision", "trust_remote_code", "device_map", "attn_implementation"}
    if dtype_name not in ("auto", "float32", "bfloat16", "float16") or set(kwargs) - source_keys \
            or (gguf_file is not None and classify_model_name(name) == "hub"):
        model = _from_pretrained(name, torch_dtype, gguf_file, kwargs)  # beyond what ModelSource describes
    else:
        if gguf_file is not None:
            from kdforge.models import resolve_model_path

            name = str(Path(resolve_model_path(name)) / gguf_file)
        placed = None if device is None else resolve_device(str(device))
        source = ModelSource(model=name, dtype=dtype_name, device=str(placed or "cpu"), **kwargs)
        model = load_causal_lm(source, what="teacher")
        device = placed if placed is not None else None
    return OnlineTeacher(model, device=device, vocab_size=vocab_size, name=str(name_or_path))


def _from_pretrained(name: str, torch_dtype: torch.dtype | None, gguf_file: str | None,
                     kwargs: dict[str, Any]) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with keywords that :class:`ModelSource` has no field for."""
    from transformers import AutoModelForCausalLM

    load_kwargs: dict[str, Any] = dict(kwargs)
    load_kwargs["dtype"] = torch_dtype if torch_dtype is not None else "auto"
    if gguf_file is not None:
        load_kwargs["gguf_file"] = gguf_file
    try:
        return AutoModelForCausalLM.from_pretrained(name, **load_kwargs)
    except (OSError, ValueError) as exc:
        local = Path(name).exists()
        raise AssetError(
            f"cannot load teacher {name!r}: {str(exc).splitlines()[0]}",
            "check the folder holds config.json and weights"
            if local
            else "check the Hub id and your network (set HF_HUB_OFFLINE=0), or pass a local folder",
        ) from None
