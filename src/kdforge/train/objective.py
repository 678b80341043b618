"""The training objective: registered losses combined with explicit weights.

.. math::

    \\mathcal{L} = \\sum_i w_i \\, \\frac{1}{N} \\sum_{n \\in \\text{real positions}} \\ell_i(n)

Every term is computed with ``reduction="sum"`` and divided by ``N``, the number of *real*
positions (tokens whose label is not ``-100``, or samples) in the **whole accumulated batch
across all processes**. The trainer counts ``N`` before any forward pass, so gradient
accumulation of 4 micro-batches of 2 gives exactly the gradient of one batch of 8, even when the
micro-batches hold different numbers of real tokens (per-micro-batch averaging, the common bug,
weights short sequences more).

There are no hidden defaults: every term names a loss from :data:`kdforge.losses.LOSSES` and its
weight; an empty objective is an error.

Feature terms (``hidden_mse``, ``cosine_hidden``, ``attention_kl``, ``value_relation_kl``,
``cka``: :data:`kdforge.features.FEATURE_LOSSES`) compare intermediate tensors of the two models.
They are written like any term (``{name: hidden_mse, weight: 1.0, params: {layers: uniform}}``);
:meth:`Objective.bind` resolves them for a (student, teacher) pair into one
:class:`~kdforge.features.FeatureTerms` module (layer maps, projectors), passed to the trainer as
``extra_modules``; the task then captures hidden states/attentions only when such a term exists.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from torch import nn

from kdforge.config import validate
from kdforge.errors import ConfigError, NonFiniteError
from kdforge.train.config import FriendlyModel

if TYPE_CHECKING:
    from kdforge.losses.spec import LossSpec


def _schedulable_weight(schema: dict[str, Any]) -> None:
    """JSON Schema of a term: ``weight`` is a number or a schedule mapping (editors accept both)."""
    weight = schema.get("properties", {}).get("weight")
    if weight is not None:
        number = {k: v for k, v in weight.items() if k not in ("description", "yaml_type")}
        schedule = {"type": "object", "required": ["schedule"],
                    "description": "a schedule of the weight (docs/schedules.md)"}
        schema["properties"]["weight"] = {"anyOf": [number, schedule], "description": weight.get("description", "")}


class LossTerm(FriendlyModel):
    """One weighted term of an :class:`Objective`.

    Args:
        name: a registered loss name (``kdforge losses`` lists them), e.g. ``"forward_kl"``.
        weight: its explicit weight ``w_i`` (required; 0 keeps the term for logging only).
        params: keyword arguments passed to the loss, e.g. ``{"temperature": 2.0}``.
        label: key used in logs (``loss/<label>``); defaults to ``name``. Needed when the same loss
            appears twice.
        source: ``"loss"`` (default): ``name`` is a registered loss applied to the logits;
            ``"feature"``: ``name`` is a feature loss of :data:`kdforge.features.FEATURE_LOSSES`
            (set automatically for those names; ``params`` validated against the loss's parameter
            model, see ``docs/features.md``); ``"task"``: ``name`` is an auxiliary term the task
            computes itself, returned summed over real positions in
            ``TaskOutput.extra_terms[name]``; ``params`` must then be empty.
        per_teacher: with an ensemble teacher, one term per member, ``sum_s w_s loss(student,
            teacher_s)`` (``w_s`` the member's per-sample weight), instead of the loss against the
            mixture ``sum_s w_s p_s``. At ``T = 1`` the two have the same gradient for a loss
            linear in the teacher's probabilities (forward KL) and differ for the others (reverse
            KL, JSD, ...; at ``T != 1`` the mixture of tempered members is not the tempered
            mixture). Needs an :class:`~kdforge.teachers.sources.EnsembleTeacher` built with
            ``per_member_signals=True`` (the recipes set it); runs on the plain (unchunked) path.
    """

    model_config = ConfigDict(json_schema_extra=lambda schema: _schedulable_weight(schema))

    name: str
    weight: float = Field(..., ge=0, description="a number >= 0, or a schedule {schedule: ..., ...} "
                                                 "(docs/schedules.md)",
                          json_schema_extra={"yaml_type": "float | {schedule: ...}"})
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    source: Literal["loss", "task", "feature"] = "loss"
    per_teacher: bool = Field(False, description="with an ensemble teacher: one term per member, "
                                                 "sum_s w_s loss(student, teacher_s), not the loss to the mixture")
    scheduled: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="schedules of this term's weight ('weight') and loss params ('params.<name>'); filled from "
                    "`weight: {schedule: ...}` / `params: {name: {schedule: ...}}` (docs/schedules.md)")

    #: ``LossTerm("forward_kl", 1.0, {"temperature": 2.0})``: positional name, weight, params
    #: (mapped by the metaclass; a real ``__init__`` would spoil nested config errors, see
    #: :class:`~kdforge.train.config.FriendlyModel`).
    _positional: ClassVar[tuple[str, ...]] = ("name", "weight", "params")

    if TYPE_CHECKING:  # the signature type checkers see
        def __init__(self, name: str | None = None, weight: float | None = None,
                     params: dict[str, Any] | None = None, **kwargs: Any) -> None: ...

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("weight must be a finite number")
        return value

    @model_validator(mode="before")
    @classmethod
    def _collect_schedules(cls, data: Any) -> Any:
        """``weight: {schedule: ...}`` and ``params: {x: {schedule: ...}}`` become entries of
        ``scheduled`` (the weight keeps 0.0 as a placeholder; a scheduled param leaves ``params``)."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        scheduled = dict(data.get("scheduled") or {})
        if isinstance(data.get("weight"), Mapping):
            scheduled["weight"] = dict(data["weight"])
            data["weight"] = 0.0
        params = data.get("params")
        if isinstance(params, Mapping):
            kept = {}
            for name, value in params.items():
                if isinstance(value, Mapping) and "schedule" in value:
                    scheduled[f"params.{name}"] = dict(value)
                else:
                    kept[name] = value
            data["params"] = kept
        if scheduled:
            data["scheduled"] = scheduled
        return data

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Dump a scheduled value where the YAML writes it (``weight: {schedule: ...}``,
        ``params: {name: {schedule: ...}}``), not as the 0.0 placeholder plus ``scheduled``: the
        resolved config (``--dry-run``, RUN_DIR/config.yaml) and the config reference show the
        schedule, and the dump validates back to the same term."""
        data = handler(self)
        if not isinstance(data, dict) or not self.scheduled:
            return data
        data.pop("scheduled", None)
        if self.weight_schedule is not None:
            data["weight"] = dict(self.weight_schedule)
        if self.scheduled_params:
            data["params"] = {**data.get("params", {}), **{k: dict(v) for k, v in self.scheduled_params.items()}}
        return data

    @field_validator("scheduled")
    @classmethod
    def _valid_schedules(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, spec in value.items():
            if path != "weight" and not path.startswith("params."):
                raise ValueError(f"scheduled key {path!r} must be 'weight' or 'params.<name>'")
            from kdforge.train.schedules import build_schedule

            try:
                build_schedule(spec)
            except ConfigError as exc:
                raise ValueError(f"{path}: {exc.problem}; {exc.fix}") from None
        return value

    @property
    def weight_schedule(self) -> dict[str, Any] | None:
        return self.scheduled.get("weight")

    @property
    def scheduled_params(self) -> dict[str, dict[str, Any]]:
        return {k[len("params."):]: v for k, v in self.scheduled.items() if k.startswith("params.")}

    def current(self, values: Mapping[str, float] | None) -> tuple[float, dict[str, Any]]:
        """This term's weight and params with the scheduled values of ``values`` applied."""
        if not self.scheduled:
            return self.weight, self.params
        if values is None:
            raise ConfigError(
                f"loss term {self.key!r} has scheduled values ({', '.join(self.scheduled)}), but no values were given",
                "train it with the Distiller, or pass values=objective.schedules(max_steps).current(step)",
            )
        weight = values[f"{self.key}.weight"] if "weight" in self.scheduled else self.weight
        params = {**self.params, **{n: values[f"{self.key}.params.{n}"] for n in self.scheduled_params}}
        return weight, params

    @model_validator(mode="before")
    @classmethod
    def _feature_source(cls, data: Any) -> Any:
        """A feature loss name (``hidden_mse``...) makes a feature term without saying ``source``."""
        if isinstance(data, Mapping) and "source" not in data and isinstance(data.get("name"), str):
            from kdforge.features.terms import FEATURE_LOSSES

            if data["name"] in FEATURE_LOSSES:
                return {**data, "source": "feature"}
        return data

    @model_validator(mode="after")
    def _known_loss(self) -> LossTerm:
        """A typo in a loss name or parameter fails when the config is read (``kdforge run
        --dry-run``), not at the first training step after an expensive teacher cache was built."""
        if self.per_teacher and self.source != "loss":
            raise ValueError(f"per_teacher applies to losses against the teacher's distribution, not to "
                             f"{self.source} term {self.name!r}")
        if self.source == "feature":
            return self._known_feature()
        if self.source != "loss":
            return self
        from kdforge.features.terms import FEATURE_LOSSES
        from kdforge.losses import LOSSES  # imported here: the losses package registers on import

        known = LOSSES.names()
        if self.name not in LOSSES:
            close = difflib.get_close_matches(self.name, [*known, *FEATURE_LOSSES.names()], n=1)
            raise ValueError(f"unknown loss {self.name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"registered losses: {', '.join(known)}; "
                             f"feature losses: {', '.join(FEATURE_LOSSES.names())}")
        LOSSES.get(self.name).validate_params(self.params)  # the spec's params model (a ValueError)
        if self.per_teacher and not LOSSES.get(self.name).needs_teacher:
            raise ValueError(f"per_teacher: {self.name!r} does not read the teacher; drop per_teacher")
        return self

    def _known_feature(self) -> LossTerm:
        from kdforge.features.terms import FEATURE_LOSSES

        if self.name not in FEATURE_LOSSES:
            known = FEATURE_LOSSES.names()
            close = difflib.get_close_matches(self.name, known, n=1)
            raise ValueError(f"unknown feature loss {self.name!r}{f' (did you mean {close[0]!r}?)' if close else ''}"
                             f"; feature losses: {', '.join(known)}")
        try:
            FEATURE_LOSSES.get(self.name).validate_params(self.params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or 'params'}: "
                f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors())
            model = FEATURE_LOSSES.get(self.name).params_model
            raise ValueError(f"feature loss {self.name!r} params: {problems} "
                             f"(it takes: {', '.join(model.model_fields)})") from None
        return self

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class ObjectiveValue:
    """Result of one objective evaluation.

    Attributes:
        total: scalar tensor ``sum_i w_i * term_i`` (graph attached; what ``backward`` sees).
        terms: unweighted, normalised value of each term (detached), keyed by ``LossTerm.key``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Objective:
    """Weighted sum of registered losses, normalised by an explicit position count.

    Example::

        objective = Objective([
            LossTerm("forward_kl", 0.9, {"temperature": 2.0}),
            LossTerm("cross_entropy", 0.1),
        ])

    Args:
        terms: :class:`LossTerm` objects or mappings with the same keys (validated).
        chunked: for causal LMs, compute the loss from the student's last hidden state and the LM
            head in chunks of ``chunk_size`` tokens with
            :func:`kdforge.losses.chunked.chunked_distillation_loss`, so the ``[tokens, vocab]``
            student logits never exist at once. Allowed only for one distillation term plus an
            optional ``cross_entropy`` term.
        chunk_size: tokens per chunk in the chunked mode, or ``"auto"`` (default: sized from the
            vocabulary so each ``[chunk, V]`` float32 array is ~16 MiB on CPU, ~64 MiB on GPU).
        compile_kernels: in the chunked mode, run the closed-form forward KL / reverse KL / JSD
            kernels through ``torch.compile`` (one fused pass per chunk; measured 4-13% less CPU
            per training step than the eager closed forms, docs/benchmarks.md). ``"auto"``
            (default): where a compiler is available (Triton on CUDA, a C++ compiler on CPU;
            ``$KDFORGE_COMPILE_KERNELS=0`` turns it off); costs 13-48 s of compilation per
            process on a CPU; a failing compile logs a notice and runs eagerly.
    """

    def __init__(self, terms: Sequence[LossTerm | Mapping[str, Any]], *, chunked: bool | str = "auto",
                 chunk_size: int | str = "auto", compile_kernels: bool | str = "auto") -> None:
        if isinstance(terms, Mapping | str) or not isinstance(terms, Sequence):
            raise ConfigError(
                f"objective terms must be a list of loss terms, got {type(terms).__name__}",
                "write e.g. [{name: forward_kl, weight: 1.0}]",
            )
        parsed = [
            t if isinstance(t, LossTerm) else validate(LossTerm, dict(t), source=f"objective term {i}")
            for i, t in enumerate(terms)
        ]
        if not parsed:
            raise ConfigError(
                "the objective has no loss terms",
                "list at least one term, e.g. [{name: forward_kl, weight: 1.0}]; "
                "`kdforge losses` shows the registered names",
            )
        keys = [t.key for t in parsed]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(
                f"objective has several terms logged as {', '.join(dupes)}",
                "give each repeated loss a distinct `label`",
            )
        from kdforge.losses import LOSSES  # imported here: the losses package registers on import

        self.terms: list[LossTerm] = parsed
        for t in parsed:
            if t.source == "task" and t.params:
                raise ConfigError(f"task term {t.name!r} takes no params (the task computes it)",
                                  "configure the term on the task object instead")
        self._fns: list[LossSpec | None] = [
            LOSSES.get(t.name) if t.source == "loss" else None for t in parsed]
        self._auto_chunked: bool | None = None
        self._features: nn.Module | None = None
        self._bound: tuple[int, int] | None = None
        if chunked not in (True, False, "auto"):
            raise ConfigError(f"chunked must be true, false or 'auto', got {chunked!r}",
                              "use chunked: auto (the closed-form chunked path wherever it applies)")
        self.chunked: bool | str = chunked
        if chunk_size != "auto" and not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ConfigError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}",
                              "use chunk_size='auto' (about 16 MiB per chunk array on CPU, 64 MiB on GPU)")
        self.chunk_size: int | str = chunk_size
        if compile_kernels not in (True, False, "auto"):
            raise ConfigError(f"compile_kernels must be true, false or 'auto', got {compile_kernels!r}",
                              "use compile_kernels: auto (compile where a compiler is available)")
        self.compile_kernels: bool | str = compile_kernels
        if chunked is True:
            self._check_chunkable()

    @classmethod
    def from_config(cls, terms: Sequence[Mapping[str, Any]] | Objective, **kwargs: Any) -> Objective:
        return terms if isinstance(terms, Objective) else cls(terms, **kwargs)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.terms]

    @property
    def needs_teacher(self) -> bool:
        """True when a loss term's spec needs a teacher signal (``needs_teacher``), or a feature term exists."""
        return any(t.source == "feature" or (spec is not None and spec.needs_teacher)
                   for t, spec in zip(self.terms, self._fns))

    def _teacher_terms(self) -> list[LossTerm]:
        """The terms that are not teacher-free registered losses (``cross_entropy``)."""
        return [t for t, spec in zip(self.terms, self._fns) if spec is None or spec.needs_teacher]

    @property
    def feature_terms(self) -> list[LossTerm]:
        """The terms on intermediate features (need :meth:`bind` and an online teacher)."""
        return [t for t in self.terms if t.source == "feature"]

    def bind(self, student: nn.Module, teacher: Any) -> dict[str, nn.Module]:
        """Resolve the feature terms for this student and teacher; the trainer's ``extra_modules``.

        Builds one :class:`~kdforge.features.FeatureTerms` (layer maps, module paths checked,
        projectors created on the student's device, eager attention switched on for
        ``attention_kl``). Pass the result to :class:`~kdforge.train.Distiller` as
        ``extra_modules`` so the projectors are optimised and checkpointed, and so the task captures
        the features. Calling it again with the same models returns the same module.

        Returns:
            ``{"features": FeatureTerms}``, or ``{}`` when the objective has no feature terms.

        Raises:
            ConfigError: no teacher module (a teacher cache carries no features), or a term that
                does not fit these models (layers out of range, unknown module path...).
        """
        from kdforge.features.terms import EXTRAS_KEY, build_feature_terms
        from kdforge.train.tasks import teacher_module

        if not self.feature_terms:
            return {}
        if teacher is None:
            raise ConfigError(
                f"feature terms {[t.key for t in self.feature_terms]} need a live teacher model, got none",
                "pass the teacher module, or CachedTeacher.with_features(cache) for a cache built with "
                "feature_layers, or remove the feature terms",
            )
        t_module = teacher_module(teacher)
        ident = (id(student), id(t_module))
        if self._features is None or self._bound != ident:
            self._features = build_feature_terms([(t.key, t.name, t.params) for t in self.feature_terms],
                                                 student, t_module)
            self._bound = ident
        return {EXTRAS_KEY: self._features}

    @property
    def task_terms(self) -> list[str]:
        """Names of the terms the task must provide in ``TaskOutput.extra_terms``."""
        return [t.name for t in self.terms if t.source == "task"]

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.weight}*{t.key}{t.params or ''}" for t in self.terms)
        return f"Objective({inner}{', chunked' if self.chunked else ''})"

    def use_chunked(self, task: Any, source: Any, student: nn.Module | None = None) -> bool:
        """Whether a micro-batch of ``task`` with teacher ``source`` runs the chunked LM-head path.

        ``chunked=True``/``False`` decide it; ``"auto"`` picks it where it is exact and cheaper: a
        causal LM, one distillation term with a closed-form chunk kernel (plus an optional
        ``cross_entropy``), no scheduled loss parameter, a dense teacher (a live model) or a sparse
        (top-k: a teacher cache) one whose term the sparse closed form computes (``T = 1`` or
        ``sparse_policy="renormalize"``, :func:`~kdforge.losses.chunked.sparse_closed_form_applies`;
        it never builds the teacher's dense ``[N, V]``) and, when ``student`` is given, a student
        with an LM head (``get_output_embeddings()``: a plain ``nn.Module`` returning logits cannot
        give the hidden states the chunked path needs).
        """
        if self.chunked != "auto":
            return bool(self.chunked)
        if self._auto_chunked is None:
            self._auto_chunked = self._chunkable_by_kernel()
        from kdforge.train.tasks import CausalLMTask

        if not (self._auto_chunked and isinstance(task, CausalLMTask) and source is not None
                and (student is None or _has_lm_head(student))):
            return False
        if "sparse" in source.provides:
            return self._sparse_closed_form_by_config()
        return "dense" in source.provides

    def _sparse_closed_form_by_config(self) -> bool:
        """Whether the KD term's configuration lets the sparse closed form compute it (``T = 1`` or
        ``sparse_policy="renormalize"``); the top-k size is checked per batch by the chunked loss."""
        from kdforge.losses import LOSSES
        from kdforge.losses.chunked import sparse_closed_form_by_config

        kd = self._teacher_terms()[0]
        spec = LOSSES.get(kd.name)
        return sparse_closed_form_by_config(spec, kd.params.get("temperature", spec.default_temperature), kd.params)

    def _chunkable_by_kernel(self) -> bool:
        try:
            self._check_chunkable()
        except ConfigError:
            return False
        kd = self._teacher_terms()[0]
        if kd.scheduled_params:
            return False
        from kdforge.losses import LOSSES

        return LOSSES.get(kd.name).kernel_for(torch.empty(0), dict(kd.params)) is not None

    def schedules(self, max_steps: int) -> Any:
        """The scheduled weights and loss parameters of this objective for a run of ``max_steps``
        (:class:`~kdforge.train.schedules.ScheduledValues`; a no-op when nothing is scheduled)."""
        scheduled = {f"{t.key}.weight": t.weight_schedule for t in self.terms if t.weight_schedule is not None}
        for t in self.terms:
            scheduled.update({f"{t.key}.params.{n}": v for n, v in t.scheduled_params.items()})
        if not scheduled:
            return NoSchedules()
        from kdforge.train.schedules import ScheduledValues

        return ScheduledValues(scheduled, max_steps=max_steps)

    def __call__(self, out: Any, normalizer: float, *, values: Mapping[str, float] | None = None,
                 check_finite: bool = True) -> ObjectiveValue:
        """Weighted, normalised loss of a :class:`~kdforge.train.tasks.TaskOutput`.

        Args:
            out: task output with ``student_logits [..., V]``, ``teacher`` (``[..., V]`` logits,
                a ``SparseTeacher`` ``[..., k]`` or None), ``labels [...]``, ``mask [...]``.
            normalizer: ``N``, real positions in the whole accumulated batch (all processes).
        """
        if out.student_hidden is not None and out.student_logits is None:
            return self._chunked(out, normalizer, values, check_finite)
        norm = float(max(normalizer, 1))
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for term, fn in zip(self.terms, self._fns):
            weight, params = term.current(values)
            if term.source == "feature":
                extra = getattr(out, "extra_terms", None) or {}
                if term.key not in extra:
                    raise ConfigError(
                        f"feature term {term.key!r} was not computed: the trainer has no bound feature module",
                        "pass extra_modules=objective.bind(student, teacher) to the Distiller "
                        "(and an online teacher: a teacher cache carries no features)",
                    )
                value = extra[term.key] / norm
            elif fn is None:
                extra = getattr(out, "extra_terms", None) or {}
                if term.name not in extra:
                    raise ConfigError(
                        f"objective term {term.name!r} (source: task) was not computed by the task "
                        f"(it provided: {', '.join(sorted(extra)) or 'nothing'})",
                        "use a task that computes this term, or remove it from the objective",
                    )
                value = extra[term.name] / norm
            elif term.per_teacher:
                value = _per_teacher_sum(fn, out, params, term.key) / norm
            else:
                value = fn(out.student_logits, out.teacher, mask=out.mask, labels=out.labels,
                           reduction="sum", **params) / norm
            if check_finite:
                _check_finite(value, term.key)
            terms[term.key] = value.detach()
            weighted = value * weight
            total = weighted if total is None else total + weighted
        assert total is not None
        return ObjectiveValue(total, terms)

    # -- chunked mode -------------------------------------------------------------------------
    def _check_chunkable(self) -> None:
        kd = self._teacher_terms()
        if any(t.per_teacher for t in self.terms):
            raise ConfigError("chunked=True does not support per_teacher terms (one loss per ensemble member)",
                              "set chunked=False")
        if any(t.source == "task" for t in self.terms):
            raise ConfigError("chunked=True does not support task terms", "set chunked=False")
        if self.feature_terms:
            raise ConfigError(
                f"chunked=True does not support feature terms ({', '.join(t.key for t in self.feature_terms)})",
                "set chunked=False (feature terms need the full forward pass of both models)",
            )
        if len(kd) != 1 or len(self.terms) > 2 or any(t.name != "cross_entropy" for t in self.terms if t not in kd):
            raise ConfigError(
                f"chunked=True supports one distillation term plus an optional cross_entropy term, got {self!r}",
                "drop extra terms or set chunked=False",
            )
        try:
            from kdforge.losses.chunked import trainable_module_params
        except ImportError as exc:
            raise ConfigError(
                "chunked=True needs kdforge.losses.chunked, which is not available in this install",
                "set chunked=False",
            ) from exc
        params = kd[0].params
        if params.get("learned") is True or trainable_module_params(params):
            raise ConfigError(f"chunked=True cannot train the learned module of {kd[0].key!r} (the chunks "
                              "differentiate the logits only)", "set chunked=False")

    def _chunked(self, out: Any, normalizer: float, values: Mapping[str, float] | None = None,
                 check_finite: bool = True) -> ObjectiveValue:
        from kdforge.losses.chunked import chunked_distillation_loss

        kd = self._teacher_terms()[0]
        ce = next((t for t in self.terms if t is not kd), None)  # cross_entropy (_check_chunkable)
        kd_weight, params = kd.current(values)
        params = dict(params)
        temperature = params.pop("temperature", None)  # None: the loss's own default
        hidden = out.student_hidden.reshape(-1, out.student_hidden.shape[-1])
        res = chunked_distillation_loss(
            hidden, out.lm_head_weight, out.teacher, loss=kd.name, labels=out.labels.reshape(-1),
            mask=out.mask.reshape(-1), kd_weight=kd_weight, ce_weight=ce.current(values)[0] if ce else 0.0,
            temperature=temperature, chunk_size=self.chunk_size, reduction="sum",
            compile_kernels=self.compile_kernels, log_ce=ce is not None, **params,
        )
        norm = float(max(normalizer, 1))
        total = res["loss"] / norm
        if check_finite:
            _check_finite(total, "chunked loss")
        terms = {kd.key: (res["kd"] / norm).detach()}
        if ce is not None:
            terms[ce.key] = (res["ce"] / norm).detach()
        return ObjectiveValue(total, terms)


