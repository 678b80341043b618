"""``llm_kd``: distil a causal LM teacher into a student, per method, from a cached top-k or online.

Teacher, student and data are the user's (docs/bring-your-own.md): the teacher is an asset, a
folder or a Hub id placed on the accelerator when there is one (:mod:`kdforge.models`); the
student is cut from the teacher (default), pretrained, or built from a config
(:mod:`kdforge.students.build`); the data is a corpus of documents or any dataset of
:mod:`kdforge.data`, chat and prompt/completion rows trained on their responses only
(:mod:`kdforge.recipes.lm_data`). Everything that needs no weights is checked before anything is
written (:func:`check_inputs`).

What one run does (the LLM quickstart, ``configs/quickstart.yaml``):

1. loads the teacher (default: the offline SmolLM2-135M-Instruct asset) and its tokenizer;
2. packs real prose (default: Jane Austen; train on one novel, hold out another) into
   ``[N, T]`` token blocks (:mod:`kdforge.data.text`), or renders a dataset's rows (padded or
   packed, labels ``-100`` outside the responses);
3. runs the teacher **once** over the training blocks and stores its top-k log-probabilities
   (:func:`kdforge.teachers.build_teacher_cache`; resumable, reused on a re-run), when some
   method reads the cache (``teacher: online`` methods run the live teacher instead);
4. builds one student (default: from the teacher's copied embeddings, final norm, head and a
   subset of the decoder layers: :func:`kdforge.students.student_from_teacher`);
5. trains a copy of that **same** student per method (e.g. labels only vs KD from the cache) and
   per seed, for the same steps on the same batches, with :class:`kdforge.train.Distiller`;
6. evaluates the teacher, the untrained student and every trained student on the held-out blocks
   in one pass (teacher logits computed once per batch: :func:`kdforge.eval.lm.evaluate_language_models`):
   perplexity, top-1 agreement and ``KL(p_teacher || q_student)``; measures parameters and
   inference tokens/s;
7. writes ``RUN_DIR/{config.yaml, results.json, results.md, quickstart.png}`` (``docs/run-format.md``),
   one nested run folder per (method, seed) with its ``metrics.jsonl``, and the trained students;
   each finished (method, seed) also gets a ``subrun.json`` record, so ``kdforge run --resume``
   skips it after a crash (and continues the interrupted one from its last checkpoint).

Several processes (``accelerate launch``): every rank runs this recipe; the cache and the training
are data-parallel, rank 0 alone evaluates and writes (``docs/scaling.md``).

Why the default regime (small training set, several passes, frozen embeddings/head) is explained in
``docs/quickstart.md``: it is where distillation measurably beats labels-only training on this
CPU-sized budget.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from kdforge.config import StrictModel
from kdforge.errors import ConfigError
from kdforge.models import ModelSource, resolve_model_path
from kdforge.recipes import RECIPES, Recipe, llm_features, llm_teachers
from kdforge.recipes.learned_terms import attach_clip_nets
from kdforge.recipes.llm_ddk import DDKSpec, carve_dev, ddk_sampler, teacher_domain_losses
from kdforge.recipes.llm_regimes import EMASpec, MiniLLMSpec, check_method, method_regime
from kdforge.recipes.llm_teachers import EnsembleSpec, ExtraTeacherSpec
from kdforge.recipes.lm_data import (
    CorpusSpec,
    LMData,
    LMDataSpec,
    load_corpus_documents,
)
from kdforge.recipes.subrun import (
    FINGERPRINT_FILE,
    SUBRUN_RECORD,
    RecipeRun,
    config_key,
    copy_of,
    fingerprint,
    slug,
    timed,
    train_student,
)
from kdforge.students.build import StudentSpec
from kdforge.train.config import TrainConfig
from kdforge.train.objective import LossTerm, Objective
from kdforge.train.onpolicy import OnPolicyConfig

log = logging.getLogger(__name__)


class TeacherSpec(ModelSource):
    """The teacher: an asset name (``smollm2``), a local folder, or a Hub id (with ``revision``,
    ``trust_remote_code``; token from ``HF_TOKEN``), placed by ``device`` (``auto``: the accelerator
    when there is one), ``dtype``, ``device_map: auto`` and ``attn_implementation``
    (:mod:`kdforge.models`)."""


DataSpec = CorpusSpec  # the corpus form of ``data:`` (older callers import this name)


class CacheSpec(StrictModel):
    """The offline teacher top-k cache over the training blocks."""

    k: int = Field(64, ge=0)
    tail_samples: int = Field(0, ge=0, description=(
        "draws per position from the teacher's distribution outside the top-k (an unbiased estimate "
        "of the tail; forward KL at T=1 only; docs/teacher-cache.md), e.g. k: 8, tail_samples: 16"))
    sample_seed: int = 0
    encoding: str = "compact-u8-zlib"
    batch_size: int = Field(8, ge=1)
    dir: str | None = Field(None, description="default: RUN_DIR/teacher_cache")
    feature_dtype: Literal["int8", "bf16", "fp32"] = Field("int8", description=(
        "encoding of the teacher hidden states stored for teacher: cache methods with feature terms "
        "(int8 per-row scaled, bf16, fp32 exact; kdforge.recipes.llm_features)"))


class OnPolicySpec(OnPolicyConfig):
    """GKD for one method (:class:`kdforge.train.OnPolicyConfig`) plus the prompt/completion split.

    Each training block's first ``prompt_tokens`` tokens are the prompt (label -100); with
    probability ``lmbda`` the rest is replaced by ``max_new_tokens`` tokens sampled from the student,
    scored by the online teacher.
    """

    prompt_tokens: int = Field(32, ge=1, description="leading tokens of each block used as the prompt")

    def to_config(self) -> OnPolicyConfig:
        return OnPolicyConfig(**self.model_dump(exclude={"prompt_tokens"}))


class TAIDSpec(StrictModel):
    """The TAID schedule of a method (:class:`kdforge.losses.taid.TAIDSchedule`, run over train.max_steps)."""

    t_start: float = Field(0.4, ge=0.0, le=1.0)
    t_end: float = Field(1.0, ge=0.0, le=1.0)
    mode: Literal["adaptive", "linear"] = "adaptive"
    alpha: float = Field(5e-4, ge=0.0, le=1.0, description="adaptive step size")
    beta: float = Field(0.99, ge=0.0, le=1.0, description="momentum of the relative loss change")
    term: str | None = Field(None, description="label of the taid term to drive (default: the only one)")

    @model_validator(mode="after")
    def _rises(self) -> TAIDSpec:
        if self.t_start > self.t_end:
            raise ValueError(f"t_start={self.t_start} > t_end={self.t_end}: t must rise")
        return self


class MethodSpec(StrictModel):
    """One way of training the student: a name, a role and an explicit objective.

    Optional regimes: ``on_policy`` (GKD with the online teacher instead of the cache), ``taid``
    (a :class:`~kdforge.train.TAIDCallback` steps the objective's ``taid`` term), ``chunked``
    (LM head + loss in chunks of positions: :class:`~kdforge.train.Objective` ``chunked``; the
    default ``auto`` takes it wherever it is exact and cheaper, i.e. with the online teacher).

    ``teacher`` picks where the teacher signal comes from: ``cache`` (the top-k cache built once
    before training, plus the hidden states its feature terms read: :mod:`kdforge.recipes.llm_features`), ``online`` (the live teacher on every batch: dense logits, no top-k
    truncation) or null (the default: online when the method needs it, i.e. ``on_policy`` or
    feature terms, else the cache).
    """

    name: str = Field(description="any text; its folder under RUN_DIR is the name in lower case with every run of "
                                  "other characters (spaces, brackets, slashes...) turned into '-' (kd [T=2] -> kd-t-2)")
    role: Literal["baseline", "student"] = "student"
    objective: list[LossTerm]
    teacher: Literal["cache", "online", "ema", "ensemble"] | None = Field(
        None, description="cache (the top-k cache), online (the live teacher every batch), ema (an EMA of the "
                          "student: self-distillation), ensemble (a mixture of teachers: the ensemble key); "
                          "null = online only for on_policy, minillm or feature terms")
    on_policy: OnPolicySpec | None = None
    taid: TAIDSpec | None = None
    minillm: MiniLLMSpec | None = Field(None, description="MiniLLM (kdforge.recipes.llm_regimes): needs a minillm term")
    ema: EMASpec | None = Field(None, description="settings of teacher: ema (default decay 0.99, every step)")
    ensemble: EnsembleSpec | None = Field(None, description="members and weighting of teacher: ensemble "
                                                            "(kdforge.recipes.llm_teachers)")
    chunked: bool | Literal["auto"] = "auto"
    ddk: DDKSpec | None = Field(None, description="DDK domain reweighting (kdforge.recipes.llm_ddk): needs "
                                                  "data.domain_field")

    @field_validator("objective")
    @classmethod
    def _non_empty(cls, value: list[LossTerm]) -> list[LossTerm]:
        if not value:
            raise ValueError("an objective needs at least one loss term")
        return value

    @model_validator(mode="after")
    def _regimes(self) -> MethodSpec:
        if self.taid is not None:
            taid_keys = [t.key for t in self.objective if t.name == "taid" and t.source == "loss"]
            if not taid_keys:
                raise ValueError("taid: a TAID schedule needs a term {name: taid, weight: ...} in this method's "
                                 "objective (or remove the taid key)")
            if self.taid.term is None and len(taid_keys) > 1:
                raise ValueError(f"taid.term: the objective has several taid terms {taid_keys}; name the one to drive")
            if self.taid.term is not None and self.taid.term not in taid_keys:
                raise ValueError(f"taid.term: {self.taid.term!r} is not a taid term of the objective {taid_keys}")
        if self.chunked is True:
            try:
                Objective(self.objective, chunked=True)
            except ConfigError as exc:
                raise ValueError(f"chunked: {exc.problem}; {exc.fix or ''}".rstrip("; ")) from None
        if self.teacher == "cache":
            if self.on_policy is not None:
                raise ValueError("teacher: cache cannot score the student's own samples (on_policy); "
                                 "use teacher: online or remove the teacher key")
            llm_features.check_cached_feature_method(self)  # hidden states only (kdforge.recipes.llm_features)
        check_method(self)  # minillm / ema keys (kdforge.recipes.llm_regimes)
        llm_teachers.check_ensemble_method(self)  # teacher: ensemble (kdforge.recipes.llm_teachers)
        return self

    def uses_online_teacher(self) -> bool:
        """Whether this method reads the live teacher (else the top-k cache)."""
        if self.teacher is not None:
            return self.teacher != "cache"  # online, or ema (dense logits of the student's average)
        return self.on_policy is not None or self.minillm is not None or bool(Objective(copy.deepcopy(self.objective)).feature_terms)


class EvalSpec(StrictModel):
    batch_size: int = Field(8, ge=1)
    during_training_sequences: int = Field(
        16, ge=0, description="held-out blocks scored every train.eval_every steps (0 = off)"
    )
    speed_batch: int = Field(8, ge=1, description="batch size of the inference tokens/s measurement")
    speed_repeats: int = Field(2, ge=1)


def _default_train() -> TrainConfig:
    return TrainConfig(max_steps=100, batch_size=8, lr=1e-3, scheduler="linear", warmup_steps=5,
                       log_every=10, eval_every=25)


def _default_methods() -> list[MethodSpec]:
    return [
        MethodSpec(name="labels only", role="baseline",
                   objective=[LossTerm("cross_entropy", 1.0)]),
        MethodSpec(name="KD top-64", role="student",
                   objective=[LossTerm("forward_kl", 1.0, {"sparse_policy": "tail_bucket"}),
                              LossTerm("cross_entropy", 0.0)]),
    ]


class LLMKDConfig(StrictModel):
    """Config of the ``llm_kd`` recipe (YAML: ``recipe: llm_kd`` plus these keys)."""

    output_dir: str = "outputs/quickstart"
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    teachers: list[ExtraTeacherSpec] = Field(default_factory=list, description=(
        "further teachers {name, model, ...} for teacher: ensemble methods (same tokenizer; "
        "kdforge.recipes.llm_teachers)"))
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: LMDataSpec = Field(default_factory=CorpusSpec, description=(
        "a corpus of documents (corpus: austen or a folder of .txt) or any dataset of kdforge.data "
        "(path: file, folder, save_to_disk folder, preset or Hub id; chat/prompt-completion/text)"))
    cache: CacheSpec = Field(default_factory=CacheSpec)
    train: TrainConfig = Field(default_factory=_default_train)
    methods: list[MethodSpec] = Field(default_factory=_default_methods)
    seeds: list[int] = Field(default_factory=lambda: [0])
    eval: EvalSpec = Field(default_factory=EvalSpec)
    save_students: bool = True
    plot: bool = True

    @model_validator(mode="after")
    def _check(self) -> LLMKDConfig:
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("methods must list at least one method")
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if len(set(map(slug, names))) != len(names):
            raise ValueError(f"method names {names} collide once turned into folder names")
        if any(m.ddk is not None for m in self.methods) and getattr(self.data, "domain_field", None) is None:
            raise ValueError("methods: ddk samples by domain; set data.domain_field to the column naming each "
                             "row's domain (a dataset given by data.path)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        for m in self.methods:
            sampled = m.on_policy or m.minillm
            if (sampled is not None and isinstance(self.data, CorpusSpec)
                    and sampled.prompt_tokens >= self.data.seq_len):
                key = "on_policy" if m.on_policy is not None else "minillm"
                raise ValueError(f"methods: {m.name!r} {key}.prompt_tokens={sampled.prompt_tokens} must be "
                                 f"below data.seq_len={self.data.seq_len} (the rest of a block is the completion)")
        llm_teachers.check_teacher_names(self)
        llm_features.check_cached_features_config(self)
        return self


def _prompt_collate(prompt_tokens: int) -> Any:
    """Collate LM blocks for on-policy GKD: the first ``prompt_tokens`` tokens are the prompt (label -100)."""
    from torch.utils.data import default_collate

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(items)
        batch["labels"] = batch["labels"].clone()
        batch["labels"][:, :prompt_tokens] = -100
        return batch

    return collate


_slug = slug  # the folder name of a method (older callers import this name)
__all__ = ["FINGERPRINT_FILE", "LLMKD", "SUBRUN_RECORD", "LLMKDConfig", "MethodSpec", "StudentSpec", "TeacherSpec",
           "load_documents", "load_teacher", "resolve_model_path", "results_markdown", "subrun_fingerprint"]


# --------------------------------------------------------------------------------------------
# pieces (public so tests and notebooks can reuse them)


load_documents = load_corpus_documents  # ``{document: text}`` of a corpus (older callers import this name)


def measure_tokens_per_s(model: torch.nn.Module, blocks: torch.Tensor, repeats: int = 3) -> float:
    """Inference (forward, no grad) tokens per second on ``blocks`` ``[B, T]`` (mean of repeats)."""
    from kdforge.eval.cost import measure_latency

    device = next(model.parameters()).device
    stats = measure_latency(model, {"input_ids": blocks.to(device)}, warmup=1, repeats=repeats)
    return stats.throughput_per_s * blocks.shape[1]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), None
    mean = statistics.fmean(finite)
    return mean, (statistics.stdev(finite) if len(finite) > 1 else None)


# --------------------------------------------------------------------------------------------
# sub-runs (one per method x seed), for `kdforge run --resume` (kdforge.recipes.subrun)


def subrun_fingerprint(config: LLMKDConfig, method: MethodSpec, seed: int) -> str:
    """Hash of everything that determines one sub-run's trained student (not where it is written).

    A finished sub-run is reused by ``--resume`` only under the same fingerprint; a changed
    config (another lr, method, teacher...) retrains it.
    """
    return fingerprint(_subrun_key(config, method, seed))


def _subrun_key(config: LLMKDConfig, method: MethodSpec, seed: int) -> dict[str, Any]:
    return {
        "teacher": config_key(config.teacher),
        "student": config_key(config.student),
        "data": config_key(config.data),
        "cache": config_key(config.cache, exclude={"dir", "feature_dtype"}),
        "train": config_key(config.train, exclude={"output_dir", "progress", "log_with", "project", "run_name"}),
        "inner_eval": config.eval.during_training_sequences,
        "method": config_key(method),
        "seed": seed,
        **llm_teachers.ensemble_key(config, method),
        **llm_features.feature_key(config, method),
    }


@dataclass
class _Inputs:
    """What every sub-run of one ``llm_kd`` run shares (built once by :meth:`LLMKD.run`)."""

    config: LLMKDConfig
    run: RecipeRun
    teacher: torch.nn.Module
    tokenizer: Any
    data: LMData  # train and held-out rows (with response-only labels for a dataset)
    cache_dir: Path | None  # None when no method reads the cache
    train_data: Any  # the TeacherCacheDataset over data.train, top-k only (None without a cache)
    template: torch.nn.Module  # the untrained student every sub-run starts from
    inner_eval: Any  # held-out blocks scored during training, or None
    ddk_dev: dict[str, Any] = field(default_factory=dict)  # DDK's measuring rows per domain (llm_ddk)
    ddk_teacher_loss: dict[str, float] = field(default_factory=dict)
    teachers: llm_teachers.TeacherSet | None = None  # further teachers, ensemble members' caches
    feature_train_data: Any = None  # train_data with the cached hidden states (cache feature terms)

    @property
    def eval_vocab_size(self) -> int | None:
        """Logit entries compared at evaluation: all (exact), or the shared ones (shared_prefix)."""
        if self.config.student.vocab_policy != "shared_prefix":
            return None
        return min(int(self.teacher.get_output_embeddings().weight.shape[0]),
                   int(self.template.get_output_embeddings().weight.shape[0]))


@dataclass
class _Trained:
    """Every (method, seed): its trained student (rank 0 only) and its training record."""

    models: dict[tuple[str, int], torch.nn.Module] = field(default_factory=dict)
    info: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# the recipe


@RECIPES.register("llm_kd", "distil a causal LM (asset, folder or Hub id) into a cut, pretrained or "
                            "config-built student on a corpus or any dataset, from a top-k cache or online")
class LLMKD(Recipe):
    config_model = LLMKDConfig

    def run(self, config: LLMKDConfig, output_dir: Path, *, resume: bool = False) -> dict[str, Any]:
        """Run the recipe into ``output_dir``; return the results dict (also ``results.json``).

        Args:
            config: the validated config.
            output_dir: RUN_DIR.
            resume: keep the (method, seed) sub-runs that finished in an earlier run of the same
                config (their ``subrun.json`` and weights are checked), continue an interrupted
                one from its newest verified checkpoint (``train.save_every``), train the rest.
                False: every sub-run trains from step 0 (the teacher cache is reused either way).

        Under ``accelerate launch`` / ``torchrun`` every process calls this: the teacher cache is
        built data-parallel, training is data-parallel (DDP) through the Distiller, and the main
        process alone evaluates and writes ``config.yaml``, ``results.*``, the plot, the students
        and the sub-run records; the others wait at barriers and return the same results.
        """
        start = time.perf_counter()
        timings: dict[str, float] = {}
        tokenizer, data = check_inputs(config, timings)  # every user mistake surfaces before a file is written
        run = RecipeRun.start("llm_kd", config, output_dir, record_output_dir=True)
        inputs = _prepare_inputs(config, run, timings, tokenizer, data)
        trained = _Trained()
        for seed in config.seeds:
            for method in config.methods:
                _train_or_reuse(inputs, method, seed, resume, trained)
        timings["train_s"] = sum(v["train_time_s"] for v in trained.info.values())
        if not run.main:  # evaluation and every file below are rank 0's
            return run.wait_for_results()
        scores, speeds = _evaluate(inputs, trained, timings)
        timings["total_s"] = time.perf_counter() - start
        results = _results(inputs, trained, scores, speeds, timings)
        if config.save_students:
            _write_cards(inputs, results)
        table = results_markdown(results)
        run.publish(results, table, plots=[lambda: plot_run(run.out, results)] if config.plot else [])
        log.info("results (%s):\n%s", run.out, table)
        return results


def _write_cards(inputs: _Inputs, results: dict[str, Any]) -> None:
    """A model card (``README.md``, :mod:`kdforge.students.card`) in every saved student folder."""
    from kdforge.students.card import write_model_card

    config = inputs.config
    rows = {r["name"]: r for r in results["models"]}
    keys = ("perplexity", "agreement", "kl_to_teacher")
    for method in config.methods:
        for i, seed in enumerate(config.seeds):
            folder = inputs.run.out / slug(method.name) / f"seed-{seed}" / "student"
            if not (folder / "config.json").is_file():
                continue
            mine = rows[f"student / {method.name}"]["per_seed"][i]
            table = {"teacher": {k: rows["teacher"]["metrics"].get(k) for k in keys[:1]},
                     "student before training": {k: results["student_init"].get(k) for k in keys},
                     f"this student ({method.name}, seed {seed})": {k: mine.get(k) for k in keys}}
            terms = ", ".join(f"{t.name} x{t.weight:g}" for t in method.objective)
            source = "the live teacher" if method.uses_online_teacher() else f"the teacher's cached top-{config.cache.k}"
            if llm_features.uses_cached_features(method):
                source += " and hidden states"
            if method.ensemble is not None:  # kdforge.recipes.llm_teachers
                source = f"a {method.ensemble.weighting}-weighted mixture of {', '.join(method.ensemble.members)}"
            write_model_card(folder, teacher=_teacher_id(config.teacher), student=config.student.describe(),
                             data=inputs.data.description, method=f"{terms} ({source})",
                             steps=config.train.max_steps, eval_table=table,
                             base_model=config.student.model if config.student.kind == "pretrained" else None,
                             command=f"kdforge run {inputs.run.out / 'config.yaml'}",
                             notes="Held-out metrics on " + ", ".join(results["data"].get("eval_docs", [])) + ".")


def check_inputs(config: LLMKDConfig, timings: dict[str, float] | None = None) -> tuple[Any, LMData]:
    """The teacher's tokenizer and the tokenised data, after every check that needs no weights.

    Teacher and student names (missing folder, Hub id offline), devices (``device_map`` without a
    GPU), LoRA without ``peft``, vocabularies that do not align, and the data (missing field, a
    chat without an assistant turn, a tokenizer without a chat template) fail here, before
    :meth:`LLMKD.run` writes anything.
    """
    from kdforge.models import check_source, load_tokenizer
    from kdforge.recipes.lm_data import build_lm_data
    from kdforge.students.build import check_student

    timings = {} if timings is None else timings
    with timed(timings, "check_models_s"):
        check_source(config.teacher, what="teacher")
        tokenizer = load_tokenizer(config.teacher, what="teacher")
        check_student(config.student, config.teacher, tokenizer)
    with timed(timings, "data_s"):
        data = build_lm_data(config.data, tokenizer)
    llm_teachers.check_teachers_vocab(config, tokenizer)
    log.info("data: %s", data.summary)
    return tokenizer, data


def _prepare_inputs(config: LLMKDConfig, run: RecipeRun, timings: dict[str, float], tokenizer: Any,
                    data: LMData) -> _Inputs:
    """Teacher, the one teacher pass into the top-k cache, and the student template."""
    from kdforge.data.text import LMBlockDataset
    from kdforge.models import load_causal_lm
    from kdforge.recipes.lm_data import WithLabels
    from kdforge.students.build import build_student
    from kdforge.teachers import TeacherCacheDataset, build_teacher_cache

    with timed(timings, "load_teacher_s"):
        teacher = load_causal_lm(config.teacher, what="teacher").requires_grad_(False).eval()
    ddk_dev, ddk_teacher_loss = {}, {}
    ddk_specs = [m.ddk for m in config.methods if m.ddk is not None]
    if ddk_specs:  # DDK's measuring rows leave the held-out set of every method (kdforge.recipes.llm_ddk)
        data, ddk_dev = carve_dev(data, max(s.dev_examples for s in ddk_specs))
        ddk_teacher_loss = teacher_domain_losses(teacher, ddk_dev, batch_size=config.eval.batch_size)
    template = build_student(config.student, teacher, tokenizer)
    template.eval()
    cache_dir, train_data, feature_train_data = None, None, None
    if any(not m.uses_online_teacher() for m in config.methods):
        with timed(timings, "teacher_cache_s"):
            c = config.cache
            cache_dir = Path(c.dir) if c.dir else run.out / "teacher_cache"
            features = llm_features.cache_feature_kwargs(config, teacher, template, cache_dir, decide=run.decide)
            build_teacher_cache(teacher, data.train, cache_dir, k=c.k, encoding=c.encoding,
                                tail_samples=c.tail_samples, sample_seed=c.sample_seed,
                                batch_size=c.batch_size, tokenizer=tokenizer, teacher_id=_teacher_id(config.teacher),
                                overwrite=c.dir is None,  # only our own RUN_DIR cache is replaced
                                data_parallel=run.group,  # every rank writes its share; rank 0 merges
                                loss_mask=data.train_loss_mask(),  # response-only: only trained positions
                                **features)  # hidden states for teacher: cache feature terms
            feature_train_data = TeacherCacheDataset(cache_dir, sequences=data.train, tokenizer=tokenizer)
            train_data = feature_train_data.with_features(False)  # methods without cached feature terms
            if data.train_extras():  # response-only labels and padding masks over the cached rows
                train_data = WithLabels(train_data, data.train_extras())
                feature_train_data = WithLabels(feature_train_data, data.train_extras())
    teachers = llm_teachers.prepare_teachers(config, run, data, tokenizer, teacher, timings, run_cache=cache_dir)
    n_inner = config.eval.during_training_sequences
    inner_eval = None
    if n_inner:
        inner_eval = LMBlockDataset(data.eval[:n_inner], {k: v[:n_inner] for k, v in _eval_extras(data).items()})
    return _Inputs(config, run, teacher, tokenizer, data, cache_dir, train_data, template, inner_eval,
                   ddk_dev, ddk_teacher_loss, teachers, feature_train_data)


def _eval_extras(data: LMData) -> dict[str, torch.Tensor]:
    return {k: v for k, v in (("labels", data.eval_labels), ("attention_mask", data.eval_mask)) if v is not None}


def _teacher_id(spec: TeacherSpec) -> str:
    return spec.model + (f"@{spec.revision}" if spec.revision else "")


def load_teacher(spec: TeacherSpec) -> tuple[torch.nn.Module, Any]:
    """The frozen teacher (eval mode, on its device and dtype) and its tokenizer (:mod:`kdforge.models`)."""
    from kdforge.models import load_model

    return load_model(spec, role="teacher")


def _train_or_reuse(inputs: _Inputs, method: MethodSpec, seed: int, resume: bool, trained: _Trained) -> None:
    """One (method, seed) sub-run: reuse it if it finished earlier (``resume``), else train it."""
    from kdforge.students.build import is_lora, merged

    config, run = inputs.config, inputs.run
    sub = run.subrun(f"{method.name!r}, seed {seed}", Path(slug(method.name)) / f"seed-{seed}",
                     _subrun_key(config, method, seed))
    finished = sub.reuse(resume)  # rank 0 decides (it verifies the weights' checksum) and tells the others
    if finished is not None:
        if run.main:
            trained.models[(method.name, seed)] = sub.load_weights(finished, copy.deepcopy(inputs.template))
        trained.info[(method.name, seed)] = finished["train_info"]
        return
    sub.prepare(resume)
    distiller = _distiller(inputs, method, seed, sub.dir)
    log.info("training %r, seed %d -> %s", method.name, seed, sub.dir)
    result = train_student(distiller, resume=resume, empty=copy_of(inputs.template))
    state = result.state
    info = {
        "train_time_s": result.seconds,
        "train_tokens_per_s": state.positions_seen / max(result.seconds, 1e-9),
        "last_train_logs": {k: v for k, v in (state.last_logs or {}).items() if isinstance(v, int | float)},
    }
    if run.main:
        trained.models[(method.name, seed)] = result.model
    trained.info[(method.name, seed)] = info
    if is_lora(inputs.template):  # the record keeps the adapter model; the saved student is merged
        if config.save_students and run.main:
            merged(result.model).save_pretrained(sub.dir / "student")
            inputs.tokenizer.save_pretrained(sub.dir / "student")
        sub.finish({"train_info": info}, weights="final.safetensors", model=result.model)
    elif config.save_students:
        distiller.save_student(sub.dir / "student")  # main writes, all wait
        if run.main:
            inputs.tokenizer.save_pretrained(sub.dir / "student")
        sub.finish({"train_info": info}, weights="student/model.safetensors")
    else:
        sub.finish({"train_info": info}, weights="final.safetensors", model=result.model)
    run.barrier()


def _distiller(inputs: _Inputs, method: MethodSpec, seed: int, run_dir: Path) -> Any:
    """The Distiller of one sub-run: the cached teacher, or the live one (``teacher: online``,
    on-policy or feature terms)."""
    from kdforge.data.text import LMBlockDataset
    from kdforge.teachers import collate_teacher_cache
    from kdforge.train import CausalLMTask, Distiller

    train_cfg = inputs.config.train.model_copy(update={"output_dir": str(run_dir), "seed": seed})
    if inputs.inner_eval is None:
        train_cfg = train_cfg.model_copy(update={"eval_every": None})
    objective = Objective(copy.deepcopy(method.objective), chunked=method.chunked)
    on_policy: OnPolicyConfig | None = None
    rows = inputs.data
    student, extra, live = copy.deepcopy(inputs.template), {}, _live_teacher(inputs)
    regime = method_regime(method, student, live)  # MiniLLM, EMA self-KD (kdforge.recipes.llm_regimes)
    if regime is not None:
        prompt = regime.prompt_tokens
        collate = None if prompt is None or rows.response_only else _prompt_collate(prompt)
        teacher = regime.teacher if regime.teacher is not None else live
        data, extra = LMBlockDataset(rows.train, rows.train_extras()), dict(regime.kwargs)
        on_policy = extra.pop("on_policy", None)
        objective = Objective(regime.objective, chunked=method.chunked)
    elif method.teacher == "ensemble":  # a mixture of teachers (kdforge.recipes.llm_teachers)
        assert inputs.teachers is not None
        teacher, data, collate = llm_teachers.ensemble_teacher(method, inputs.teachers, rows)
    elif method.on_policy is not None:  # GKD: student samples need the online teacher
        # prompts: the masked head of each row (chat/prompt-completion), else its first prompt_tokens
        collate = None if rows.response_only else _prompt_collate(method.on_policy.prompt_tokens)
        teacher, data = _live_teacher(inputs), LMBlockDataset(rows.train, rows.train_extras())
        on_policy = method.on_policy.to_config()
    elif method.uses_online_teacher():  # dense logits (and hidden states) of the live teacher
        teacher, data, collate = _live_teacher(inputs), LMBlockDataset(rows.train, rows.train_extras()), None
    elif llm_features.uses_cached_features(method):  # hidden states from the cache (kdforge.recipes.llm_features)
        assert inputs.cache_dir is not None
        teacher, data, collate = llm_features.cached_feature_teacher(inputs.cache_dir), inputs.feature_train_data, \
            collate_teacher_cache
    else:
        teacher, data, collate = None, inputs.train_data, collate_teacher_cache
    if method.ddk is not None:  # domain-weighted sampling (kdforge.recipes.llm_ddk)
        sampler = ddk_sampler(method.ddk, rows, inputs.ddk_dev, inputs.ddk_teacher_loss, seed=seed)
        extra.update(sampler=sampler, callbacks=[*extra.get("callbacks", []), sampler.callback])
    extra["extra_modules"] = {**extra.get("extra_modules", {}),  # dac_kl learned: true
                              **attach_clip_nets(objective, world_size=inputs.run.world_size)}
    distiller = Distiller(student, teacher, task=CausalLMTask(), objective=objective,
                          config=train_cfg, train_data=data, collate_fn=collate, eval_data=inputs.inner_eval,
                          on_policy=on_policy, vocab_policy=inputs.config.student.vocab_policy, **extra,
                          run_config={"method": method.model_dump(mode="json"),
                                      "train": train_cfg.model_dump(mode="json")})
    if method.taid is not None:
        from kdforge.losses.taid import TAIDSchedule
        from kdforge.train.taid import TAIDCallback

        spec = method.taid.model_dump(exclude={"term"})
        TAIDCallback(TAIDSchedule(distiller.state.max_steps, **spec), term=method.taid.term).attach(distiller)
    return distiller


def _live_teacher(inputs: _Inputs) -> Any:
    """The teacher for the trainer: the module (the trainer places it beside the student), or, when
    the config pins it (``device`` other than auto, or ``device_map``), a source that stays put."""
    spec = inputs.config.teacher
    if spec.device_map is None and spec.device == "auto":
        return inputs.teacher
    from kdforge.teachers import OnlineTeacher

    source = OnlineTeacher(inputs.teacher)
    source.pinned = True  # loaded where the config said (kdforge.models): the trainer leaves it there
    return source


def _evaluate(inputs: _Inputs, trained: _Trained,
              timings: dict[str, float]) -> tuple[dict[str, Any], dict[str, float]]:
    """Held-out scores of every model (teacher logits once per batch) and inference tokens/s."""
    from kdforge.eval.lm import evaluate_language_models

    config, teacher = inputs.config, inputs.teacher
    with timed(timings, "eval_s"):
        models: dict[str, torch.nn.Module] = {"teacher": teacher, "student init": inputs.template}
        if inputs.teachers is not None:
            models.update({f"teacher / {n}": m for n, m in inputs.teachers.extra().items()})
        for (name, seed), model in trained.models.items():
            models[f"{name}|{seed}"] = model
        batches = inputs.data.eval_batches(config.eval.batch_size)
        scores = evaluate_language_models(models, batches, teacher="teacher", vocab_size=inputs.eval_vocab_size)
    with timed(timings, "speed_s"):
        speed_blocks, repeats = inputs.data.eval[: config.eval.speed_batch], config.eval.speed_repeats
        speeds = {"teacher": measure_tokens_per_s(teacher, speed_blocks, repeats),
                  "student": measure_tokens_per_s(inputs.template, speed_blocks, repeats)}
    return scores, speeds


_KEPT_METRICS = ("perplexity", "nll", "token_accuracy", "ece", "agreement", "kl_to_teacher", "js_to_teacher")


def _results(inputs: _Inputs, trained: _Trained, scores: dict[str, Any], speeds: dict[str, float],
             timings: dict[str, float]) -> dict[str, Any]:
    """``results.json`` (``docs/run-format.md``): one row for the teacher, one per method."""
    from kdforge.eval.cost import count_parameters

    config, teacher, template = inputs.config, inputs.teacher, inputs.template

    def metrics(key: str) -> dict[str, float]:
        m = scores[key]["metrics"]
        return {k: float(m[k]) for k in _KEPT_METRICS if k in m}

    teacher_params, student_params = count_parameters(teacher), count_parameters(template)
    rows: list[dict[str, Any]] = [{
        "name": "teacher", "role": "teacher", "params": teacher_params,
        "size_mb": round(teacher_params * teacher.dtype.itemsize / 2**20, 1),
        "metrics": {**metrics("teacher"), "tokens_per_s": speeds["teacher"]},
        "reliability": scores["teacher"]["reliability"],
        **({"breakdowns": scores["teacher"]["breakdowns"]} if "breakdowns" in scores["teacher"] else {}),
    }]
    if inputs.teachers is not None:
        rows += llm_teachers.teacher_rows(inputs.teachers, metrics)
    trainable = count_parameters(template, trainable_only=True)
    for method in config.methods:
        rows.append(_method_row(config, method, trained, scores, metrics, student_params, trainable,
                                speeds["student"]))
    return {
        "recipe": "llm_kd",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "primary_metric": "perplexity",
        "higher_is_better": False,
        "models": rows,
        "student_init": {**metrics("student init"), "params": student_params, "trainable_params": trainable,
                         **({"source_layers": list(template.config.kdforge_source_layers)}
                            if hasattr(template.config, "kdforge_source_layers") else {})},
        "data": inputs.data.summary,
        "teacher_cache": {"dir": str(inputs.cache_dir) if inputs.cache_dir else None, "k": config.cache.k, "encoding": config.cache.encoding,
                          **llm_features.stored_features(inputs.cache_dir)},
        "seeds": list(config.seeds),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }


def _method_row(config: LLMKDConfig, method: MethodSpec, trained: _Trained, scores: dict[str, Any],
                metrics: Callable[[str], dict[str, float]], params: int, trainable: int,
                tokens_per_s: float) -> dict[str, Any]:
    """The results row of one method: its metrics as mean (and std) over seeds, and each seed's."""
    per_seed = []
    for seed in config.seeds:
        info = trained.info[(method.name, seed)]
        logs = info["last_train_logs"]
        per_seed.append({"seed": seed, **metrics(f"{method.name}|{seed}"),
                         "train_time_s": round(info["train_time_s"], 2),
                         "train_tokens_per_s": round(info["train_tokens_per_s"], 1),
                         "train_loss_last": logs.get("loss"),
                         **({"taid_t_final": logs["taid/t"]} if "taid/t" in logs else {})})
    summary: dict[str, Any] = {}
    for key in per_seed[0]:
        if key in ("seed",) or not isinstance(per_seed[0][key], int | float):
            continue
        mean, std = _mean_std([p[key] for p in per_seed])
        summary[key] = mean
        if std is not None:
            summary[f"{key}_std"] = std
    summary["tokens_per_s"] = tokens_per_s
    return {
        "name": f"student / {method.name}", "role": method.role, "params": params,
        "trainable_params": trainable,
        "size_mb": round(params * 4 / 2**20, 1),
        "metrics": summary, "per_seed": per_seed,
        "objective": [t.model_dump(mode="json") for t in method.objective],
        "regime": {**method.model_dump(mode="json", include={"on_policy", "taid", "chunked"}),
                   **method.model_dump(mode="json", include={"minillm", "ema", "ensemble"}, exclude_none=True)},
        "reliability": scores[f"{method.name}|{config.seeds[0]}"]["reliability"],
        "run_dir": [f"{slug(method.name)}/seed-{seed}" for seed in config.seeds],
        **_mean_breakdowns([scores[f"{method.name}|{seed}"] for seed in config.seeds]),
    }


def _mean_breakdowns(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"breakdowns": {name: {domain: mean over seeds}}}`` (empty without per-domain scores)."""
    if not all("breakdowns" in s for s in per_seed):
        return {}
    first = per_seed[0]["breakdowns"]
    return {"breakdowns": {name: {d: statistics.fmean(s["breakdowns"][name][d] for s in per_seed) for d in table}
                           for name, table in first.items()}}


def results_markdown(results: dict[str, Any]) -> str:
    """The summary table of an ``llm_kd`` run as Markdown."""
    seeds = results.get("seeds", [0])
    lines = [
        f"# llm_kd results ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {seeds})",
        "",
        f"Held-out: {results['data']['eval_tokens']} tokens of {', '.join(results['data']['eval_docs'])}; "
        f"train: {results['data']['train_blocks']} x {results['data']['seq_len']} tokens of "
        f"{', '.join(results['data']['train_docs'])}.",
        "",
        "| model | params (trainable) | held-out ppl | top-1 agreement | KL(teacher‖model) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(m: dict[str, Any], key: str, spec: str) -> str:
        if key not in m or m[key] is None or not math.isfinite(m[key]):
            return "–"
        text = format(m[key], spec)
        std = m.get(f"{key}_std")
        return f"{text} ± {format(std, spec)}" if std is not None else text

    for row in results["models"]:
        m = row["metrics"]
        params = f"{row['params'] / 1e6:.1f}M"
        if row.get("trainable_params"):
            params += f" ({row['trainable_params'] / 1e6:.1f}M)"
        lines.append(f"| {row['name']} | {params} | {fmt(m, 'perplexity', '.1f')} | "
                     f"{fmt(m, 'agreement', '.3f')} | {fmt(m, 'kl_to_teacher', '.2f')} | "
                     f"{fmt(m, 'tokens_per_s', '.0f')} |")
    init = results.get("student_init", {})
    if init:
        lines.append(f"| student before training | {init['params'] / 1e6:.1f}M | {fmt(init, 'perplexity', '.3g')} | "
                     f"{fmt(init, 'agreement', '.3f')} | {fmt(init, 'kl_to_teacher', '.2f')} | – |")
    lines += _domain_table(results)
    t = results.get("timings", {})
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    return "\n".join(lines)


def _domain_table(results: dict[str, Any]) -> list[str]:
    """Held-out perplexity per domain (mean over seeds), when the data has domains."""
    rows = [r for r in results["models"] if "perplexity by domain" in r.get("breakdowns", {})]
    if not rows:
        return []
    domains = sorted({d for r in rows for d in r["breakdowns"]["perplexity by domain"]})
    lines = ["", "Held-out perplexity by domain:", "", "| model | " + " | ".join(domains) + " |",
             "|---|" + "---|" * len(domains)]
    for r in rows:
        table = r["breakdowns"]["perplexity by domain"]
        lines.append(f"| {r['name']} | " + " | ".join(f"{table[d]:.1f}" if d in table else "–" for d in domains) + " |")
    return lines


def plot_run(out: Path, results: dict[str, Any]) -> Path:
    """``quickstart.png``: training CE and held-out perplexity over steps for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    for row in results["models"]:
        if row["role"] == "teacher":
            continue
        for i, rel in enumerate(row.get("run_dir", [])):
            path = out / rel / "metrics.jsonl"
            if not path.is_file():
                continue
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            train = [r for r in recs if r.get("split") == "train" and "loss/cross_entropy" in r]
            evals = [r for r in recs if r.get("split") == "eval" and "eval/perplexity" in r]
            label = row["name"] if i == 0 else None
            color = "tab:blue" if row["role"] == "baseline" else "tab:orange"
            ax_train.plot([r["step"] for r in train], [r["loss/cross_entropy"] for r in train],
                          color=color, alpha=0.8, label=label)
            ax_eval.plot([r["step"] for r in evals], [r["eval/perplexity"] for r in evals],
                         color=color, alpha=0.8, marker="o", label=label)
    teacher = next((r for r in results["models"] if r["role"] == "teacher"), None)
    if teacher is not None and "perplexity" in teacher["metrics"]:
        ax_eval.axhline(teacher["metrics"]["perplexity"], color="gray", linestyle="--", label="teacher")
    ax_train.set(title="training cross-entropy (labels)", xlabel="step", ylabel="CE (nats/token)")
    ax_eval.set(title="held-out perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "quickstart.png"
    tmp = out / ".quickstart.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
