"""Feature terms from the cached teacher in the ``llm_kd`` recipe (``teacher: cache`` + ``hidden_mse``...).

``llm_kd`` (:mod:`kdforge.recipes.llm_kd`) only calls these helpers; what they do:

* **Which layers.** A method with ``teacher: cache`` and hidden-state feature terms (``hidden_mse``,
  ``cosine_hidden``, ``cka``, ``trg``) reads the teacher's hidden states of the layers its terms map
  to. They are found by binding the terms to the untrained student and the live teacher
  (:meth:`kdforge.train.Objective.bind`: the same layer maps training resolves), and the union over
  all such methods is stored with the run's teacher cache (``feature_layers`` of
  :func:`kdforge.teachers.build_teacher_cache`), compressed by ``cache.feature_dtype``
  (``int8`` default, ``bf16``, or ``fp32``: exact). A run without such a method builds the very
  same cache as before (no hidden states).
* **Fingerprint.** The stored layers and their encoding are part of the cache manifest
  (``features``), which must match for a cache to be reused: the run's own cache
  (``RUN_DIR/teacher_cache``) is rebuilt when they change; a cache given by ``cache.dir`` is
  reused when it already stores every needed layer in the same encoding (e.g. one built with
  ``kdforge cache-teacher`` and more layers), else refused before anything is trained with a
  :class:`~kdforge.errors.CacheError` naming the layers and the fix.
* **Training.** The method's Distiller gets :func:`cached_feature_teacher`: a
  :class:`~kdforge.teachers.sources.CachedTeacher` whose ``model`` is a weight-free stand-in
  (the teacher's depth and width) for binding, which reads the hidden states from the batches
  of the cache; the live teacher does not run for the method. Held-out blocks scored during
  training carry no cache keys: they give perplexity only (as for any cached method).

Attention and module-output terms (``attention_kl``, ``value_relation_kl``, terms with
``student_modules``, ``nd``, ``ofa``) cannot be cached: such a method with ``teacher: cache`` is
refused at validation with the fix (``teacher: online``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdforge.errors import CacheError

log = logging.getLogger(__name__)

__all__ = ["CACHEABLE_KINDS", "cache_feature_kwargs", "cached_feature_methods", "cached_feature_teacher",
           "check_cached_feature_method", "check_cached_features_config", "feature_cache_size", "feature_key",
           "needed_layers", "stored_features",
           "uses_cached_features"]

#: feature-loss kinds that read only ``hidden_states`` (what a cache can store)
CACHEABLE_KINDS = ("hint", "cka", "trg")


def _feature_terms(method: Any) -> list[Any]:
    from kdforge.train.objective import Objective

    return Objective(copy.deepcopy(method.objective)).feature_terms


def uses_cached_features(method: Any) -> bool:
    """Whether ``method`` (an ``llm_kd`` ``MethodSpec``) trains feature terms from the teacher cache."""
    return method.teacher == "cache" and bool(_feature_terms(method))


def cached_feature_methods(config: Any) -> list[Any]:
    """The methods of ``config`` (an ``LLMKDConfig``) with ``teacher: cache`` and feature terms."""
    return [m for m in config.methods if uses_cached_features(m)]


def check_cached_feature_method(method: Any) -> None:
    """Raise ``ValueError`` (a validation message) for a ``teacher: cache`` feature term the cache cannot hold.

    Only hidden states are cached: attention maps, module outputs (``student_modules``), ``nd`` and
    ``ofa`` need the live teacher.
    """
    from kdforge.features.terms import FEATURE_LOSSES

    if method.teacher != "cache":
        return
    for term in _feature_terms(method):
        spec = FEATURE_LOSSES.get(term.name)
        params = term.params if not isinstance(term.params, dict) else spec.validate_params(term.params)
        if spec.kind not in CACHEABLE_KINDS or getattr(params, "student_modules", None):
            what = "module outputs" if getattr(params, "student_modules", None) else f"{spec.kind} features"
            raise ValueError(
                f"teacher: cache stores the teacher's hidden states only, but the feature term {term.key!r} reads "
                f"{what}; use teacher: online for this method (or hidden-state terms: hidden_mse, cosine_hidden, "
                "cka, trg)")


def check_cached_features_config(config: Any) -> None:
    """Raise ``ValueError`` for run settings that cannot store hidden states (``cache.tail_samples``)."""
    methods = cached_feature_methods(config)
    if methods and config.cache.tail_samples:
        raise ValueError(
            f"methods {[m.name for m in methods]} read hidden states from the teacher cache, which cannot be stored "
            f"beside cache.tail_samples={config.cache.tail_samples}; set cache.tail_samples: 0, or teacher: online "
            "for these methods")


def feature_key(config: Any, method: Any) -> dict[str, Any]:
    """What a cached-feature method's result further depends on: the hidden states' encoding (empty for
    every other method, so their sub-run fingerprints are unchanged)."""
    return {"cache_feature_dtype": config.cache.feature_dtype} if uses_cached_features(method) else {}


def needed_layers(config: Any, teacher: torch.nn.Module, student: torch.nn.Module) -> list[int]:
    """The teacher ``hidden_states`` indices (0 = embeddings) that the cached feature terms read, sorted.

    Raises:
        ConfigError: a term that does not fit the models (layers out of range...), from the binding.
    """
    from kdforge.features.terms import build_feature_terms

    layers: set[int] = set()
    for method in cached_feature_methods(config):
        terms = build_feature_terms([(t.key, t.name, t.params) for t in _feature_terms(method)], student, teacher)
        for plan in terms.plans:
            layers.update(int(pair[1]) for pair in plan.pairs if plan.source == "hidden_states")
    return sorted(layers)


def feature_cache_size(config: Any, teacher: torch.nn.Module, student: torch.nn.Module, rows: int,
                       seq_len: int) -> tuple[int, list[int]] | None:
    """``(bytes, layers)`` of the hidden states the run's cache will store for ``rows`` blocks of
    ``seq_len`` tokens (models may live on the meta device: only their shapes are read); None
    without cached feature methods or when the terms do not fit the models."""
    from kdforge.errors import ConfigError
    from kdforge.features.terms import _hidden_width
    from kdforge.teachers.cache.features import feature_record_bytes

    try:
        layers = needed_layers(config, teacher, student)
    except ConfigError:
        return None
    if not layers:
        return None
    width = _hidden_width(teacher)
    return rows * feature_record_bytes(config.cache.feature_dtype, len(layers), seq_len, width), layers


def cache_feature_kwargs(config: Any, teacher: torch.nn.Module, student: torch.nn.Module, cache_dir: Path, *,
                         decide: Callable[[Callable[[], Any]], Any] | None = None) -> dict[str, Any]:
    """The ``feature_layers``/``feature_dtype`` arguments of the run's cache build (empty without
    cached feature methods: the same cache as before).

    An existing complete cache at ``cache_dir`` that stores every needed layer in ``cache.feature_dtype``
    is reused as it is (its layers are passed, so the build is a no-op). ``decide``: under several
    processes, :meth:`~kdforge.recipes.subrun.RecipeRun.decide` (rank 0 reads the folder, before any
    rank starts the build, and every rank gets the same answer).

    Raises:
        CacheError: ``cache.dir`` (a cache the run does not own) holds hidden states of other layers,
            another encoding, or none; the message names the layers and the fix.
    """
    plan = (decide or (lambda fn: fn()))(lambda: _plan(config, teacher, student, cache_dir))
    if "error" in plan:
        raise CacheError(*plan["error"])
    return plan["kwargs"]


def _plan(config: Any, teacher: torch.nn.Module, student: torch.nn.Module, cache_dir: Path) -> dict[str, Any]:
    """``{"kwargs": {...}}`` or ``{"error": (problem, fix)}`` (see :func:`cache_feature_kwargs`)."""
    need = needed_layers(config, teacher, student)
    if not need:
        return {"kwargs": {}}
    dtype = config.cache.feature_dtype
    have = _stored(cache_dir)
    if have is not None and have.get("dtype") == dtype and set(need) <= set(have.get("layers", [])):
        log.info("teacher cache %s already stores hidden states of layers %s (%s): reused", cache_dir,
                 have["layers"], dtype)
        return {"kwargs": {"feature_layers": list(have["layers"]), "feature_dtype": dtype}}
    if config.cache.dir is not None and (cache_dir / "manifest.json").is_file():
        stored = "no hidden states" if have is None else f"hidden states of layers {have.get('layers')} ({have.get('dtype')})"
        return {"error": (
            f"the teacher cache at {cache_dir} (cache.dir) stores {stored}, but the teacher: cache methods' feature "
            f"terms need layers {need} ({dtype})",
            f"point cache.dir to a new folder (or remove it) so the run builds one with those layers, rebuild it with "
            f"`kdforge cache-teacher` and feature_layers: {need}, feature_dtype: {dtype}, or train these methods "
            "with teacher: online")}
    log.info("teacher cache %s: storing hidden states of layers %s (%s) for the cached feature terms",
             cache_dir, need, dtype)
    return {"kwargs": {"feature_layers": need, "feature_dtype": dtype}}


def stored_features(cache_dir: Path | None) -> dict[str, Any]:
    """``{"features": {layers, dtype, bytes_per_token, max_error}}`` of the run's cache for
    ``results.json`` (empty without a cache or without hidden states)."""
    manifest = None if cache_dir is None else _complete_manifest(cache_dir)
    info = None if manifest is None else manifest.get("features")
    if info is None:
        return {}
    stats = manifest.get("stats", {})
    return {"features": {"layers": info["layers"], "dtype": info["dtype"],
                         "bytes_per_token": stats.get("features_bytes_per_token"),
                         "max_error": stats.get("features_max_error"),
                         "topk_bytes_per_token": stats.get("bytes_per_token")}}


def _stored(cache_dir: Path) -> dict[str, Any] | None:
    """The ``features`` entry of a complete cache at ``cache_dir`` (None: no cache, unfinished, or none)."""
    manifest = _complete_manifest(cache_dir)
    return None if manifest is None else manifest.get("features")


def _complete_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete, readable cache at ``cache_dir``, else None."""
    from kdforge.teachers.cache.format import read_manifest

    if not (cache_dir / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(cache_dir)
    except CacheError:
        return None
    return manifest if manifest.get("complete") else None


def cached_feature_teacher(cache_dir: Path) -> Any:
    """The teacher source of a cached-feature method's Distiller.

    A :class:`~kdforge.teachers.sources.CachedTeacher` with the cached teacher's depth/width stand-in
    (:meth:`~kdforge.teachers.sources.CachedTeacher.with_features`) that gives *no* signal on a batch
    without cache keys (the held-out blocks scored during training: perplexity only). Training
    batches of the cache carry the hidden states.
    """
    from kdforge.teachers.cache.reader import TeacherCache
    from kdforge.teachers.signal import TeacherSignal
    from kdforge.teachers.sources import CachedTeacher

    class _CachedFeatures(CachedTeacher):
        def signal(self, batch: Any, task: Any, *, features: Any = None) -> TeacherSignal:
            if not self.present_in(batch):
                return TeacherSignal()
            return super().signal(batch, task, features=features)

    return _CachedFeatures.with_features(TeacherCache(cache_dir, verify=False), vocab_size=None)
