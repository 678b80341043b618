"""Task adapters: how a batch becomes student logits, labels, a mask and a teacher signal.

A task knows the batch layout of one kind of model; the objective and the loop do not. Two are
built in:

* :class:`ClassificationTask` — ``{"inputs": Tensor, "labels": LongTensor[B]}``, one position per
  sample; the teacher is a module or precomputed ``"teacher_logits"`` ``[B, C]`` in the batch.
* :class:`CausalLMTask` — ``{"input_ids", "attention_mask", "labels"}`` (HF convention, ``-100``
  = ignored); logits at position ``t`` predict token ``t+1``, so the task shifts
  (``logits[:, :-1]`` vs ``labels[:, 1:]``). The teacher is an online module or a cached top-k
  signal ``"teacher_ids"``/``"teacher_logprobs"`` ``[B, T, k]`` aligned with the logit positions
  of ``input_ids`` (position ``t`` = distribution of token ``t+1``).

The teacher is always run under ``torch.no_grad()`` in eval mode on its own device; its outputs are
moved to the student's device.

Feature terms: when the trainer's ``extras`` hold a :class:`~kdforge.features.FeatureTerms` module
(``extras["features"]``, from :meth:`kdforge.train.Objective.bind`), both tasks also capture what it
requests (hidden states, attentions, hooked module outputs) from the student and the online teacher
in the same forward passes and put each feature term, summed over real positions, in
``TaskOutput.extra_terms``. Without such a module nothing extra is requested (no cost).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError, ShapeError, VocabMismatchError
from kdforge.losses.signal import SparseTeacher

TeacherSignal = torch.Tensor | SparseTeacher


@dataclass
class TaskOutput:
    """What the objective needs from one micro-batch.

    Attributes:
        student_logits: ``[..., V]`` (None in chunked mode).
        teacher: ``[..., V]`` dense logits, ``SparseTeacher`` ``[..., k]``, or None (labels only).
        labels: ``[...]`` int64, ``-100`` where ignored.
        mask: ``[...]`` bool, the real positions (the ones counted by the normaliser).
        student_hidden: ``[..., H]`` last hidden state (chunked mode only).
        lm_head_weight: ``[V, H]`` (chunked mode only).
        extra_terms: auxiliary losses computed by the task (feature/hint losses through the
            method's ``extras``), each **summed** over real positions; objective terms with
            ``source="task"`` pick them by name and divide by the same count ``N``.
    """

    student_logits: torch.Tensor | None
    teacher: TeacherSignal | None
    labels: torch.Tensor | None
    mask: torch.Tensor
    student_hidden: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    extra_terms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_positions(self) -> int:
        return int(self.mask.sum().item())


def feature_module(extras: Mapping[str, nn.Module] | None) -> nn.Module | None:
    """The (possibly wrapped) :class:`~kdforge.features.FeatureTerms` among ``extras``, or None."""
    from kdforge.features.terms import EXTRAS_KEY, FeatureTerms

    module = (extras or {}).get(EXTRAS_KEY)
    if module is None:
        return None
    if not isinstance(_unwrap(module), FeatureTerms):
        raise ConfigError(
            f"extra module {EXTRAS_KEY!r} is a {type(_unwrap(module)).__name__}, but that name is reserved for the "
            "objective's feature terms",
            "rename your extra module, or pass the dict returned by objective.bind(student, teacher)",
        )
    return module


def _refuse_cached_features(task: Task, batch: Mapping[str, Any], teacher: Any, features: nn.Module,
                            chunked: bool) -> None:
    keys = ", ".join(_unwrap(features).keys)
    if task.has_cached_teacher(batch):
        raise ConfigError(
            f"feature terms ({keys}) need the teacher's intermediate features, but the batch carries a cached "
            "teacher signal (a teacher cache stores only top-k logits)",
            "train these terms with the online teacher model (batches without cached teacher keys), "
            "or remove the feature terms from the objective",
        )
    if teacher is None:
        raise ConfigError(f"feature terms ({keys}) need an online teacher model, got teacher=None",
                          "pass the teacher module to the Distiller")
    if chunked:
        raise ConfigError(f"feature terms ({keys}) cannot run in chunked mode", "set chunked=False")


def _input_mover(module: nn.Module) -> Callable[[Any], Any]:
    """Moves a tensor argument to ``module``'s device (float tensors also to its float dtype)."""
    device = module_device(module)
    dtype = _module_float_dtype(module)

    def move(x: Any) -> Any:
        if torch.is_tensor(x):
            x = x.to(device)
            if x.is_floating_point() and dtype is not None:
                x = x.to(dtype)
        return x

    return move


@torch.no_grad()
def run_teacher_features(teacher: Any, request: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Like :func:`run_teacher`, also capturing the :class:`~kdforge.features.FeatureRequest`
    ``request`` from the teacher module. Returns ``(logits, Features)``; a wrapper's ``vocab_size``
    (:class:`~kdforge.teachers.OnlineTeacher`) still slices the logits."""
    from kdforge.features.taps import capture

    module = teacher_module(teacher)
    if module.training:
        module.eval()
    move = _input_mover(module)

    out, feats = capture(module, request, *[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
    logits = _logits_of(out)
    vocab = None if isinstance(teacher, nn.Module) else getattr(teacher, "vocab_size", None)
    if isinstance(vocab, int):
        logits = logits[..., :vocab]
    return logits, feats


class Task:
    """Base class of task adapters.

    Subclasses implement :meth:`count` (real positions in a batch, without a forward pass: used to
    normalise the loss over the whole accumulated batch) and :meth:`forward`. ``extras`` holds the
    method's extra learnable modules (e.g. projectors), already prepared by the accelerator.
    """

    #: name of the counted unit in throughput logs (``tokens_per_s`` / ``samples_per_s``)
    unit: str = "samples"
    #: names of the auxiliary terms this task puts in ``TaskOutput.extra_terms``
    term_names: tuple[str, ...] = ()

    def count(self, batch: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Mapping[str, Any], *,
                extras: Mapping[str, nn.Module] | None = None, chunked: bool = False) -> TaskOutput:
        raise NotImplementedError

    def has_cached_teacher(self, batch: Mapping[str, Any]) -> bool:
        return False


def _logits_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output and torch.is_tensor(output[0]):
        logits = output[0]
    if logits is None:
        raise ShapeError(
            f"cannot find logits in a model output of type {type(output).__name__}",
            "return a tensor, or an object/dict with a `logits` field",
        )
    return logits


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _module_float_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _check_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ShapeError(
            f"teacher logits {tuple(teacher_logits.shape)} do not line up with student logits "
            f"{tuple(student_logits.shape)}",
            "feed teacher and student the same batch (same padding and length)",
        )
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise VocabMismatchError(
            f"teacher has {teacher_logits.shape[-1]} output classes/tokens, student has "
            f"{student_logits.shape[-1]}",
            "use a student with the teacher's vocabulary (same tokenizer), or a cross-tokenizer method",
        )


def teacher_module(teacher: Any) -> nn.Module:
    """The ``nn.Module`` behind a teacher: the teacher itself, or the ``.model`` of a wrapper such as
    :class:`kdforge.teachers.OnlineTeacher` (which is called as is, keeping its vocabulary slicing)."""
    if isinstance(teacher, nn.Module):
        return teacher
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise ConfigError(
        f"teacher must be an nn.Module or wrap one in `.model`, got {type(teacher).__name__}",
        "pass the model itself or kdforge.teachers.OnlineTeacher(model)",
    )


@torch.no_grad()
def run_teacher(teacher: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Teacher logits under ``no_grad`` in eval mode; inputs moved to the teacher's device."""
    module = teacher_module(teacher)
    if module.training:
        module.eval()
    move = _input_mover(module)

    out = teacher(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
    return _logits_of(out)


class ClassificationTask(Task):
    """Sample-level classification: one position per example.

    Args:
        input_key: batch key of the model input (passed positionally to the student).
        label_key: batch key of the int64 labels ``[B]`` (``-100`` = unlabelled).
        teacher_key: batch key of precomputed teacher logits ``[B, C]`` (used when present).
    """

    unit = "samples"

    def __init__(self, input_key: str = "inputs", label_key: str = "labels",
                 teacher_key: str = "teacher_logits") -> None:
        self.input_key, self.label_key, self.teacher_key = input_key, label_key, teacher_key

    def _inputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.input_key not in batch:
            raise DataError(
                f"batch has no {self.input_key!r} key (keys: {sorted(batch)})",
                f"collate batches into a dict with {self.input_key!r} and {self.label_key!r}",
            )
        return batch[self.input_key]

    def count(self, batch: Mapping[str, Any]) -> int:
        return int(self._inputs(batch).shape[0])

    def has_cached_teacher(self, batch: Mapping[str, Any]) -> bool:
        return self.teacher_key in batch

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Mapping[str, Any], *,
                extras: Mapping[str, nn.Module] | None = None, chunked: bool = False) -> TaskOutput:
        inputs = self._inputs(batch)
        features = feature_module(extras)
        if features is not None:
            from kdforge.features.taps import capture

            _refuse_cached_features(self, batch, teacher, features, chunked)
            out, s_feats = capture(student, _unwrap(features).student_request, inputs)
            logits = _logits_of(out)
        else:
            logits = _logits_of(student(inputs))
        labels = batch.get(self.label_key)
        if labels is not None:
            labels = labels.to(logits.device).long()
        mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        signal: torch.Tensor | None = None
        extra: dict[str, torch.Tensor] = {}
        if self.teacher_key in batch:
            signal = batch[self.teacher_key]
        elif teacher is not None and features is not None:
            signal, t_feats = run_teacher_features(teacher, _unwrap(features).teacher_request, inputs)
            extra = features(s_feats, t_feats, mask)
        elif teacher is not None:
            signal = run_teacher(teacher, inputs)
        if signal is not None:
            signal = signal.to(device=logits.device, dtype=logits.dtype)
            _check_vocab(logits, signal)
        return TaskOutput(logits, signal, labels, mask, extra_terms=extra)


class CausalLMTask(Task):
    """Next-token distillation for decoder-only LMs (HF ``AutoModelForCausalLM`` or compatible).

    Shapes: ``input_ids``/``attention_mask``/``labels`` ``[B, T]``; the output holds
    ``student_logits [B, T-1, V]``, ``labels [B, T-1]`` (= ``labels[:, 1:]``) and
    ``mask = labels != -100``. A missing ``labels`` key means "every attended token".

    Cached teacher keys (optional): ``teacher_ids`` / ``teacher_logprobs`` ``[B, T, k]`` or
    ``[B, T-1, k]`` (position ``t`` = distribution of token ``t+1``).
    """

    unit = "tokens"

    def __init__(self, ids_key: str = "teacher_ids", logprobs_key: str = "teacher_logprobs") -> None:
        self.ids_key, self.logprobs_key = ids_key, logprobs_key

    @staticmethod
    def shifted_labels(batch: Mapping[str, Any]) -> torch.Tensor:
        if "input_ids" not in batch:
            raise DataError(
                f"causal-LM batch has no 'input_ids' (keys: {sorted(batch)})",
                "collate batches into {input_ids, attention_mask, labels}",
            )
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].clone()
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return labels[:, 1:].long()

    def count(self, batch: Mapping[str, Any]) -> int:
        return int((self.shifted_labels(batch) != IGNORE_INDEX).sum().item())

    def has_cached_teacher(self, batch: Mapping[str, Any]) -> bool:
        return self.ids_key in batch

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Mapping[str, Any], *,
                extras: Mapping[str, nn.Module] | None = None, chunked: bool = False) -> TaskOutput:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        check_lm_input(_unwrap(student), input_ids, "student")
        if teacher is not None:
            check_lm_input(teacher_module(teacher), input_ids, "teacher")
        labels = self.shifted_labels(batch).to(input_ids.device)
        mask = labels != IGNORE_INDEX
        hidden = head = None
        features = feature_module(extras)
        s_feats = None
        if features is not None:
            from kdforge.features.taps import capture

            _refuse_cached_features(self, batch, teacher, features, chunked)
            s_out, s_feats = capture(student, _unwrap(features).student_request, input_ids=input_ids,
                                     attention_mask=attention_mask)
            logits = _logits_of(s_out)[:, :-1]
            vocab, ref_device, ref_dtype = logits.shape[-1], logits.device, logits.dtype
        elif chunked:
            try:  # logits for the last position only: the loss works from the hidden states
                out = student(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=True, logits_to_keep=1)
            except TypeError:  # a model without logits_to_keep
                out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            if getattr(out, "hidden_states", None) is None:
                raise ConfigError(
                    f"{type(_unwrap(student)).__name__} returned no hidden_states, which chunked=True needs",
                    "use a Hugging Face causal LM, or set chunked=False",
                )
            hidden = out.hidden_states[-1][:, :-1]
            head = _unwrap(student).get_output_embeddings().weight
            logits = None
            vocab, ref_device, ref_dtype = head.shape[0], hidden.device, hidden.dtype
        else:
            logits = _logits_of(student(input_ids=input_ids, attention_mask=attention_mask))[:, :-1]
            vocab, ref_device, ref_dtype = logits.shape[-1], logits.device, logits.dtype

        signal: TeacherSignal | None = None
        extra: dict[str, torch.Tensor] = {}
        if self.ids_key in batch:
            signal = self._cached(batch, labels.shape, vocab, ref_device)
        elif teacher is not None:
            if features is not None:
                t_logits, t_feats = run_teacher_features(teacher, _unwrap(features).teacher_request,
                                                         input_ids=input_ids, attention_mask=attention_mask)
                # features cover all T positions; the real ones are those of the logit positions
                # (mask [B, T-1]), the last position has no next-token target
                feat_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
                key_mask = attention_mask.bool() if attention_mask is not None else None
                extra = features(s_feats, t_feats, feat_mask, key_mask=key_mask, causal=True)
                t_logits = t_logits[:, :-1]
            else:
                t_logits = run_teacher(teacher, input_ids=input_ids, attention_mask=attention_mask)[:, :-1]
            signal = t_logits.to(device=ref_device, dtype=ref_dtype)
            if logits is not None:
                _check_vocab(logits, signal)
            elif signal.shape[-1] != vocab:
                raise VocabMismatchError(
                    f"teacher has {signal.shape[-1]} tokens, student {vocab}",
                    "use a student with the teacher's tokenizer",
                )
        return TaskOutput(logits, signal, labels, mask, hidden, head, extra_terms=extra)

    def _cached(self, batch: Mapping[str, Any], pos_shape: torch.Size, vocab: int,
                device: torch.device) -> SparseTeacher:
        if self.logprobs_key not in batch:
            raise DataError(
                f"batch has {self.ids_key!r} but no {self.logprobs_key!r}",
                "collate both top-k tensors from the teacher cache",
            )
        ids, logprobs = batch[self.ids_key], batch[self.logprobs_key]
        if ids.shape[1] == pos_shape[1] + 1:
            ids, logprobs = ids[:, :-1], logprobs[:, :-1]
        if tuple(ids.shape[:2]) != tuple(pos_shape):
            raise ShapeError(
                f"cached teacher top-k {tuple(ids.shape)} does not match the batch: expected "
                f"[B, T, k] or [B, T-1, k] with B, T-1 = {tuple(pos_shape)}",
                "rebuild the cache with the same sequence length and packing as the training data",
            )
        max_id = int(ids.max().item()) if ids.numel() else -1
        if max_id >= vocab:
            raise VocabMismatchError(
                f"cached teacher token id {max_id} is outside the student's vocabulary of {vocab}",
                "build the cache with the student's tokenizer, or use a student with the teacher's vocabulary",
            )
        # a cache with sampled tail draws (tail_samples > 0) says how many entries are exact top-k:
        # the losses then treat the rest as an unbiased estimate (and refuse non-linear losses)
        num_exact = batch.get("teacher_num_exact")
        exact = int(num_exact.reshape(-1)[0]) if torch.is_tensor(num_exact) else num_exact
        return SparseTeacher(ids.to(device).long(), logprobs.to(device).float(), vocab, num_exact=exact)


def check_lm_input(model: nn.Module, input_ids: torch.Tensor, who: str = "model") -> None:
    """Refuse a batch a causal LM cannot take: token ids beyond its embedding table (torch fails
    deep inside with ``IndexError``) or sequences longer than ``max_position_embeddings`` (most
    models silently extrapolate their position encoding and produce garbage).

    Models without an HF-style ``config`` / ``get_input_embeddings`` are not checked; a config
    with dynamic RoPE scaling (meant to run past its nominal length) skips the length check.
    """
    if input_ids.numel() == 0 or input_ids.is_floating_point():
        return
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int):
        top = int(input_ids.max().item())
        if top >= rows:
            raise VocabMismatchError(
                f"token id {top} in the batch is outside the {who}'s vocabulary of {rows} embeddings",
                f"tokenize the data with the {who}'s tokenizer (or build the cache with it)",
            )
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    dynamic = isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope")
    if isinstance(limit, int) and not dynamic and input_ids.shape[-1] > limit:
        raise ShapeError(
            f"the batch has sequences of {input_ids.shape[-1]} tokens, longer than the {who}'s "
            f"max_position_embeddings={limit}",
            f"pack or truncate the data to at most {limit} tokens (seq_len / block_size / max_length)",
        )


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
