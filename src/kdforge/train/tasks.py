"""Task adapters: how a batch becomes student logits, labels and a mask — the student side only.

A task knows the batch layout of one kind of model; the teacher, the objective and the loop do
not. The teacher side is a :class:`~kdforge.teachers.sources.TeacherSource`, which asks the task
how to call a model on a batch (:meth:`Task.model_inputs`) and how its outputs line up with the
loss positions (:meth:`Task.to_loss_positions`). Two tasks are built in:

* :class:`ClassificationTask` — ``{"inputs": Tensor, "labels": LongTensor[B]}``, one position per
  sample; a teacher cache may put ``"teacher_logits"`` ``[B, C]`` in the batch.
* :class:`CausalLMTask` — ``{"input_ids", "attention_mask", "labels"}`` (HF convention, ``-100``
  = ignored); logits at position ``t`` predict token ``t+1``, so loss positions are
  ``[:, :-1]`` (``labels[:, 1:]``). A cache puts ``"teacher_ids"``/``"teacher_logprobs"``
  ``[B, T, k]`` (or ``[B, T-1, k]``) in the batch.

:meth:`Task.run_student` runs the student (full logits, or the last hidden state and LM head in
chunked mode) and captures the student features a feature term requests; :meth:`Task.forward`
composes it with a teacher source for callers outside the trainer.

Validation (token ids within the embedding table, lengths within the position table) runs when
``validate=True``: the trainer asks for it on the first batch and whenever the batch layout
changes, so the hot path has no blocking host reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError, ShapeError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.forward import check_lm_input, extract_logits, module_device, run_model
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources import CachedTeacher, TeacherSource, as_source
from kdforge.teachers.sources.cached import BatchLogitsTeacher

__all__ = [
    "IGNORE_INDEX", "CausalLMTask", "ClassificationTask", "Task", "TaskOutput", "check_lm_input", "feature_module",
    "module_device", "run_teacher", "teacher_module",
]


@dataclass
class TaskOutput:
    """What the objective needs from one micro-batch.

    Attributes:
        student_logits: ``[..., V]`` (None in chunked mode).
        teacher: the teacher distribution the losses take: ``[..., V]`` dense logits, a
            ``SparseTeacher`` ``[..., k]``, or None (labels only). ``signal.distribution``.
        labels: ``[...]`` int64, ``-100`` where ignored.
        mask: ``[...]`` bool, the real positions (the ones counted by the normaliser).
        student_hidden: ``[..., H]`` last hidden state (chunked mode only).
        lm_head_weight: ``[V, H]`` (chunked mode only).
        extra_terms: auxiliary losses computed by the task or the feature terms, each **summed**
            over real positions; objective terms with ``source="task"``/``"feature"`` pick them by
            name and divide by the same count ``N``.
        signal: the full :class:`~kdforge.teachers.signal.TeacherSignal` (None without a teacher).
        student_features: the student's captured features (feature terms only).
    """

    student_logits: torch.Tensor | None
    teacher: torch.Tensor | SparseTeacher | None
    labels: torch.Tensor | None
    mask: torch.Tensor
    student_hidden: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    extra_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    signal: TeacherSignal | None = None
    student_features: Any = None

    @property
    def num_positions(self) -> int:
        return int(self.mask.sum().item())

    @property
    def vocab_size(self) -> int:
        if self.student_logits is not None:
            return int(self.student_logits.shape[-1])
        assert self.lm_head_weight is not None
        return int(self.lm_head_weight.shape[0])


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


def teacher_module(teacher: Any) -> nn.Module:
    """The ``nn.Module`` behind a teacher: the teacher itself, or the ``.model`` of a wrapper such as
    :class:`kdforge.teachers.OnlineTeacher`."""
    if isinstance(teacher, nn.Module):
        return teacher
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise ConfigError(
        f"teacher must be an nn.Module or wrap one in `.model`, got {type(teacher).__name__}",
        "pass the model itself or kdforge.teachers.OnlineTeacher(model)",
    )


def run_teacher(teacher: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Teacher logits under ``no_grad`` in eval mode; inputs moved to the teacher's device."""
    return run_model(teacher_module(teacher), *args, **kwargs)