def _per_teacher_sum(fn: Any, out: Any, params: Mapping[str, Any], key: str) -> torch.Tensor:
    """``sum_s sum_positions w_s * loss(student, teacher_s)`` over the signal's ensemble members."""
    members = getattr(out.signal, "members", None)
    if not members:
        raise ConfigError(
            f"term {key!r} has per_teacher: true, but the teacher signal carries no ensemble members",
            "use EnsembleTeacher([...], per_member_signals=True) (the recipes' ensemble teachers set it), "
            "or drop per_teacher",
        )
    total: torch.Tensor | None = None
    for member in members:
        per_pos = fn(out.student_logits, member.distribution, mask=out.mask, labels=out.labels,
                     reduction="none", **params)
        part = (per_pos * member.weights.to(per_pos.dtype)).sum()
        total = part if total is None else total + part
    assert total is not None
    return total


def _has_lm_head(model: nn.Module) -> bool:
    """True for a model exposing its LM head as ``get_output_embeddings()`` (Hugging Face causal LMs)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return isinstance(getattr(head, "weight", None), torch.Tensor)


def _check_finite(value: torch.Tensor, key: str) -> None:
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteError(
            f"loss term {key!r} is {value.detach().float().item()} (not finite)",
            "lower the learning rate, enable max_grad_norm, check the data for empty targets, "
            "or use bf16 instead of fp16",
        )


class NoSchedules:
    """The scheduled values of an objective without schedules: nothing to apply, log or restore."""

    def current(self, step: int) -> dict[str, float]:
        return {}

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Nothing adapts."""

    def log_values(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
