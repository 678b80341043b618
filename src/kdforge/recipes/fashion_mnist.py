"""Recipe ``fashion_mnist_kd``: classic knowledge distillation (Hinton et al. 2015) on real Fashion-MNIST.

``kdforge run configs/fashion_mnist.yaml`` does, in one output folder:

1. **Teacher, once.** Trains the teacher CNN on the full labelled training set with a
   cross-entropy objective through :class:`kdforge.train.Distiller`, then computes its logits
   over all training and test images *once*. Weights and logits are cached in
   ``<out>/teacher/`` with a fingerprint of everything that produced them; a re-run (or a run
   with other students/methods) reuses them.
2. **Students, several ways, several seeds.** The same small student is trained by every
   method of the config (each method is an explicit list of weighted loss terms from
   :data:`kdforge.losses.LOSSES`: labels only, Hinton KD, DKD, ...) for every seed, on a
   class-balanced subset of ``data.labelled`` labelled images. Methods with ``transfer_set:
   true`` also see ``data.transfer`` *unlabelled* training images (label ``-100``) that only
   the teacher's soft targets supervise — Hinton's transfer set. The teacher logits come from the
   cache (batch key ``teacher_logits``), so a KD step costs what a CE step costs. A finished
   student (``<out>/students/<method>/seed-<k>/result.json``) is reused on re-runs.
3. **Evaluation and report.** Test accuracy (mean ± std over seeds), top-1 agreement with the
   teacher, KL to the teacher, ECE (15 bins) with reliability bins, per-class accuracy,
   parameters, bytes on disk and CPU latency per image; a rich table on the console,
   ``results.json`` + ``results.md`` (``docs/run-format.md``), ``accuracy.png`` (accuracy per
   method with error bars and seeds) and ``cost_quality.png`` (accuracy vs parameters).

Why the default setting is *few labels, long training*: with the full 60k labels and a few
epochs the student is under-trained and soft targets only slow it; KD then does not beat
labels-only. With 2,000 labels and 40 epochs, the teacher's dark knowledge regularises the
student, and KD wins by 1.3–1.7 points over seeds (measured; see ``docs/fashion-mnist.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from kdforge.config import StrictModel
from kdforge.errors import CacheError, ConfigError
from kdforge.io import write_bytes_atomic
from kdforge.recipes import RECIPES, Recipe
from kdforge.recipes.born_again_guidance import (
    generation_label_weight,
    guidance_split,
    guidance_terms,
)
from kdforge.recipes.data_methods import DataMethod, check_data_method
from kdforge.recipes.learned_terms import attach_bilevel, attach_learned_terms, unwrap_student
from kdforge.recipes.subrun import (
    RecipeRun,
    SubRun,
    config_key,
    fingerprint,
    read_json,
    slug,
    timed,
    train_student,
)
from kdforge.train.objective import LossTerm

log = logging.getLogger(__name__)

RECIPE_NAME = "fashion_mnist_kd"


# ---------------------------------------------------------------------------------------------
# config


class DataConfig(StrictModel):
    """Which images the students see."""

    root: str | None = Field(None, description="folder with the 4 IDX files; null = kdforge asset fashion-mnist")
    labelled: int = Field(2000, ge=10, description="labelled training images for students (class-balanced)")
    transfer: int = Field(10000, ge=0, description="extra unlabelled images for transfer-set methods")
    subset_seed: int = Field(0, description="seed of the labelled/transfer subset draw (fixed across student seeds)")
    test_limit: int | None = Field(None, ge=1, description="evaluate on the first N test images (null = all)")


class TeacherConfig(StrictModel):
    """The teacher and how it is trained (on the full labelled training set)."""

    arch: str = "teacher_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments of the model builder")
    train_size: int | None = Field(None, ge=10, description="training images (null = all)")
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


class StudentConfig(StrictModel):
    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(StrictModel):
    """Student training (shared by every method unless a method overrides ``epochs``)."""

    epochs: float = Field(40, gt=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warm-up")


class TermSpec(LossTerm):
    """One weighted loss term of a method (:class:`kdforge.train.LossTerm`, the same YAML keys:
    ``name``, ``weight``, ``params``, ``label``).

    The only additions: an unknown loss name is reported at its key (``methods.0.terms.0.name``),
    not at the term, so the config error points at the line to fix; and the JSON schema says that a
    weight may be a schedule mapping (``weight: {schedule: warmup, ...}``, docs/schedules.md).
    """

    @model_validator(mode="wrap")
    @classmethod
    def _name_error_at_name(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            errors = [{**e, "loc": ("name", *e["loc"]), "input": data.get("name")}
                      if not e["loc"] and str(e["msg"]).startswith("Value error, unknown loss")
                      and isinstance(data, Mapping) else e
                      for e in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, errors) from None


class PeerConfig(StrictModel):
    """A peer that trains together with the student (online / mutual KD)."""

    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)


_SOURCE_FIELDS = {
    "cached": set(),
    "online": set(),
    "pskd": {"k"},
    "ensemble": {"members", "weighting", "weights", "temperature"},
    "mutual": {"peers", "peer_terms"},
    "born_again": {"generations", "first", "label_weight"},
    "ema": {"decay"},
}


class MethodTeacherConfig(StrictModel):
    """Where a method's teacher signal comes from (docs/regimes.md). Omitted: the cached teacher's logits."""

    source: Literal["cached", "online", "pskd", "ensemble", "mutual", "born_again", "ema"] = Field(
        "cached", description="cached: the teacher's cached logits; online: the teacher model run on every batch "
        "(needed by feature terms, e.g. dual-head KD's logit head); pskd: the student's own previous-epoch "
        "predictions (PS-KD); ensemble: a mixture of cached teachers; mutual: peers trained together with the "
        "student; born_again: a chain of generations, each taught by the previous one; ema: an exponential "
        "moving average of the student (self-distillation, SelfTeacher)")
    k: int | None = Field(None, ge=1, description="pskd: keep the top-k classes per example (null = all)")
    members: list[str] = Field(default_factory=list, description="ensemble: 'teacher' and/or names of extra_teachers")
    weighting: Literal["fixed", "confidence", "entropy"] = Field("fixed", description="ensemble: weighting rule")
    weights: list[float] | None = Field(None, description="ensemble: fixed weights (default uniform)")
    temperature: float = Field(1.0, gt=0, description="ensemble: temperature of the entropy weighting")
    peers: list[PeerConfig] = Field(default_factory=list, description="mutual: the peers (default one small_cnn)")
    peer_terms: list[TermSpec] | None = Field(
        None, description="mutual: each peer's objective against the student (and the other peers); "
        "default cross_entropy 1.0 + forward_kl(T=1) 1.0 (deep mutual learning)")
    decay: float = Field(0.999, ge=0.0, le=1.0, description="ema: decay of the average, updated every step")
    generations: int = Field(2, ge=1, description="born_again: generations after the first (the last is reported)")
    first: Literal["labels", "random"] = Field(
        "labels", description="born_again: generation 0 is a labels-only student, or an untrained random one")
    label_weight: Literal["auto"] | Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="born_again: each generation trains on alpha * labels + (1 - alpha) * the previous "
        "generation (Borup & Andersen 2021): the cross_entropy term gets weight alpha, the forward_kl (T=1) term "
        "1 - alpha, replacing their configured weights; auto: alpha estimated before each generation "
        "(teachers/guidance.py); null: the method's terms as written")

    @model_validator(mode="after")
    def _fields_of_the_source(self) -> MethodTeacherConfig:
        allowed = _SOURCE_FIELDS[self.source] | {"source"}
        stray = sorted(k for k in self.model_fields_set if k not in allowed)
        if stray:
            raise ValueError(f"{', '.join(stray)} do(es) not apply to source {self.source!r} "
                             f"(it takes: {', '.join(sorted(allowed))})")
        if self.source == "ensemble" and not self.members:
            raise ValueError("an ensemble needs members: e.g. [teacher, mlp_teacher]")
        if self.weights is not None and (self.weighting != "fixed" or len(self.weights) != len(self.members)):
            raise ValueError("weights are the fixed weighting's, one per member")
        return self


class MethodConfig(StrictModel):
    """One way of training the student: a named, explicit list of weighted loss terms."""

    name: str
    role: Literal["baseline", "student"] = "student"
    terms: list[TermSpec] = Field(..., min_length=1)
    transfer_set: bool = Field(False, description="also train on data.transfer unlabelled images (teacher targets only)")
    epochs: float | None = Field(None, gt=0, description="override train.epochs for this method")
    teacher: MethodTeacherConfig | None = Field(
        None, description="where the teacher signal comes from (null = the cached teacher's logits; docs/regimes.md)")
    student: StudentConfig | None = Field(
        None, description="this method's own student architecture (null = the top-level student); one run can "
        "compare architectures, as the diswot recipe does")

    def student_config(self, default: StudentConfig) -> StudentConfig:
        """The student this method trains: its own, else ``default`` (the config's ``student``)."""
        return self.student if self.student is not None else default

    data: DataMethod | None = Field(
        None, description="data-level method: HARD augmentation, active or KD3 selection (docs/data-selection.md)")

    @model_validator(mode="after")
    def _data_fits(self) -> MethodConfig:
        check_data_method(self.data, self.teacher.source if self.teacher else None, self.transfer_set)
        if any(t.per_teacher for t in self.terms) and (self.teacher is None or self.teacher.source != "ensemble"):
            raise ValueError("per_teacher: one term per ensemble member needs teacher: {source: ensemble, members: "
                             "[...]}; add it or drop per_teacher")
        if self.teacher is not None and self.teacher.label_weight is not None:
            guidance_terms(self.terms, 0.5)  # the terms must map onto alpha * labels + (1 - alpha) * teacher
        return self


class ExtraTeacherConfig(TeacherConfig):
    """A further teacher, trained and cached like ``teacher`` (for ensemble methods)."""

    name: str = Field(..., description="how ensemble members refer to it")


class EvalConfig(StrictModel):
    ece_bins: int = Field(15, ge=1)
    latency_batch_size: int = Field(1, ge=1, description="images per timed call (1 = per-image latency)")
    latency_warmup: int = Field(20, ge=0)
    latency_repeats: int = Field(200, ge=1)


def _default_methods() -> list[MethodConfig]:
    return [
        MethodConfig(name="labels only", role="baseline", terms=[TermSpec(name="cross_entropy", weight=1.0)]),
        MethodConfig(
            name="KD T=2 a=0.5",
            terms=[
                TermSpec(name="forward_kl", weight=0.5, params={"temperature": 2.0}),
                TermSpec(name="cross_entropy", weight=0.5),
            ],
        ),
    ]


class FashionMnistConfig(StrictModel):
    """Config of the ``fashion_mnist_kd`` recipe (see ``configs/fashion_mnist.yaml``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)
    extra_teachers: list[ExtraTeacherConfig] = Field(
        default_factory=list, description="further cached teachers for ensemble methods (teacher.* keys plus name)")
    methods: list[MethodConfig] = Field(default_factory=_default_methods, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = "outputs/fashion_mnist"

    @model_validator(mode="after")
    def _unique(self) -> FashionMnistConfig:
        names = [m.name for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"method names must be unique, repeated: {', '.join(dupes)}")
        slugs = [slug(n) for n in names]
        if len(set(slugs)) != len(slugs):
            raise ValueError("method names must differ in more than punctuation (they name folders)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        teachers = ["teacher", *(t.name for t in self.extra_teachers)]
        if len(set(teachers)) != len(teachers):
            raise ValueError("extra_teachers names must be distinct and not 'teacher'")
        for m in self.methods:
            unknown = [n for n in (m.teacher.members if m.teacher else []) if n not in teachers]
            if unknown:
                raise ValueError(f"method {m.name!r}: unknown ensemble member(s) {', '.join(unknown)} "
                                 f"(teachers: {', '.join(teachers)})")
        return self




# ---------------------------------------------------------------------------------------------
# helpers


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _terms_json(terms: Sequence[LossTerm]) -> list[dict[str, Any]]:
    """The terms as the recipe has always written them (``source`` only when not the default)."""
    out = []
    for t in terms:
        d = t.model_dump(mode="json")
        if d.get("source") == "loss":
            del d["source"]
        out.append(d)
    return out


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _safetensors(model: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def _fit(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    terms: Sequence[LossTerm],
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup_ratio: float,
    seed: int,
    run_dir: Path,
    save_every: int | None = None,
    world_size: int = 1,
    factory: Any = None,
    source_fn: Any = None,
    transforms: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` (dict items) with the weighted ``terms`` via the Distiller.

    The teacher signal is the precomputed ``teacher_logits`` key of the batch (no online teacher).
    With ``save_every``, checkpoints go to ``run_dir/checkpoints`` and an interrupted run resumes
    from the newest one. Under a launch of ``world_size`` processes (all of them call this),
    ``batch_size`` is per process and an epoch is ``len(dataset) / (batch_size * world_size)``
    steps, so 2 processes x 16 train like 1 process x 32. Returns the final step, the last
    train logs and ``model``: the trained model as a plain module (under FSDP, whose parameters
    are shards, the full weights gathered into ``factory()`` on rank 0; None on other ranks:
    :func:`kdforge.recipes.subrun.gather_student`).
    """
    from kdforge.train import (
        ClassificationTask,
        Distiller,
        Objective,
        TrainConfig,
        TrilateralBilevelDistiller,
    )

    steps_per_epoch = math.ceil(len(dataset) / (batch_size * world_size))
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    config = TrainConfig(
        max_steps=total_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        scheduler=scheduler,
        warmup_steps=int(warmup_ratio * total_steps),
        max_grad_norm=None,
        seed=seed,
        log_every=max(1, total_steps // 10),
        output_dir=str(run_dir),
        save_every=save_every,
        keep_last=1,
        progress=False,
    )
    objective = Objective([LossTerm(**t.model_dump()) for t in terms])
    source = source_fn(model, total_steps) if source_fn is not None else None  # a regime's teacher (docs/regimes.md)
    model, extras = attach_learned_terms(model, objective, world_size)  # dual-head / trilateral parts
    dataset, learners = attach_bilevel(objective, dataset, seed=seed, world_size=world_size)  # bilevel trilateral
    make = partial(TrilateralBilevelDistiller, learners=learners) if learners else Distiller
    distiller = make(model, source, task=ClassificationTask(), objective=objective, config=config,
                     train_data=dataset, transforms=transforms, extra_modules=extras)
    trained = train_student(distiller, resume=save_every is not None, empty=factory)
    return {"steps": trained.state.step, "last_logs": dict(trained.state.last_logs),
            "model": unwrap_student(trained.model)}


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass
class _Data:
    """The normalised images of one run and the teacher's logits over them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    t_train_logits: torch.Tensor | None = None
    t_test_logits: torch.Tensor | None = None
    #: the trained teacher model (for ``source: online`` methods)
    teacher_model: torch.nn.Module | None = None
    #: extra teachers by name: (train logits, test logits, their teacher.json record)
    extra: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = field(default_factory=dict)


@RECIPES.register(RECIPE_NAME, "classic KD on Fashion-MNIST: cached CNN teacher, small student, CE vs KD vs DKD over seeds")
class FashionMnistKD(Recipe):
    """See the module docstring."""

    config_model = FashionMnistConfig

    def run(self, config: FashionMnistConfig, output_dir: Path) -> dict[str, Any]:
        """Run the recipe into ``output_dir`` (finished teacher and students are reused).

        Under ``accelerate launch`` / ``torchrun`` every process calls this: teacher and
        students train data-parallel through the Distiller (``train.batch_size`` and
        ``teacher.batch_size`` are per process); the main process alone computes logits and
        metrics and writes every file; the others wait at barriers and return the same results.
        """
        started = time.perf_counter()
        run = RecipeRun.start(RECIPE_NAME, config, output_dir)
        timings: dict[str, float] = {}
        with timed(timings, "data_s"):
            data = _load_data(config)
        teacher, teacher_info = self._teacher(run, config, data, timings)
        data.teacher_model = teacher  # methods with teacher: {source: online} run it live
        for tc in config.extra_teachers:  # ensemble members: trained and cached like the teacher
            sub_data = replace(data, t_train_logits=None, t_test_logits=None)
            t_timings: dict[str, float] = {}
            _, info = self._teacher(run, config, sub_data, t_timings, tc, f"teacher-{slug(tc.name)}")
            data.extra[tc.name] = (sub_data.t_train_logits, sub_data.t_test_logits, info)
            timings.update({f"{k}[{tc.name}]": v for k, v in t_timings.items()})
        with timed(timings, "students_s"):
            student_rows = self._students(run, config, data, teacher_info)
        if not run.main:  # costs, results and files are rank 0's: wait, return what it wrote
            return run.wait_for_results()
        with timed(timings, "latency_s"):
            teacher_cost, student_costs = _costs(config, teacher, data.x_test)
        results = self._results(config, teacher_info, teacher_cost, student_rows, student_costs, timings)
        timings["total_s"] = time.perf_counter() - started
        results["timings"] = timings
        run.publish(results, results_markdown(results), plots=[lambda: plot_results(results, run.out)],
                    extra={"metrics.jsonl": _metrics_jsonl(results)})
        print_results(results)
        log.info("fashion_mnist_kd finished in %.1f s; results in %s", timings["total_s"], run.out)
        return results

    # -- teacher ------------------------------------------------------------------------------
    def _teacher(self, run: RecipeRun, config: FashionMnistConfig, data: _Data,
                 timings: dict[str, float], tc: TeacherConfig | None = None,
                 folder_name: str = "teacher") -> tuple[torch.nn.Module, dict[str, Any]]:
        """The teacher and its ``teacher.json`` record: reused when cached under the same
        fingerprint, else trained (resuming its own checkpoints) and its logits computed once.
        ``tc``/``folder_name``: an extra teacher (``extra_teachers``) instead of ``config.teacher``."""
        from kdforge.data.vision import stratified_indices
        from kdforge.students.vision import build_vision_model

        tc = tc if tc is not None else config.teacher
        train_idx = (torch.arange(len(data.y_train)) if tc.train_size is None
                     else stratified_indices(data.y_train, tc.train_size, seed=tc.seed))
        folder = run.out / folder_name
        key = config_key(tc, exclude={"name"})
        sub = SubRun(run, "the teacher" if folder_name == "teacher" else f"teacher {folder_name}", folder / "run",
                     fingerprint({
            "teacher": key,
            "train_labels": _tensor_digest(data.y_train),
            "train_pixels": _tensor_digest(data.x_train[:: max(1, len(data.x_train) // 64)]),
            "test_labels": _tensor_digest(data.y_test),
            "ece_bins": config.eval.ece_bins,
        }, length=16), folder / "teacher.json")
        teacher = build_vision_model(tc.arch, **tc.kwargs)
        info = sub.reuse()  # rank 0 decides whether the cached teacher is usable; every rank follows
        if info is not None and _load_cached_teacher(teacher, folder, data):
            log.info("reusing cached teacher from %s (test accuracy %.4f)", folder, info["metrics"]["accuracy"])
            timings["teacher_train_s"] = timings["teacher_logits_s"] = 0.0
            return teacher.eval(), {**info, "cached": True}
        log.info("training teacher %s on %d images for %g epochs", tc.arch, len(train_idx), tc.epochs)
        torch.manual_seed(tc.seed)
        teacher = build_vision_model(tc.arch, **tc.kwargs)
        sub.prepare(resume=True)  # an interrupted teacher of this very config resumes from its checkpoints
        with timed(timings, "teacher_train_s"):
            from kdforge.data.vision import ImageClassificationDataset

            step_images = tc.batch_size * run.world_size
            teacher = _fit(teacher, ImageClassificationDataset(data.x_train[train_idx], data.y_train[train_idx]),
                           [LossTerm("cross_entropy", 1.0)], epochs=tc.epochs, batch_size=tc.batch_size,
                           lr=tc.lr, weight_decay=tc.weight_decay, scheduler="cosine", warmup_ratio=0.05,
                           seed=tc.seed, run_dir=sub.dir,
                           save_every=max(1, math.ceil(len(train_idx) / step_images) // 2),
                           world_size=run.world_size, factory=lambda: build_vision_model(tc.arch, **tc.kwargs))["model"]
        if run.main:
            info = self._score_teacher(sub, teacher, data, config, len(train_idx), timings, tc)
        run.barrier()
        if not run.main:  # rank 0 computed the logits once and wrote them; read them back
            _load_cached_teacher(None, folder, data)
            info = read_json(sub.record)
        return teacher, info

    @staticmethod
    def _score_teacher(sub: SubRun, teacher: torch.nn.Module, data: _Data, config: FashionMnistConfig,
                       n_train: int, timings: dict[str, float], tc: TeacherConfig) -> dict[str, Any]:
        """Rank 0: the teacher's logits over every image, its weights and logits files, and its
        record ``teacher.json``, written last (the commit marker of a complete cache)."""
        from safetensors.torch import save

        from kdforge.eval.classification import classification_metrics, predict_logits

        folder = sub.record.parent
        with timed(timings, "teacher_logits_s"):
            teacher.eval()
            data.t_train_logits = predict_logits(teacher, data.x_train)
            data.t_test_logits = predict_logits(teacher, data.x_test)
        write_bytes_atomic(folder / "model.safetensors", _safetensors(teacher))
        write_bytes_atomic(folder / "logits.safetensors", save({"train": data.t_train_logits.contiguous(),
                                                                "test": data.t_test_logits.contiguous()}))
        return sub.finish({
            "arch": tc.arch,
            "train_images": n_train,
            "test_images": len(data.y_test),
            "train_seconds": timings["teacher_train_s"],
            "logits_seconds": timings["teacher_logits_s"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cached": False,
            "metrics": classification_metrics(data.t_test_logits, data.y_test, n_bins=config.eval.ece_bins),
        }, weights="model.safetensors")

    # -- students -----------------------------------------------------------------------------
    def _students(self, run: RecipeRun, config: FashionMnistConfig, data: _Data,
                  teacher_info: Mapping[str, Any]) -> list[tuple[MethodConfig, list[dict[str, Any]]]]:
        """Every (method, seed) record, trained or reused; seed-major order, so an interrupted run
        has finished every method for its first seeds."""
        labelled_idx, transfer_idx = self._subsets(config, data.y_train)
        log.info("students: %d labelled images, %d transfer images, %d test images",
                 len(labelled_idx), len(transfer_idx), len(data.y_test))
        datasets = {transfer: _student_dataset(data, labelled_idx, transfer_idx if transfer else None)
                    for transfer in sorted({m.transfer_set for m in config.methods})}
        data_key = {
            "labelled": _tensor_digest(labelled_idx),
            "transfer": _tensor_digest(transfer_idx),
            "test": _tensor_digest(data.y_test),
            "teacher": teacher_info["fingerprint"],
        }
        finished: dict[tuple[str, int], dict[str, Any]] = {}
        for seed in config.seeds:
            for method in config.methods:
                regime = _Regime(method, data, labelled_idx, transfer_idx if method.transfer_set else None)
                dataset = datasets[method.transfer_set] if method.teacher is None else regime.dataset()
                key = {**data_key, **regime.key()}
                finished[method.name, seed] = self._student(run, config, method, seed, dataset, data, key, regime)
        return [(m, [finished[m.name, s] for s in config.seeds]) for m in config.methods]

    # -- subsets ------------------------------------------------------------------------------
    @staticmethod
    def _subsets(config: FashionMnistConfig, y_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from kdforge.data.vision import stratified_indices

        labelled = stratified_indices(y_train, config.data.labelled, seed=config.data.subset_seed)
        needs_transfer = any(m.transfer_set for m in config.methods)
        n_transfer = min(config.data.transfer, len(y_train) - len(labelled)) if needs_transfer else 0
        if needs_transfer and n_transfer == 0:
            raise ConfigError(
                "a method uses transfer_set but no unlabelled images are available",
                "set data.transfer > 0 and data.labelled below the training-set size",
            )
        transfer = (stratified_indices(y_train, n_transfer, seed=config.data.subset_seed + 1, exclude=labelled)
                    if n_transfer else torch.empty(0, dtype=torch.long))
        return labelled, transfer

    # -- one student --------------------------------------------------------------------------
    def _student(self, run: RecipeRun, config: FashionMnistConfig, method: MethodConfig, seed: int,
                 dataset: Any, data: _Data, data_key: Mapping[str, str], regime: _Regime) -> dict[str, Any]:
        """One student's ``result.json`` record: reused under the same fingerprint, else trained
        (all ranks), scored on the test set and recorded (rank 0)."""
        from kdforge.eval.classification import classification_metrics, predict_logits
        from kdforge.students.vision import build_vision_model

        tr = config.train
        epochs = method.epochs if method.epochs is not None else tr.epochs
        folder = Path("students") / slug(method.name) / f"seed-{seed}"
        sub = run.subrun(f"{method.name!r}, seed {seed}", folder, {
            "student": config_key(method.student_config(config.student)),
            "train": config_key(tr),
            "method": config_key(method),
            "seed": seed,
            "data": dict(data_key),
            "n_train": len(dataset),
            "ece_bins": config.eval.ece_bins,
        }, length=16, record="result.json")
        cached = sub.reuse()
        if cached is not None:
            return cached
        log.info("training student %r seed %d (%d images, %g epochs)", method.name, seed, len(dataset), epochs)
        sub.prepare(resume=False)
        torch.manual_seed(seed)
        arch = method.student_config(config.student)
        model = build_vision_model(arch.arch, **arch.kwargs)
        t0 = time.perf_counter()
        meter = CostMeter().start()
        fit = dict(epochs=epochs, batch_size=tr.batch_size, lr=tr.lr, weight_decay=tr.weight_decay,
                   scheduler=tr.scheduler, warmup_ratio=tr.warmup_ratio, seed=seed, world_size=run.world_size,
                   factory=lambda: build_vision_model(arch.arch, **arch.kwargs))
        if method.teacher is not None:
            regime.check_launch(run.world_size)
        extra: dict[str, Any] = {}
        if method.teacher is not None and method.teacher.source == "born_again":
            model, steps = regime.born_again(model, config, sub.dir, fit)
        elif method.data is not None and method.data.kind in ("active", "kd3"):
            model, steps, extra = regime.selected(config, seed, sub.dir, fit)
        elif method.data is not None:  # HARD: a batch transform; the online teacher labels the new images
            from kdforge.recipes.data_methods import hard_grid, hard_transforms

            steps_total = math.ceil(math.ceil(len(dataset) / (tr.batch_size * run.world_size)) * epochs)
            transforms = hard_transforms(method.data, data.teacher_model, data.x_train, seed, steps_total)
            trained = _fit(model, dataset, method.terms, run_dir=sub.dir, source_fn=regime.source_fn(config, seed),
                           transforms=transforms, **fit)
            model, steps = trained["model"], trained["steps"]
            hard_grid(transforms, data.teacher_model, model, data.x_test, sub.dir / "hard_grid.png")
        else:
            trained = _fit(model, dataset, method.terms, run_dir=sub.dir, source_fn=regime.source_fn(config, seed),
                           **fit)
            model, steps = trained["model"], trained["steps"]
        seconds = time.perf_counter() - t0
        cost = meter.stop()
        if not run.main:  # rank 0 scores the student and writes its files
            run.barrier()
            return json.loads(sub.record.read_text(encoding="utf-8"))
        logits = predict_logits(model, data.x_test)
        metrics = classification_metrics(logits, data.y_test, teacher_logits=data.t_test_logits,
                                         n_bins=config.eval.ece_bins)
        write_bytes_atomic(sub.dir / "model.safetensors", _safetensors(model))
        fields = {"method": method.name, "seed": seed, "train_seconds": seconds,
                  "train_images": len(dataset), "epochs": epochs, "metrics": metrics}
        if regime.guidance:  # born-again label_weight: each generation's alpha
            fields["guidance"] = regime.guidance
        if method.data is not None:
            from kdforge.recipes.data_methods import ood_accuracy

            fields["data_method"] = {**extra, "ood_accuracy": ood_accuracy(model, data.x_test, data.y_test)}
            if "pool_indices" in extra:  # a selection method trained on labelled + selected, not the whole pool
                fields["train_images"] = int((regime.labels != -100).sum()) + len(extra["pool_indices"])
        # cost: process CPU seconds per optimizer step (teacher-side work of a regime included) and
        # the peak resident memory while this student trained
        fields["cost"] = {"steps": steps, "cpu_seconds": cost["cpu_seconds"],
                          "cpu_s_per_step": cost["cpu_seconds"] / max(steps, 1), "peak_rss_mb": cost["peak_rss_mb"]}
        result = sub.finish(fields, weights="model.safetensors")
        run.barrier()
        return result

    # -- results ------------------------------------------------------------------------------
    def _results(self, config: FashionMnistConfig, teacher_info: Mapping[str, Any], teacher_cost: Mapping[str, Any],
                 student_rows: list[tuple[MethodConfig, list[dict[str, Any]]]],
                 student_costs: Mapping[str, Mapping[str, Any]],
                 timings: dict[str, float]) -> dict[str, Any]:
        """``results.json`` (``docs/run-format.md``): the teacher row, one row per method."""
        models = [{
            "name": "teacher",
            "role": "teacher",
            "arch": config.teacher.arch,
            "params": teacher_cost["params"],
            "size_mb": teacher_cost["size_mb"],
            "train_images": teacher_info["train_images"],
            "metrics": {k: teacher_info["metrics"].get(k) for k in ("accuracy", "ece", "nll")}
            | {"latency_ms": teacher_cost["latency_per_item_ms"], "latency_ms_p95": teacher_cost["latency_ms_p95"] / teacher_cost["latency_batch_size"],
               "throughput_per_s": teacher_cost["throughput_per_s"]},
            "per_class_accuracy": teacher_info["metrics"].get("per_class_accuracy"),
            "reliability": teacher_info["metrics"].get("reliability"),
            "per_seed": [{"seed": config.teacher.seed, "accuracy": teacher_info["metrics"].get("accuracy")}],
            "run_dir": "teacher",
        }]
        baseline_acc = None
        for method, per_seed in student_rows:
            entry = _student_entry(config, method, per_seed, student_costs[method.name])
            summary = entry["metrics"]
            if method.role == "baseline" and baseline_acc is None:
                baseline_acc = summary["accuracy"]
            models.append(entry)
        for entry in models[1:]:
            if baseline_acc is not None:
                entry["metrics"]["accuracy_gain_vs_baseline"] = entry["metrics"]["accuracy"] - baseline_acc
        from kdforge.data.vision import FASHION_MNIST_CLASSES

        return {
            "recipe": RECIPE_NAME,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "primary_metric": "accuracy",
            "higher_is_better": True,
            "classes": list(FASHION_MNIST_CLASSES),
            "seeds": list(config.seeds),
            "labelled_images": config.data.labelled,
            "transfer_images": max((m["train_images"] - config.data.labelled for m in models[1:] if m.get("transfer_set")), default=0),
            "test_images": teacher_info.get("test_images"),
            "device": teacher_cost["device"],
            "threads": torch.get_num_threads(),
            "teacher_cached": bool(teacher_info.get("cached")),
            "models": models,
        }


class CostMeter:
    """Process CPU seconds and peak resident memory (RSS) between :meth:`start` and :meth:`stop`.

    The peak is sampled every ``interval_s`` by a daemon thread from ``/proc/self/statm`` (Linux);
    elsewhere it is the process's lifetime peak (``resource.getrusage``), an upper bound.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        import threading

        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: Any = None
        self.peak = 0
        self._cpu0 = 0.0

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                import os

                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss_bytes())

    def start(self) -> CostMeter:
        import threading

        self.peak = self.rss_bytes()
        self._cpu0 = time.process_time()
        self._thread = threading.Thread(target=self._sample, name="kdforge-cost-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        cpu = time.process_time() - self._cpu0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss_bytes())
        return {"cpu_seconds": cpu, "peak_rss_mb": self.peak / 2**20}


class _KeyedDataset(torch.utils.data.Dataset):
    """Images, labels and named per-image tensors (an ensemble's member logits, PS-KD's index)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, **keys: torch.Tensor) -> None:
        self.inputs, self.labels, self.keys = inputs, labels, keys

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], **{k: v[i] for k, v in self.keys.items()}}


class _Regime:
    """How a method with a ``teacher:`` block trains: its dataset, its teacher source, its
    fingerprint part and (born-again) its chain of generations (docs/regimes.md)."""

    def __init__(self, method: MethodConfig, data: _Data, labelled_idx: torch.Tensor,
                 transfer_idx: torch.Tensor | None) -> None:
        from kdforge.constants import IGNORE_INDEX

        self.method, self.data, self.spec = method, data, method.teacher
        self.idx = labelled_idx if transfer_idx is None else torch.cat([labelled_idx, transfer_idx])
        self.labels = data.y_train[self.idx].clone()
        self.labels[len(labelled_idx):] = IGNORE_INDEX
        self.guidance: list[dict[str, Any]] = []  # born-again label_weight: one record per generation

    def _logits(self, name: str) -> torch.Tensor:
        return (self.data.t_train_logits if name == "teacher" else self.data.extra[name][0])[self.idx]

    def dataset(self) -> torch.utils.data.Dataset:
        x = self.data.x_train[self.idx]
        spec = self.spec
        if spec is None or spec.source == "cached":
            return _KeyedDataset(x, self.labels, teacher_logits=self._logits("teacher"))
        if spec.source == "ensemble":  # no "teacher_logits" key: the batch cache would win over the ensemble
            return _KeyedDataset(x, self.labels, **{f"teacher_logits/{n}": self._logits(n) for n in spec.members})
        if spec.source == "pskd":
            return _KeyedDataset(x, self.labels, index=torch.arange(len(self.idx)))
        return _KeyedDataset(x, self.labels)  # online, mutual, born_again: no cached logits in the batch

    def key(self) -> dict[str, Any]:
        """What else determines the result: the ensemble members' own fingerprints."""
        if self.spec is None or self.spec.source != "ensemble":
            return {}
        return {"members": {n: self.data.extra[n][2]["fingerprint"] for n in self.spec.members if n != "teacher"}}

    def check_launch(self, world_size: int) -> None:
        if world_size > 1 and self.spec is not None and self.spec.source in ("pskd", "mutual"):
            raise ConfigError(f"method {self.method.name!r}: a {self.spec.source} teacher trains in one process only",
                              "run this method without accelerate launch / torchrun")

    def source_fn(self, config: FashionMnistConfig, seed: int) -> Any:
        """``f(student, total_steps) -> TeacherSource`` (None: the batch's cached logits)."""
        spec = self.spec
        if spec is None or spec.source == "cached":
            return None
        if spec.source == "online":
            import copy

            from kdforge.teachers.online import OnlineTeacher

            assert self.data.teacher_model is not None
            return lambda model, steps: OnlineTeacher(copy.deepcopy(self.data.teacher_model))
        if spec.source == "pskd":
            from kdforge.teachers.sources import PSKDTeacher

            return lambda model, steps: PSKDTeacher(model, len(self.idx), k=spec.k)
        if spec.source == "ensemble":
            from kdforge.teachers.sources import EnsembleTeacher
            from kdforge.teachers.sources.cached import BatchLogitsTeacher

            members = [BatchLogitsTeacher(f"teacher_logits/{n}") for n in spec.members]
            kwargs: dict[str, Any] = {"weighting": spec.weighting}
            if spec.weighting == "fixed" and spec.weights is not None:
                kwargs["weights"] = spec.weights
            if spec.weighting == "entropy":
                kwargs["temperature"] = spec.temperature
            # a per_teacher term needs each member's signal beside the mixture
            kwargs["per_member_signals"] = any(getattr(t, "per_teacher", False) for t in self.method.terms)
            return lambda model, steps: EnsembleTeacher(members, **kwargs)
        if spec.source == "mutual":
            return self._mutual(config, seed)
        if spec.source == "ema":
            from kdforge.teachers.sources import SelfTeacher

            return lambda model, steps: SelfTeacher(model, mode="ema", decay=spec.decay)
        raise ConfigError(f"teacher source {spec.source!r} has no per-run source", "see docs/regimes.md")

    def _mutual(self, config: FashionMnistConfig, seed: int) -> Any:
        from kdforge.students.vision import build_vision_model
        from kdforge.teachers.sources.mutual import MutualTeacher
        from kdforge.train.optim import lr_lambda

        spec, tr = self.spec, config.train
        assert spec is not None
        peers_cfg = spec.peers or [PeerConfig()]
        terms = spec.peer_terms or [TermSpec(name="cross_entropy", weight=1.0),
                                    TermSpec(name="forward_kl", weight=1.0, params={"temperature": 1.0})]

        def make(model: torch.nn.Module, steps: int) -> Any:
            torch.manual_seed(seed + 10_000)  # the peers' own init, the same for every method of this seed
            peers = [build_vision_model(p.arch, **p.kwargs) for p in peers_cfg]
            return MutualTeacher(model, peers, terms=[LossTerm(**t.model_dump()) for t in terms], lr=tr.lr,
                                 weight_decay=tr.weight_decay,
                                 lr_schedule=lr_lambda(tr.scheduler, int(tr.warmup_ratio * steps), steps))
        return make

    def selected(self, config: FashionMnistConfig, seed: int, run_dir: Path,
                 fit: dict[str, Any]) -> tuple[torch.nn.Module, int, dict[str, Any]]:
        """Active / KD3 methods: select from the transfer images, then train (recipes/data_methods.py)."""
        from kdforge.eval.classification import predict_logits
        from kdforge.recipes.data_methods import shift_pool, train_selected

        spec, n_lab = self.method.data, int((self.labels != -100).sum())
        x, t = self.data.x_train[self.idx], self.data.t_train_logits[self.idx]
        x_pool, t_pool = x[n_lab:], t[n_lab:]
        if spec.kind == "kd3":  # the shifted pool: the teacher labels the shifted images themselves
            x_pool, _ = shift_pool(x_pool, spec.shift_fraction)
            t_pool = predict_logits(self.data.teacher_model, x_pool)
        fit = dict(fit)
        factory, epochs = fit.pop("factory"), fit.pop("epochs")
        if fit.pop("world_size", 1) > 1:
            raise ConfigError(f"method {self.method.name!r}: {spec.kind} selection trains in one process only",
                              "run this method without accelerate launch / torchrun")
        return train_selected(spec, factory=factory, fit=_fit, dataset_cls=_KeyedDataset, terms=self.method.terms,
                              teacher=self.data.teacher_model, x_lab=x[:n_lab], y_lab=self.labels[:n_lab],
                              t_lab=t[:n_lab], x_pool=x_pool, y_pool=self.data.y_train[self.idx][n_lab:],
                              t_pool=t_pool, run_dir=run_dir, seed=seed, epochs=epochs, fit_kwargs=fit)

    def born_again(self, model: torch.nn.Module, config: FashionMnistConfig, run_dir: Path,
                   fit: dict[str, Any]) -> tuple[torch.nn.Module, int]:
        """Born-again networks (Furlanello et al. 2018): generation 0 learns from the labels (or is an
        untrained random network, "random teachers are good teachers"); generation ``g+1`` learns
        with the method's terms from generation ``g``'s logits. With ``label_weight`` (Borup & Andersen
        2021, recipes/born_again_guidance.py) the terms' weights become ``alpha_g`` / ``1 - alpha_g``,
        recorded in ``self.guidance``; ``auto`` estimates ``alpha_g`` on a *shadow* chain, the same
        generations trained without the held-out labelled images (``shadow-g/``), so that the rows
        the estimate scores on are unseen. Returns the last generation."""
        import copy

        from kdforge.eval.classification import predict_logits
        from kdforge.students.vision import build_vision_model

        spec = self.spec
        assert spec is not None
        x = self.data.x_train[self.idx]
        steps = 0
        auto = spec.label_weight == "auto"
        keep = guidance_split(self.labels, fit["seed"])[0] if auto else None  # the shadow chain's rows
        shadow = copy.deepcopy(model) if auto else None  # gen 0's init (random: gen 0 itself)
        if spec.first == "labels":
            first = _fit(model, _KeyedDataset(x, self.labels), [TermSpec(name="cross_entropy", weight=1.0)],
                         run_dir=run_dir / "gen-0", **fit)
            teacher, steps = first["model"], first["steps"]
            if auto:
                with torch.random.fork_rng():  # the real chain's random state is untouched
                    shadow = _fit(shadow, _KeyedDataset(x[keep], self.labels[keep]),
                                  [TermSpec(name="cross_entropy", weight=1.0)], run_dir=run_dir / "shadow-0",
                                  **fit)["model"]
        else:
            teacher = model  # its seeded random init, untrained
        for g in range(1, spec.generations + 1):
            logits = predict_logits(teacher, x)
            terms = self.method.terms
            if spec.label_weight is not None:
                prev = shadow if auto else teacher
                prev_logits = predict_logits(prev, x) if auto else logits
                self.guidance.append(generation_label_weight(spec.label_weight, prev, x, prev_logits, self.labels,
                                                             seed=fit["seed"], generation=g))
                terms = guidance_terms(terms, self.guidance[-1]["alpha"])
            torch.manual_seed(fit["seed"] * 1000 + g)  # each generation starts from a fresh init
            arch = self.method.student_config(config.student)
            student = build_vision_model(arch.arch, **arch.kwargs)
            if auto and g < spec.generations:  # the shadow generation g, from the same init
                with torch.random.fork_rng():
                    shadow = _fit(copy.deepcopy(student), _KeyedDataset(
                        x[keep], self.labels[keep], teacher_logits=prev_logits[keep]), terms,
                        run_dir=run_dir / f"shadow-{g}", **fit)["model"]
            out = _fit(student, _KeyedDataset(x, self.labels, teacher_logits=logits), terms,
                       run_dir=run_dir / f"gen-{g}", **fit)
            teacher, steps = out["model"], steps + out["steps"]
        return teacher, steps


def _student_entry(config: FashionMnistConfig, method: MethodConfig, per_seed: list[dict[str, Any]],
                   student_cost: Mapping[str, Any]) -> dict[str, Any]:
    """The results row of one method: metrics as mean and std over its seeds, pooled reliability."""
    summary: dict[str, float] = {}
    for key in ("accuracy", "agreement", "kl_to_teacher", "ece", "nll"):
        mean, std = _mean_std([r["metrics"].get(key) for r in per_seed])
        summary[key], summary[f"{key}_std"] = mean, std
    summary |= {"latency_ms": student_cost["latency_per_item_ms"],
                "latency_ms_p95": student_cost["latency_ms_p95"] / student_cost["latency_batch_size"],
                "throughput_per_s": student_cost["throughput_per_s"]}
    n_classes = len(per_seed[0]["metrics"]["per_class_accuracy"])
    per_class = [statistics.fmean(r["metrics"]["per_class_accuracy"][c] for r in per_seed) for c in range(n_classes)]
    entry = {
        "name": f"student / {method.name}",
        "method": method.name,
        "role": method.role,
        "arch": method.student_config(config.student).arch,
        **({"student_kwargs": method.student.kwargs} if method.student is not None else {}),
        "params": student_cost["params"],
        "size_mb": student_cost["size_mb"],
        "terms": _terms_json(method.terms),
        "transfer_set": method.transfer_set,
        "train_images": per_seed[0]["train_images"],
        "epochs": per_seed[0]["epochs"],
        "metrics": summary,
        "per_class_accuracy": per_class,
        "reliability": _pool_reliability([r["metrics"]["reliability"] for r in per_seed]),
        "per_seed": [{"seed": r["seed"], **{k: r["metrics"][k] for k in ("accuracy", "agreement", "kl_to_teacher", "ece")},
                      "train_seconds": r["train_seconds"]} for r in per_seed],
        "run_dir": [f"students/{slug(method.name)}/seed-{r['seed']}" for r in per_seed],
    }
    if method.teacher is not None:
        entry["teacher"] = method.teacher.model_dump(mode="json", exclude_unset=True)
    if method.data is not None:
        entry["data"] = method.data.model_dump(mode="json", exclude_unset=True)
        ood = [r["data_method"]["ood_accuracy"] for r in per_seed if r.get("data_method")]
        entry["metrics"]["ood_accuracy"], entry["metrics"]["ood_accuracy_std"] = _mean_std(ood)
    costs = [r["cost"] for r in per_seed if r.get("cost")]
    if costs:
        entry["cost"] = {"cpu_s_per_step": statistics.fmean(c["cpu_s_per_step"] for c in costs),
                         "peak_rss_mb": max(c["peak_rss_mb"] for c in costs),
                         "steps": statistics.fmean(c["steps"] for c in costs)}
    return entry


def _load_data(config: FashionMnistConfig) -> _Data:
    from kdforge.data.vision import load_fashion_mnist, normalize_images

    splits = load_fashion_mnist(config.data.root)
    x_test, y_test = normalize_images(splits.test_images), splits.test_labels
    if config.data.test_limit is not None:
        x_test, y_test = x_test[: config.data.test_limit], y_test[: config.data.test_limit]
    return _Data(normalize_images(splits.train_images), splits.train_labels, x_test, y_test)


def _load_cached_teacher(teacher: torch.nn.Module | None, folder: Path, data: _Data) -> bool:
    """Load the cached teacher logits into ``data`` (and its weights into ``teacher``); False when
    the cache is incomplete or was computed over other images."""
    from safetensors.torch import load_file

    weights, logits_path = folder / "model.safetensors", folder / "logits.safetensors"
    if not (weights.is_file() and logits_path.is_file()):
        return False
    try:
        if teacher is not None:
            teacher.load_state_dict(load_file(weights))
        logits = load_file(logits_path)
    except Exception as exc:  # corrupt cache: a torn file from a crash cannot happen, but a hand edit can
        raise CacheError(f"teacher cache in {folder} cannot be read: {exc}",
                         f"delete {folder} and run again (the teacher is retrained)") from None
    if len(logits["train"]) != len(data.x_train) or len(logits["test"]) != len(data.x_test):
        return False
    data.t_train_logits, data.t_test_logits = logits["train"], logits["test"]
    return True


def _student_dataset(data: _Data, labelled_idx: torch.Tensor, transfer_idx: torch.Tensor | None) -> Any:
    """The labelled images, plus the transfer images (label -100: teacher targets only) if given."""
    from kdforge.constants import IGNORE_INDEX
    from kdforge.data.vision import ImageClassificationDataset

    idx = labelled_idx if transfer_idx is None else torch.cat([labelled_idx, transfer_idx])
    labels = data.y_train[idx].clone()
    labels[len(labelled_idx):] = IGNORE_INDEX
    return ImageClassificationDataset(data.x_train[idx], labels, data.t_train_logits[idx])


def _costs(config: FashionMnistConfig, teacher: torch.nn.Module,
           x_test: torch.Tensor) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Parameters, size and CPU latency of the teacher, and of each method's (untrained) student
    by method name (measured once per distinct architecture)."""
    from kdforge.eval.cost import cost_report
    from kdforge.students.vision import build_vision_model

    example = x_test[: config.eval.latency_batch_size]
    kwargs = {"warmup": config.eval.latency_warmup, "repeats": config.eval.latency_repeats}
    by_arch: dict[str, dict[str, Any]] = {}
    per_method: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        arch = method.student_config(config.student)
        key = json.dumps(arch.model_dump(mode="json"), sort_keys=True)
        if key not in by_arch:
            by_arch[key] = cost_report(build_vision_model(arch.arch, **arch.kwargs), example, **kwargs)
        per_method[method.name] = by_arch[key]
    return cost_report(teacher, example, **kwargs), per_method


def _metrics_jsonl(results: Mapping[str, Any]) -> str:
    """One eval record per model (``metrics.jsonl`` of the run folder, for ``kdforge report``)."""
    lines = []
    for i, m in enumerate(results["models"]):
        record = {"step": i, "split": "eval", "model": m["name"]}
        record |= {f"eval/{k}": v for k, v in m["metrics"].items() if isinstance(v, int | float)}
        lines.append(json.dumps(record))
    return "\n".join(lines) + "\n"


def _pool_reliability(bins: list[dict[str, list]]) -> dict[str, list]:
    """Merge the reliability bins of several seeds (count-weighted means)."""
    first = bins[0]
    n = len(first["bin_count"])
    count = [sum(b["bin_count"][i] for b in bins) for i in range(n)]

    def pooled(key: str) -> list[float | None]:
        out = []
        for i in range(n):
            if count[i] == 0:
                out.append(None)
            else:
                out.append(sum((b[key][i] or 0.0) * b["bin_count"][i] for b in bins) / count[i])
        return out

    return {"bin_lower": first["bin_lower"], "bin_upper": first["bin_upper"],
            "bin_confidence": pooled("bin_confidence"), "bin_accuracy": pooled("bin_accuracy"), "bin_count": count}


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt_pm(metrics: Mapping[str, Any], key: str, scale: float = 100.0, digits: int = 2) -> str:
    mean = metrics.get(key)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    std = metrics.get(f"{key}_std")
    if std is None:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for m in results["models"]:
        met = m["metrics"]
        gain = met.get("accuracy_gain_vs_baseline")
        rows.append([
            m["name"],
            f"{m['params']:,}",
            _fmt_pm(met, "accuracy"),
            "–" if gain is None or m["role"] == "teacher" else f"{gain * 100:+.2f}",
            _fmt_pm(met, "agreement") if "agreement" in met else "–",
            _fmt_pm(met, "ece"),
            f"{met['latency_ms']:.3f}",
        ])
    return rows


HEADER = ["model", "params", "test acc % (mean ± std)", "Δ vs labels only", "agreement w/ teacher %", "ECE % (15 bins)", "CPU latency ms/image"]

SHORT_HEADER = ["model", "params", "test acc", "Δ acc", "agree", "ECE", "ms/img"]


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results table as Markdown, with the setting it was measured in."""
    seeds = results["seeds"]
    lines = [
        f"# {results['recipe']}",
        "",
        f"Students: {results['labelled_images']:,} labelled images"
        + (f" (+{results['transfer_images']:,} unlabelled for transfer-set methods)" if results.get("transfer_images") else "")
        + f", {len(seeds)} seeds ({', '.join(map(str, seeds))}); Fashion-MNIST test set."
        + f" Latency: batch 1, {results['device']}, {results['threads']} threads.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(results)]
    if "timings" in results:
        t = results["timings"]
        lines += ["", "Wall time: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


def print_results(results: Mapping[str, Any]) -> None:
    """Print the results table to the console with rich (this is the recipe's CLI output)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['recipe']}: {results['labelled_images']:,} labelled images, seeds {results['seeds']}",
                  caption="acc/agree/ECE in %, mean ± std over seeds; Δ vs labels only; CPU latency at batch 1")
    for i, h in enumerate(SHORT_HEADER):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in _rows(results):
        table.add_row(*r)
    Console().print(table)


def plot_results(results: Mapping[str, Any], out: Path) -> list[Path]:
    """Write ``accuracy.png`` (per method, error bars = std over seeds, dots = seeds) and
    ``cost_quality.png`` (test accuracy vs parameters, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdforge.io import atomic_write

    models = results["models"]
    students = [m for m in models if m["role"] != "teacher"]
    teacher = next((m for m in models if m["role"] == "teacher"), None)
    paths = []

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(students), 4.2))
    xs = range(len(students))
    means = [m["metrics"]["accuracy"] * 100 for m in students]
    stds = [m["metrics"].get("accuracy_std", 0.0) * 100 for m in students]
    colors = ["tab:gray" if m["role"] == "baseline" else "tab:blue" for m in students]
    ax.bar(xs, means, yerr=stds, capsize=6, color=colors, alpha=0.75)
    for x, m in zip(xs, students):
        ys = [s["accuracy"] * 100 for s in m["per_seed"]]
        ax.scatter([x] * len(ys), ys, color="black", s=12, zorder=3)
    if teacher is not None and teacher["metrics"].get("accuracy") is not None:
        ax.axhline(teacher["metrics"]["accuracy"] * 100, color="tab:red", linestyle="--", label="teacher")
        ax.legend(loc="lower right")
    lo = min(m - s for m, s in zip(means, stds)) if means else 0
    hi = max([m + s for m, s in zip(means, stds)] + ([teacher["metrics"]["accuracy"] * 100] if teacher else []))
    ax.set_ylim(max(0, lo - 2), min(100, hi + 1))
    ax.set_xticks(list(xs), [m.get("method", m["name"]) for m in students], rotation=15, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST students, {results['labelled_images']:,} labels, {len(results['seeds'])} seeds")
    fig.tight_layout()
    path = out / "accuracy.png"
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for m in models:
        acc = m["metrics"].get("accuracy")
        if acc is None:
            continue
        ax.errorbar(m["params"], acc * 100, yerr=m["metrics"].get("accuracy_std", 0.0) * 100, fmt="o", capsize=4,
                    label=m.get("method", m["name"]))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("cost vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "cost_quality.png"
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths
