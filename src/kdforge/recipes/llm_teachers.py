"""Multi-teacher distillation in the ``llm_kd`` recipe: further teachers and ensemble methods.

``llm_kd`` (:mod:`kdforge.recipes.llm_kd`) only registers the keys; what they mean lives here:

* ``teachers: [{name, model, ...}]`` (top level) — further teachers beside ``teacher:``, each a
  model source like ``teacher:`` (an asset, a ``save_pretrained`` folder or a Hub id) with a
  ``name``. Every one must share the run's tokenizer and logit width (the student's vocabulary);
  they are checked before anything is written and scored on the held-out blocks like the main
  teacher (rows ``teacher / NAME`` of ``results.json``). The main teacher is the member
  ``teacher``.
* ``teacher: ensemble`` with ``ensemble: {members, weighting, weights, temperature, source}`` per
  method — the method distils from the weighted *mixture* of its members' distributions,
  ``p(i) = sum_s w_s p_s(i)`` (:class:`kdforge.teachers.sources.EnsembleTeacher`): ``fixed``
  weights (default uniform), per-sample ``confidence`` (mean max-probability) or ``entropy``
  (``softmax_s(-H_s / temperature)``) weights. The objective's terms see the fused signal.
  ``source: cache`` (default) reads one top-k cache per member, each built once with the run's
  ``cache:`` settings (the main teacher's is the run's own ``teacher_cache``; a further teacher's
  is ``<cache dir>-<name>`` or its ``cache_dir``) and reused on a re-run or ``--resume``; the
  members' top-k lists are merged by id. ``source: online`` runs the live members on every batch
  (dense mixture, no truncation). An ensemble of one member is that teacher alone (e.g. ``KD from
  the second teacher``).

Per-domain weights (``EnsembleTeacher(weighting="per_domain")``) need a domain per training row,
which the recipe's data does not carry: use the Python API for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from kdforge.config import StrictModel
from kdforge.errors import VocabMismatchError
from kdforge.models import ModelSource

log = logging.getLogger(__name__)

__all__ = ["MAIN", "EnsembleSpec", "ExtraTeacherSpec", "MemberCaches", "TeacherSet", "check_ensemble_method",
           "cached_ensemble", "check_teacher_names", "check_teachers_vocab", "ensemble_key", "ensemble_teacher", "member_cache_dir",
           "prepare_teachers", "teacher_rows"]

MAIN = "teacher"  # the member name of the run's own ``teacher:``


class ExtraTeacherSpec(ModelSource):
    """A further teacher of ``llm_kd`` (``teachers:``): a model source like ``teacher:`` plus a name."""

    name: str = Field(description="the member name that ensemble methods list (not 'teacher')")
    cache_dir: str | None = Field(None, description="its top-k cache (default: the run's cache dir + '-NAME')")


class EnsembleSpec(StrictModel):
    """The teachers of a ``teacher: ensemble`` method and how their distributions are weighted."""

    members: list[str] = Field(min_length=1, description="'teacher' (the run's teacher) and/or names from teachers:")
    weighting: Literal["fixed", "confidence", "entropy"] = Field(
        "fixed", description="fixed (weights), confidence (mean max-prob per sample), entropy (softmax of -H/T)")
    weights: list[float] | None = Field(None, description="fixed weights, one per member (default: uniform)")
    temperature: float = Field(1.0, gt=0.0, description="of the entropy weighting")
    source: Literal["cache", "online"] = Field(
        "cache", description="cache (one top-k cache per member, merged by id) or online (live members, dense)")
    sparse_k: int | Literal["union"] | None = Field(
        None, description="entries of the merged top-k (default: the cache's k; union keeps every member's)")

    @field_validator("members")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"ensemble.members must be distinct, got {value}")
        return value

    @model_validator(mode="after")
    def _weights(self) -> EnsembleSpec:
        if isinstance(self.sparse_k, int) and self.sparse_k < 1:
            raise ValueError(f"ensemble.sparse_k must be >= 1 or 'union', got {self.sparse_k}")
        if self.weights is None:
            return self
        if self.weighting != "fixed":
            raise ValueError(f"ensemble.weights are the fixed weighting's, but weighting is {self.weighting}; "
                             "drop weights or use weighting: fixed")
        if len(self.weights) != len(self.members):
            raise ValueError(f"ensemble.weights has {len(self.weights)} entries for {len(self.members)} members "
                             f"{self.members}; give one weight per member")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"ensemble.weights must be non-negative and not all zero, got {self.weights}")
        return self


# --------------------------------------------------------------------------------------------- checks
def check_ensemble_method(method: Any) -> None:
    """Raise ``ValueError`` (a validation message) for an inconsistent ``teacher``/``ensemble`` pair.

    ``method`` is an ``llm_kd`` ``MethodSpec``.
    """
    from kdforge.train.objective import Objective

    ensemble = getattr(method, "ensemble", None)
    if method.teacher != "ensemble" and any(t.per_teacher for t in method.objective):
        raise ValueError("per_teacher: one term per ensemble member needs teacher: ensemble; add it (with "
                         "ensemble: {members: [...]}) or drop per_teacher")
    if ensemble is not None and method.teacher != "ensemble":
        raise ValueError("ensemble: the members of an ensemble teacher, but the method's teacher is not ensemble; "
                         "add teacher: ensemble or remove the ensemble key")
    if method.teacher != "ensemble":
        return
    if ensemble is None:
        raise ValueError("teacher: ensemble needs ensemble: {members: [teacher, NAME, ...]} (NAME from the "
                         "top-level teachers: list)")
    if method.on_policy is not None or getattr(method, "minillm", None) is not None:
        raise ValueError("teacher: ensemble with on_policy/minillm is not supported by llm_kd; use the Python API "
                         "(Distiller(student, EnsembleTeacher([...]), on_policy=...)) or one online teacher")
    import copy

    if Objective(copy.deepcopy(method.objective)).feature_terms:
        raise ValueError("teacher: ensemble mixes output distributions; feature terms need one teacher's hidden "
                         "states: use teacher: online for them or remove the feature terms")


def check_teacher_names(config: Any) -> None:
    """Raise ``ValueError`` for ``teachers:`` names that clash or ensemble members that name no teacher.

    ``config`` is an ``LLMKDConfig``.
    """
    from kdforge.recipes.subrun import slug

    names = [t.name for t in config.teachers]
    if MAIN in names:
        raise ValueError(f"teachers: the name {MAIN!r} is the run's own teacher; give the further teacher another name")
    if len(set(names)) != len(names) or len({slug(n) for n in names}) != len(names):
        raise ValueError(f"teachers: names must be distinct (also as folder names), got {names}")
    known = {MAIN, *names}
    for m in config.methods:
        ens = getattr(m, "ensemble", None)
        if ens is None:
            continue
        unknown = [n for n in ens.members if n not in known]
        if unknown:
            raise ValueError(f"methods: {m.name!r} ensemble.members {unknown} name no teacher; use {sorted(known)} "
                             "(add further teachers to the top-level teachers: list)")
        if ens.source == "cache" and config.cache.tail_samples:
            raise ValueError(f"methods: {m.name!r} mixes cached teachers, but cache.tail_samples="
                             f"{config.cache.tail_samples} stores sampled tails that cannot be merged; set "
                             "cache.tail_samples: 0 or ensemble.source: online")


def check_teachers_vocab(config: Any, tokenizer: Any) -> None:
    """Every further teacher exists and shares the main teacher's tokenizer and logit width (no weights read).

    Raises:
        AssetError: a missing folder, a Hub id offline.
        VocabMismatchError: another tokenizer or logit width, with the fix.
    """
    from kdforge.models import check_source, load_config, load_tokenizer
    from kdforge.teachers.vocab import tokenizer_fingerprint

    if not config.teachers:
        return
    width = getattr(load_config(config.teacher, what="teacher"), "vocab_size", None)
    mine = tokenizer_fingerprint(tokenizer)
    for spec in config.teachers:
        what = f"teacher {spec.name!r}"
        check_source(spec, what=what)
        if tokenizer_fingerprint(load_tokenizer(spec, what=what)) != mine:
            raise VocabMismatchError(
                f"{what} ({spec.model}) has another tokenizer than the run's teacher ({config.teacher.model}); "
                "ensemble members must give distributions over the student's vocabulary",
                "use a teacher of the same tokenizer (e.g. a fine-tuned copy of the teacher), or distil from it "
                "alone with the recipe cross_tokenizer_kd (docs/cross-tokenizer.md)")
        other = getattr(load_config(spec, what=what), "vocab_size", None)
        if width is not None and other is not None and int(other) != int(width):
            raise VocabMismatchError(
                f"{what} has {other} logits per position, the run's teacher {width} (same tokenizer, embedding "
                "matrices padded differently)",
                "use a checkpoint with the teacher's logit width (resize_token_embeddings), or distil from it alone")


def ensemble_key(config: Any, method: Any) -> dict[str, Any]:
    """What a ``teacher: ensemble`` method's result further depends on: its further teachers (empty otherwise,
    so the fingerprint of every other sub-run is unchanged)."""
    ens = getattr(method, "ensemble", None)
    if ens is None:
        return {}
    from kdforge.recipes.subrun import config_key

    specs = {t.name: t for t in config.teachers}
    return {"ensemble_teachers": {n: config_key(specs[n], exclude={"cache_dir"})
                                  for n in ens.members if n != MAIN}}


# --------------------------------------------------------------------------------------------- run time
class MemberCaches(torch.utils.data.Dataset):
    """Rows of several teacher caches over the same token blocks, one item per block.

    Item ``i``: ``input_ids``, ``attention_mask``, ``labels`` of the first cache, and for every
    member ``NAME`` its ``teacher_ids/NAME`` and ``teacher_logprobs/NAME`` ``[T, k]`` (not the plain
    ``teacher_ids`` key, which the trainer would read as the one cached teacher).
    """

    def __init__(self, caches: dict[str, Any]) -> None:
        from kdforge.errors import CacheError

        self.caches = caches
        sizes = {name: len(ds) for name, ds in caches.items()}
        if len(set(sizes.values())) != 1:
            raise CacheError(f"the member caches hold different numbers of rows: {sizes}",
                             "build every member's cache over the same training blocks")

    def __len__(self) -> int:
        return len(next(iter(self.caches.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item: dict[str, torch.Tensor] = {}
        for name, ds in self.caches.items():
            row = ds[index]
            if not item:
                item = {k: row[k] for k in ("input_ids", "attention_mask", "labels")}
            item[f"teacher_ids/{name}"] = row["teacher_ids"]
            item[f"teacher_logprobs/{name}"] = row["teacher_logprobs"]
        return item


def cached_ensemble(names: list[str], **kwargs: Any) -> Any:
    """An :class:`~kdforge.teachers.sources.EnsembleTeacher` of the cached members ``names`` (batch keys
    ``teacher_ids/NAME``, ``teacher_logprobs/NAME``) that gives *no* signal on a batch without any member's
    keys (the held-out blocks scored during training: perplexity only, as for the one cached teacher);
    a training batch then fails with the trainer's "needs a teacher signal" error."""
    from kdforge.teachers.signal import TeacherSignal
    from kdforge.teachers.sources import CachedTeacher, EnsembleTeacher

    class _Ensemble(EnsembleTeacher):
        def signal(self, batch: Any, task: Any, *, features: Any = None) -> TeacherSignal:
            if features is None and not any(s.present_in(batch) for s in self.sources):
                return TeacherSignal()
            return super().signal(batch, task, features=features)

    members = [CachedTeacher(ids_key=f"teacher_ids/{n}", logprobs_key=f"teacher_logprobs/{n}") for n in names]
    return _Ensemble(members, **kwargs)