class Task:
    """Base class of task adapters (the student side of a batch).

    Subclasses implement :meth:`count` (real positions in a batch, without a forward pass: used to
    normalise the loss over the whole accumulated batch), :meth:`model_inputs`,
    :meth:`to_loss_positions`, :meth:`run_student` and :meth:`cached_source`.
    """

    #: name of the counted unit in throughput logs (``tokens_per_s`` / ``samples_per_s``)
    unit: str = "samples"
    #: names of the auxiliary terms this task puts in ``TaskOutput.extra_terms``
    term_names: tuple[str, ...] = ()

    def count(self, batch: Mapping[str, Any]) -> int:
        return int(self.count_tensor(batch).item())

    def count_tensor(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Real positions of ``batch`` as a 0-d int64 tensor (no host read)."""
        return torch.tensor(self.count(batch), dtype=torch.long)

    def model_inputs(self, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` to call a model of this task on ``batch``."""
        raise NotImplementedError

    def to_loss_positions(self, x: torch.Tensor, batch: Mapping[str, Any], *, what: str = "teacher output"
                          ) -> torch.Tensor:
        """A per-input-position tensor ``x`` restricted to the loss positions."""
        return x

    def check_inputs(self, model: nn.Module, batch: Mapping[str, Any], who: str) -> None:
        """Refuse a batch ``model`` cannot take (clear error instead of a deep torch failure)."""

    def cached_source(self) -> TeacherSource | None:
        """The source that reads a teacher signal stored in this task's batches (a cache)."""
        return None

    def run_student(self, student: nn.Module, batch: Mapping[str, Any], *, features: Any = None,
                    chunked: bool = False, validate: bool = True) -> TaskOutput:
        """Run the student: logits (or hidden states + head), labels, mask, requested features."""
        raise NotImplementedError

    def feature_terms(self, features: nn.Module, out: TaskOutput, signal: TeacherSignal,
                      batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Each feature term, summed over real positions, from both models' captured features (labels and
        dense teacher logits passed on for the class-wise terms ``nd`` / ``ofa``)."""
        dense = out.teacher if torch.is_tensor(out.teacher) else None
        return features(out.student_features, signal.features, out.mask, labels=out.labels, teacher_logits=dense,
                        student_logits=out.student_logits)

    def forward(self, student: nn.Module, teacher: Any, batch: Mapping[str, Any], *,
                extras: Mapping[str, nn.Module] | None = None, chunked: bool = False) -> TaskOutput:
        """Student outputs joined with the teacher signal (for use outside the trainer).

        ``teacher`` is a :class:`~kdforge.teachers.sources.TeacherSource`, a module (wrapped in an
        :class:`~kdforge.teachers.OnlineTeacher`), or None (the batch's cached signal if it has one).
        """
        source = pick_source(as_source(teacher), self, batch)
        return attach_teacher(self, student, source, batch, extras=extras, chunked=chunked)


def count_positions(task: Task, batch: Mapping[str, Any]) -> torch.Tensor:
    """``task``'s real positions in ``batch`` as a tensor: ``count_tensor`` (no host read), or the
    int of a ``count`` that a subclass overrode (weighted SFT counts weighted tokens)."""
    count = type(task).count
    if count in (Task.count, CausalLMTask.count, ClassificationTask.count):
        return task.count_tensor(batch)
    return torch.tensor(task.count(batch), dtype=torch.long)


def pick_source(source: TeacherSource | None, task: Task, batch: Mapping[str, Any]) -> TeacherSource | None:
    """The source for ``batch``: the cache stored in the batch if it carries one, else ``source``.

    A batch with cached teacher keys is read from the cache even when a live teacher is given
    (that teacher then scores only batches without them, e.g. on-policy samples).
    """
    cached = task.cached_source()
    if cached is not None and cached.present_in(batch):  # type: ignore[attr-defined]
        return cached
    return source


def attach_teacher(task: Task, student: nn.Module, source: TeacherSource | None, batch: Mapping[str, Any], *,
                   extras: Mapping[str, nn.Module] | None = None, chunked: bool = False, validate: bool = True,
                   vocab_policy: str = "exact") -> TaskOutput:
    """One micro-batch's :class:`TaskOutput`: the student run by ``task``, the signal of ``source``
    (aligned to the student's vocabulary and device), and the feature terms."""
    from kdforge.teachers.vocab import align_signal

    features = feature_module(extras)
    if features is not None:
        _refuse_cached_features(source, features, chunked)
    request = _unwrap(features).student_request if features is not None else None
    out = task.run_student(student, batch, features=request, chunked=chunked, validate=validate)
    if source is None:
        return out
    if validate and not getattr(source, "tokenizes_itself", False):  # a cross-tokenizer source checks its own ids
        for module in source.modules():
            task.check_inputs(module, batch, "teacher")
    t_request = _unwrap(features).teacher_request if features is not None else None
    signal = source.signal(batch, task, features=t_request)
    ref = out.student_logits if out.student_logits is not None else out.student_hidden
    assert ref is not None
    signal, student_slice = align_signal(signal, vocab_size=out.vocab_size, positions=tuple(out.mask.shape),
                                         device=ref.device, dtype=ref.dtype, policy=vocab_policy, validate=validate)
    if student_slice is not None:  # vocab_policy shared_prefix: the student's padding rows are dropped
        if out.student_logits is not None:
            out.student_logits = out.student_logits[..., :student_slice]
        else:
            out.lm_head_weight = out.lm_head_weight[:student_slice]  # type: ignore[index]
    out.signal, out.teacher = signal, signal.distribution
    # an empty signal (a cached teacher on a held-out batch without cache keys) has no feature terms either
    if features is not None and (signal.features is not None or signal.distribution is not None):
        out.extra_terms.update(task.feature_terms(features, out, signal, batch))
    return out


def _refuse_cached_features(source: TeacherSource | None, features: nn.Module, chunked: bool) -> None:
    keys = ", ".join(_unwrap(features).keys)
    if source is not None and "features" not in source.provides:
        raise ConfigError(
            f"feature terms ({keys}) need the teacher's intermediate features, but the teacher is a "
            f"{type(source).__name__} (a teacher cache stores only top-k logits)",
            "train these terms with the online teacher model (batches without cached teacher keys), "
            "or remove the feature terms from the objective",
        )
    if source is None:
        raise ConfigError(f"feature terms ({keys}) need an online teacher model, got teacher=None",
                          "pass the teacher module to the Distiller")
    if chunked:
        raise ConfigError(f"feature terms ({keys}) cannot run in chunked mode", "set chunked=False")


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
        self._cached = BatchLogitsTeacher(teacher_key)

    def _inputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.input_key not in batch:
            raise DataError(
                f"batch has no {self.input_key!r} key (keys: {sorted(batch)})",
                f"collate batches into a dict with {self.input_key!r} and {self.label_key!r}",
            )
        return batch[self.input_key]

    def count(self, batch: Mapping[str, Any]) -> int:
        return int(self._inputs(batch).shape[0])

    def count_tensor(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.tensor(self.count(batch), dtype=torch.long)

    def model_inputs(self, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._inputs(batch),), {}

    def cached_source(self) -> TeacherSource:
        return self._cached

    def run_student(self, student: nn.Module, batch: Mapping[str, Any], *, features: Any = None,
                    chunked: bool = False, validate: bool = True) -> TaskOutput:
        inputs = self._inputs(batch)
        s_feats = None
        if features is not None:
            from kdforge.features.taps import capture

            out, s_feats = capture(student, features, inputs)
            logits = extract_logits(out)
        else:
            logits = extract_logits(student(inputs))
        labels = batch.get(self.label_key)
        if labels is not None:
            labels = labels.to(logits.device).long()
        mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        return TaskOutput(logits, None, labels, mask, student_features=s_feats)


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
        self._cached = CachedTeacher(ids_key, logprobs_key)

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
        return int(self.count_tensor(batch).item())

    def count_tensor(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return (self.shifted_labels(batch) != IGNORE_INDEX).sum()

    def model_inputs(self, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "input_ids" not in batch:
            self.shifted_labels(batch)  # raises the DataError
        return (), {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}

    def to_loss_positions(self, x: torch.Tensor, batch: Mapping[str, Any], *, what: str = "teacher output"
                          ) -> torch.Tensor:
        b, t = batch["input_ids"].shape[:2]
        if tuple(x.shape[:2]) == (b, t):
            return x[:, :-1]
        if tuple(x.shape[:2]) == (b, t - 1):
            return x
        raise ShapeError(
            f"{what} {tuple(x.shape)} does not match the batch: expected [B, T, ...] or [B, T-1, ...] with "
            f"B, T = {(b, t)}",
            "rebuild the cache with the same sequence length and packing as the training data"
            if "cache" in what else "feed teacher and student the same batch (same padding and length)",
        )

    def check_inputs(self, model: nn.Module, batch: Mapping[str, Any], who: str) -> None:
        check_lm_input(_unwrap(model), batch["input_ids"], who)

    def cached_source(self) -> TeacherSource:
        return self._cached

    def run_student(self, student: nn.Module, batch: Mapping[str, Any], *, features: Any = None,
                    chunked: bool = False, validate: bool = True) -> TaskOutput:
        _, kwargs = self.model_inputs(batch)
        input_ids = kwargs["input_ids"]
        if validate:
            self.check_inputs(student, batch, "student")
        labels = self.shifted_labels(batch).to(input_ids.device)
        mask = labels != IGNORE_INDEX
        if features is not None:
            from kdforge.features.taps import capture

            s_out, s_feats = capture(student, features, **kwargs)
            return TaskOutput(extract_logits(s_out)[:, :-1], None, labels, mask, student_features=s_feats)
        if chunked:
            hidden, head = _hidden_and_head(student, kwargs)
            return TaskOutput(None, None, labels, mask, hidden, head)
        logits = extract_logits(student(**kwargs))[:, :-1]
        return TaskOutput(logits, None, labels, mask)

    def feature_terms(self, features: nn.Module, out: TaskOutput, signal: TeacherSignal,
                      batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # features cover all T positions; the real ones are those of the logit positions (mask
        # [B, T-1]), the last position has no next-token target
        mask = out.mask
        feat_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
        attention_mask = batch.get("attention_mask")
        key_mask = attention_mask.bool() if attention_mask is not None else None
        dense = out.teacher if torch.is_tensor(out.teacher) else None  # for talking's interactive part
        return features(out.student_features, signal.features, feat_mask, key_mask=key_mask, causal=True,
                        labels=out.labels, teacher_logits=dense, student_logits=out.student_logits)


def _hidden_and_head(student: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden state ``[B, T-1, H]`` and LM head weight ``[V, H]`` (chunked mode)."""
    try:  # logits for the last position only: the loss works from the hidden states
        out = student(**kwargs, output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = student(**kwargs, output_hidden_states=True)
    if getattr(out, "hidden_states", None) is None:
        raise ConfigError(
            f"{type(_unwrap(student)).__name__} returned no hidden_states, which chunked=True needs",
            "use a Hugging Face causal LM, or set chunked=False",
        )
    return out.hidden_states[-1][:, :-1], _unwrap(student).get_output_embeddings().weight


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