@dataclass
class TeacherSet:
    """The run's further teachers (loaded once) and the top-k cache of every cached ensemble member."""

    models: dict[str, torch.nn.Module]  # every member by name, the main teacher under MAIN
    cache_dirs: dict[str, Path] = field(default_factory=dict)
    caches: dict[str, Any] = field(default_factory=dict)  # name -> TeacherCacheDataset

    def extra(self) -> dict[str, torch.nn.Module]:
        """The further teachers (not the main one)."""
        return {n: m for n, m in self.models.items() if n != MAIN}


def member_cache_dir(config: Any, run_out: Path, name: str) -> Path:
    """Where member ``name``'s cache lives: the run's cache (main teacher), else ``<that>-<name>`` or its
    ``cache_dir``."""
    from kdforge.recipes.subrun import slug

    main = Path(config.cache.dir) if config.cache.dir else run_out / "teacher_cache"
    if name == MAIN:
        return main
    spec = next(t for t in config.teachers if t.name == name)
    return Path(spec.cache_dir) if spec.cache_dir else main.with_name(f"{main.name}-{slug(name)}")


def prepare_teachers(config: Any, run: Any, data: Any, tokenizer: Any, teacher: torch.nn.Module,
                     timings: dict[str, float], run_cache: Path | None = None) -> TeacherSet | None:
    """Load the further teachers and build (or reuse) one top-k cache per cached ensemble member.

    ``run_cache``: the main teacher's cache that ``llm_kd`` has already built for the run (the same
    folder as the main member's): it serves as that member's cache as it is, never rebuilt here.

    Returns None when the config has neither further teachers nor ensemble methods.
    """
    from kdforge.models import load_causal_lm
    from kdforge.recipes.subrun import timed
    from kdforge.teachers import TeacherCacheDataset, build_teacher_cache

    ensembles = [m.ensemble for m in config.methods if getattr(m, "ensemble", None) is not None]
    if not config.teachers and not ensembles:
        return None
    models: dict[str, torch.nn.Module] = {MAIN: teacher}
    width = int(teacher.get_output_embeddings().weight.shape[0])
    with timed(timings, "load_teachers_s"):
        for spec in config.teachers:
            model = load_causal_lm(spec, what=f"teacher {spec.name!r}").requires_grad_(False).eval()
            other = int(model.get_output_embeddings().weight.shape[0])
            if other != width:
                raise VocabMismatchError(f"teacher {spec.name!r} has {other} logits per position, the run's teacher "
                                         f"{width}", "use a checkpoint with the teacher's logit width")
            models[spec.name] = model
    teachers = TeacherSet(models)
    cached = sorted({n for e in ensembles if e.source == "cache" for n in e.members}, key=[MAIN, *models].index)
    c = config.cache
    with timed(timings, "member_caches_s"):  # its own key: teacher_cache_s is the run's cache, timed by llm_kd
        for name in cached:
            out = member_cache_dir(config, run.out, name)
            if not (name == MAIN and run_cache is not None):  # else: the run's cache, built already
                spec = config.teacher if name == MAIN else next(t for t in config.teachers if t.name == name)
                own = not c.dir and getattr(spec, "cache_dir", None) is None
                build_teacher_cache(models[name], data.train, out, k=c.k, encoding=c.encoding,
                                    batch_size=c.batch_size, tokenizer=tokenizer, teacher_id=_model_id(spec),
                                    overwrite=own,  # only our own RUN_DIR caches are replaced
                                    data_parallel=run.group,
                                    loss_mask=data.train_loss_mask())  # response-only, like the run's cache
            teachers.cache_dirs[name] = out
            teachers.caches[name] = TeacherCacheDataset(out, sequences=data.train, tokenizer=tokenizer)
    return teachers


def ensemble_teacher(method: Any, teachers: TeacherSet, data: Any) -> tuple[Any, Any, Any]:
    """``(teacher source, training data, collate_fn)`` of a ``teacher: ensemble`` method's Distiller.

    ``data`` is the recipe's :class:`~kdforge.recipes.lm_data.LMData` (its response-only labels and
    masks are laid over the cached rows).
    """
    from kdforge.data.text import LMBlockDataset
    from kdforge.teachers import OnlineTeacher, collate_teacher_cache
    from kdforge.teachers.sources import EnsembleTeacher

    ens = method.ensemble
    kwargs: dict[str, Any] = {"weighting": ens.weighting, "sparse_k": ens.sparse_k}
    if ens.weighting == "fixed" and ens.weights is not None:
        kwargs["weights"] = ens.weights
    if ens.weighting == "entropy":
        kwargs["temperature"] = ens.temperature
    kwargs["per_member_signals"] = any(t.per_teacher for t in method.objective)  # per_teacher terms: every member
    if ens.source == "online":
        members = [OnlineTeacher(teachers.models[n]) for n in ens.members]
        return EnsembleTeacher(members, **kwargs), LMBlockDataset(data.train, data.train_extras()), None
    from kdforge.recipes.lm_data import WithLabels

    rows: Any = MemberCaches({n: teachers.caches[n] for n in ens.members})
    if data.train_extras():
        rows = WithLabels(rows, data.train_extras())
    return cached_ensemble(list(ens.members), **kwargs), rows, collate_teacher_cache


def _model_id(spec: ModelSource) -> str:
    return spec.model + (f"@{spec.revision}" if spec.revision else "")


def teacher_rows(teachers: TeacherSet, metrics: Any) -> list[dict[str, Any]]:
    """``results.json`` rows of the further teachers (``metrics(key)``: their held-out scores by model key)."""
    from kdforge.eval.cost import count_parameters

    rows = []
    for name, model in teachers.extra().items():
        params = count_parameters(model)
        rows.append({"name": f"teacher / {name}", "role": "teacher", "params": params,
                     "size_mb": round(params * next(model.parameters()).dtype.itemsize / 2**20, 1),
                     "metrics": metrics(f"teacher / {name}"),
                     **({"cache_dir": str(teachers.cache_dirs[name])} if name in teachers.cache_dirs else {})})
    return rows
