"""``llm_kd``: distil a causal LM into a student built from its own layers, from a cached top-k.

What one run does (the LLM quickstart, ``configs/quickstart.yaml``):

1. loads the teacher (default: the offline SmolLM2-135M-Instruct asset) and its tokenizer;
2. packs real prose (default: Jane Austen; train on one novel, hold out another) into
   ``[N, T]`` token blocks (:mod:`kdforge.data.text`);
3. runs the teacher **once** over the training blocks and stores its top-k log-probabilities
   (:func:`kdforge.teachers.build_teacher_cache`; resumable, reused on a re-run);
4. builds one student from the teacher (copied embeddings, final norm, head and a subset of the
   decoder layers: :func:`kdforge.students.student_from_teacher`);
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
import hashlib
import json
import logging
import math
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from kdforge.config import StrictModel
from kdforge.errors import ConfigError, DataError
from kdforge.io import sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic
from kdforge.recipes import RECIPES, Recipe
from kdforge.train.config import TrainConfig
from kdforge.train.objective import LossTerm, Objective
from kdforge.train.onpolicy import OnPolicyConfig

log = logging.getLogger(__name__)


class TeacherSpec(StrictModel):
    """The teacher: an asset name (``smollm2``), a local folder, or a Hub id."""

    model: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"


class StudentSpec(StrictModel):
    """A student built from the teacher's layers (see :mod:`kdforge.students.from_teacher`)."""

    layers: Literal["every_k", "first_last"] | list[int] = "every_k"
    num_layers: int | None = Field(6, ge=1, description="depth for layers='every_k' (ignored otherwise)")
    freeze_embeddings: bool = True
    freeze_head: bool = True


class DataSpec(StrictModel):
    """Text corpus and its split by document (held-out = other documents)."""

    corpus: str = Field("austen", description="'austen' or a folder of .txt files (document = file stem)")
    train_docs: list[str] = Field(default_factory=lambda: ["prideprejudice"])
    eval_docs: list[str] = Field(default_factory=lambda: ["persuasion"])
    seq_len: int = Field(128, ge=8)
    train_sequences: int | None = Field(256, ge=1, description="blocks drawn from train_docs; null = all")
    eval_sequences: int | None = Field(64, ge=1, description="held-out blocks; null = all")
    unwrap_paragraphs: bool = True
    seed: int = 0


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
    (LM head + loss in chunks of positions: :class:`~kdforge.train.Objective` ``chunked=True``).
    """

    name: str
    role: Literal["baseline", "student"] = "student"
    objective: list[LossTerm]
    on_policy: OnPolicySpec | None = None
    taid: TAIDSpec | None = None
    chunked: bool = False

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
        if self.chunked:
            try:
                Objective(self.objective, chunked=True)
            except ConfigError as exc:
                raise ValueError(f"chunked: {exc.problem}; {exc.fix or ''}".rstrip("; ")) from None
        return self


class EvalSpec(StrictModel):
    batch_size: int = Field(8, ge=1)
    during_training_sequences: int = Field(
        16, ge=0, description="held-out blocks scored every train.eval_every steps (0 = off)"
    )
    speed_batch: int = Field(8, ge=1, description="batch size of the inference tokens/s measurement")
    speed_repeats: int = Field(2, ge=1)


def _default_train() -> TrainConfig:
    return TrainConfig(max_steps=100, batch_size=8, lr=1e-3, scheduler="linear", warmup_steps=5,
                       log_every=10, eval_every=25, progress=False)


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
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec = Field(default_factory=DataSpec)
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
        if len(set(map(_slug, names))) != len(names):
            raise ValueError(f"method names {names} collide once turned into folder names")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        for m in self.methods:
            if m.on_policy is not None and m.on_policy.prompt_tokens >= self.data.seq_len:
                raise ValueError(f"methods: {m.name!r} on_policy.prompt_tokens={m.on_policy.prompt_tokens} must be "
                                 f"below data.seq_len={self.data.seq_len} (the rest of a block is the completion)")
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


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "method"


# --------------------------------------------------------------------------------------------
# pieces (public so tests and notebooks can reuse them)


def resolve_model_path(spec: str) -> str:
    """An asset name (``smollm2``) becomes its local folder; anything else is passed through."""
    from kdforge.assets import ASSET_MODULES, ensure

    if spec in ASSET_MODULES:
        return str(ensure(spec))
    return spec


def load_documents(corpus: str) -> dict[str, str]:
    """``{document name: text}``: the Austen asset, or every ``*.txt`` in a folder."""
    if corpus == "austen":
        from kdforge.assets.austen import load_books

        return load_books()
    folder = Path(corpus)
    if not folder.is_dir():
        raise DataError(f"corpus {corpus!r} is neither 'austen' nor a folder",
                        "set data.corpus to 'austen' or to a folder of .txt files")
    docs = {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}
    if not docs:
        raise DataError(f"no .txt files in {folder}", "put one UTF-8 text file per document there")
    return docs


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
# sub-runs (one per method x seed) and their records, for `kdforge run --resume`

SUBRUN_RECORD = "subrun.json"
FINGERPRINT_FILE = "fingerprint.txt"


def subrun_fingerprint(config: LLMKDConfig, method: MethodSpec, seed: int) -> str:
    """Hash of everything that determines one sub-run's trained student (not where it is written).

    A finished sub-run is reused by ``--resume`` only under the same fingerprint; a changed
    config (another lr, method, teacher...) retrains it.
    """
    key = {
        "teacher": config.teacher.model_dump(mode="json"),
        "student": config.student.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "cache": config.cache.model_dump(mode="json", exclude={"dir"}),
        "train": config.train.model_dump(mode="json", exclude={"output_dir", "progress", "log_with"}),
        "inner_eval": config.eval.during_training_sequences,
        "method": method.model_dump(mode="json"),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def prepare_subrun_dir(run_dir: Path, fingerprint: str, resume: bool) -> None:
    """Make ``run_dir`` ready for a sub-run that is about to (re)start (main process only).

    Drops a stale completion record; on resume, drops checkpoints written under another
    fingerprint (another config: continuing them would mix two runs).
    """
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUBRUN_RECORD).unlink(missing_ok=True)
    marker = run_dir / FINGERPRINT_FILE
    old = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
    if resume and old != fingerprint and (run_dir / "checkpoints").exists():
        log.warning("resume: the checkpoints in %s were written by another config; starting this sub-run over",
                    run_dir)
        shutil.rmtree(run_dir / "checkpoints")
    write_text_atomic(marker, fingerprint + "\n")


def write_subrun_record(run_dir: Path, fingerprint: str, train_info: dict[str, Any], model: torch.nn.Module,
                        weights: str | None) -> Path:
    """Record a finished sub-run: ``subrun.json`` (written last) names its weights and their SHA-256.

    ``weights`` is the student file already written (``student/model.safetensors``), or None to
    write ``final.safetensors`` from ``model``.
    """
    from kdforge.train.checkpoint import state_dict_to_bytes

    if weights is None:
        weights = "final.safetensors"
        write_bytes_atomic(run_dir / weights, state_dict_to_bytes(model.state_dict()))
    record = {"fingerprint": fingerprint, "weights": weights, "weights_sha256": sha256_file(run_dir / weights),
              "train_info": train_info}
    write_json_atomic(run_dir / SUBRUN_RECORD, record)
    return run_dir / SUBRUN_RECORD


def read_finished_subrun(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of a sub-run that finished under ``fingerprint`` with intact weights, else None."""
    try:
        record = json.loads((run_dir / SUBRUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        log.info("resume: %s was trained with another config; retraining it", run_dir)
        return None
    weights = run_dir / str(record.get("weights", ""))
    if not weights.is_file() or sha256_file(weights) != record.get("weights_sha256"):
        log.warning("resume: the weights of %s are missing or do not match their checksum; retraining it", run_dir)
        return None
    return record


def plain_student(distiller: Any, template: torch.nn.Module, main: bool) -> torch.nn.Module | None:
    """The trained student as a plain module for rank 0's evaluation (eval mode).

    Under DDP (or one process) that is the unwrapped student itself. Under FSDP its parameters are
    shards that only a collective forward can use, so the full weights are gathered (every rank
    must call this) into a copy of ``template`` on rank 0; other ranks get None.
    """
    from kdforge.train.checkpoint import is_fully_sharded

    if not is_fully_sharded(distiller.student):
        return distiller.unwrapped_student.eval()
    state = distiller.accelerator.get_state_dict(distiller.student)
    if not main:
        return None
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


def load_subrun_student(run_dir: Path, record: dict[str, Any], template: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``template`` holding a finished sub-run's trained weights (eval mode).

    Keys absent from the file must be tied to a loaded tensor (``save_pretrained`` stores a tied
    LM head once).
    """
    from kdforge.errors import CheckpointError
    from kdforge.train.checkpoint import state_dict_from_bytes

    model = copy.deepcopy(template)
    path = run_dir / record["weights"]
    result = model.load_state_dict(state_dict_from_bytes(path.read_bytes()), strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in set(result.missing_keys)}
    untied = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit the student of this config (missing {untied[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]})",
                              f"delete {run_dir / SUBRUN_RECORD} to retrain this sub-run")
    return model.eval()


# --------------------------------------------------------------------------------------------
# the recipe


@RECIPES.register("llm_kd", "distil a causal LM into a layer-subset student from a cached top-k teacher")
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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kdforge.data.text import LMBlockDataset, make_lm_splits
        from kdforge.distributed import broadcast_from_main
        from kdforge.eval.cost import count_parameters
        from kdforge.eval.lm import evaluate_language_models
        from kdforge.students.from_teacher import student_from_teacher
        from kdforge.teachers import TeacherCacheDataset, build_teacher_cache, collate_teacher_cache
        from kdforge.teachers.cache.parallel import join_launch_group
        from kdforge.train import CausalLMTask, Distiller

        start = time.perf_counter()
        timings: dict[str, float] = {}
        out = Path(output_dir)
        group = join_launch_group()  # one process, or every process of the launch (gloo on CPUs)
        main = group.rank == 0
        if main:
            out.mkdir(parents=True, exist_ok=True)
            run_config = {"recipe": "llm_kd", **config.model_dump(mode="json")}
            run_config["output_dir"] = str(out)
            write_text_atomic(out / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))

        # 1. teacher -------------------------------------------------------------------------
        t0 = time.perf_counter()
        path = resolve_model_path(config.teacher.model)
        dtype = getattr(torch, config.teacher.dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as exc:
            raise ConfigError(f"cannot load teacher {config.teacher.model!r}: {str(exc).splitlines()[0]}",
                              "use 'smollm2' (offline asset), a local HF folder, or a Hub id with a network") from None
        teacher.requires_grad_(False).eval()
        timings["load_teacher_s"] = time.perf_counter() - t0

        # 2. data ----------------------------------------------------------------------------
        t0 = time.perf_counter()
        d = config.data
        splits = make_lm_splits(load_documents(d.corpus), tokenizer, d.seq_len, train_docs=d.train_docs,
                                eval_docs=d.eval_docs, max_train_blocks=d.train_sequences,
                                max_eval_blocks=d.eval_sequences, seed=d.seed, unwrap=d.unwrap_paragraphs)
        timings["data_s"] = time.perf_counter() - t0
        log.info("data: %s", splits.summary())

        # 3. teacher cache (the one teacher pass over the training tokens) -------------------
        t0 = time.perf_counter()
        cache_dir = Path(config.cache.dir) if config.cache.dir else out / "teacher_cache"
        build_teacher_cache(teacher, splits.train, cache_dir, k=config.cache.k, encoding=config.cache.encoding,
                            tail_samples=config.cache.tail_samples, sample_seed=config.cache.sample_seed,
                            batch_size=config.cache.batch_size, tokenizer=tokenizer,
                            teacher_id=config.teacher.model,
                            overwrite=config.cache.dir is None,  # only our own RUN_DIR cache is replaced
                            data_parallel=group)  # every rank writes its share; rank 0 merges
        train_data = TeacherCacheDataset(cache_dir, sequences=splits.train, tokenizer=tokenizer)
        timings["teacher_cache_s"] = time.perf_counter() - t0

        # 4. the student template ------------------------------------------------------------
        s = config.student
        template = student_from_teacher(teacher, s.layers,
                                         num_layers=s.num_layers if s.layers == "every_k" else None,
                                         freeze_embeddings=s.freeze_embeddings, freeze_head=s.freeze_head)
        template.eval()

        # 5. train every (method, seed) from the same initial student ------------------------
        n_inner = config.eval.during_training_sequences
        inner_eval = LMBlockDataset(splits.eval[:n_inner]) if n_inner else None
        trained: dict[tuple[str, int], torch.nn.Module] = {}
        train_info: dict[tuple[str, int], dict[str, Any]] = {}
        for seed in config.seeds:
            for method in config.methods:
                run_dir = out / _slug(method.name) / f"seed-{seed}"
                fingerprint = subrun_fingerprint(config, method, seed)
                # rank 0 decides (it verifies the weights' checksum) and tells the others
                finished = broadcast_from_main(
                    read_finished_subrun(run_dir, fingerprint) if resume and main else None)
                if finished is not None:
                    log.info("resume: %r, seed %d finished earlier (%s); not retrained", method.name, seed, run_dir)
                    if main:
                        trained[(method.name, seed)] = load_subrun_student(run_dir, finished, template)
                    train_info[(method.name, seed)] = finished["train_info"]
                    continue
                if main:
                    prepare_subrun_dir(run_dir, fingerprint, resume)
                group.barrier()  # every rank sees the same checkpoints before the Distiller looks
                train_cfg = config.train.model_copy(update={"output_dir": str(run_dir), "seed": seed})
                if inner_eval is None:
                    train_cfg = train_cfg.model_copy(update={"eval_every": None})
                student = copy.deepcopy(template)
                log.info("training %r, seed %d -> %s", method.name, seed, run_dir)
                t0 = time.perf_counter()
                objective = Objective(copy.deepcopy(method.objective), chunked=method.chunked)
                if method.on_policy is not None:  # GKD: student samples need the online teacher
                    m_teacher, m_data = teacher, LMBlockDataset(splits.train)
                    m_collate = _prompt_collate(method.on_policy.prompt_tokens)
                    on_policy: OnPolicyConfig | None = method.on_policy.to_config()
                elif objective.feature_terms:  # hidden states/attentions: only a live teacher has them
                    m_teacher, m_data, m_collate, on_policy = teacher, LMBlockDataset(splits.train), None, None
                else:
                    m_teacher, m_data, m_collate, on_policy = None, train_data, collate_teacher_cache, None
                distiller = Distiller(student, m_teacher, task=CausalLMTask(), objective=objective,
                                      config=train_cfg, train_data=m_data, collate_fn=m_collate,
                                      eval_data=inner_eval, on_policy=on_policy,
                                      run_config={"method": method.model_dump(mode="json"),
                                                  "train": train_cfg.model_dump(mode="json")})
                if method.taid is not None:
                    from kdforge.losses.taid import TAIDSchedule
                    from kdforge.train.taid import TAIDCallback

                    spec = method.taid.model_dump(exclude={"term"})
                    TAIDCallback(TAIDSchedule(distiller.state.max_steps, **spec),
                                 term=method.taid.term).attach(distiller)
                state = distiller.train(resume=resume)
                elapsed = time.perf_counter() - t0
                model = plain_student(distiller, template, main)
                if main:
                    trained[(method.name, seed)] = model
                info = {
                    "train_time_s": elapsed,
                    "train_tokens_per_s": state.positions_seen / max(elapsed, 1e-9),
                    "last_train_logs": {k: v for k, v in (state.last_logs or {}).items()
                                        if isinstance(v, int | float)},
                }
                train_info[(method.name, seed)] = info
                if config.save_students:
                    distiller.save_student(run_dir / "student")  # main writes, all wait
                    if main:
                        tokenizer.save_pretrained(run_dir / "student")
                if main:
                    write_subrun_record(run_dir, fingerprint, info, model,
                                        weights="student/model.safetensors" if config.save_students else None)
                group.barrier()
                del distiller, student
        timings["train_s"] = sum(v["train_time_s"] for v in train_info.values())
        if not main:
            # evaluation and every file below are rank 0's; wait for it, return what it wrote
            group.barrier()
            return json.loads((out / "results.json").read_text(encoding="utf-8"))

        # 6. held-out evaluation, teacher logits once per batch ------------------------------
        t0 = time.perf_counter()
        models: dict[str, torch.nn.Module] = {"teacher": teacher, "student init": template}
        for (name, seed), model in trained.items():
            models[f"{name}|{seed}"] = model
        eval_blocks = splits.eval
        batches = [{"input_ids": eval_blocks[i: i + config.eval.batch_size]}
                   for i in range(0, eval_blocks.shape[0], config.eval.batch_size)]
        scores = evaluate_language_models(models, batches, teacher="teacher")
        timings["eval_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        speed_blocks = eval_blocks[: config.eval.speed_batch]
        speeds = {"teacher": measure_tokens_per_s(teacher, speed_blocks, config.eval.speed_repeats),
                  "student": measure_tokens_per_s(template, speed_blocks, config.eval.speed_repeats)}
        timings["speed_s"] = time.perf_counter() - t0

        # 7. results -------------------------------------------------------------------------
        def _metrics(key: str) -> dict[str, float]:
            m = scores[key]["metrics"]
            keep = ("perplexity", "nll", "token_accuracy", "ece", "agreement", "kl_to_teacher", "js_to_teacher")
            return {k: float(m[k]) for k in keep if k in m}

        teacher_params = count_parameters(teacher)
        student_params = count_parameters(template)
        student_trainable = count_parameters(template, trainable_only=True)
        rows: list[dict[str, Any]] = [{
            "name": "teacher", "role": "teacher", "params": teacher_params,
            "size_mb": round(teacher_params * teacher.dtype.itemsize / 2**20, 1),
            "metrics": {**_metrics("teacher"), "tokens_per_s": speeds["teacher"]},
            "reliability": scores["teacher"]["reliability"],
        }]
        for method in config.methods:
            per_seed = []
            for seed in config.seeds:
                info = train_info[(method.name, seed)]
                per_seed.append({"seed": seed, **_metrics(f"{method.name}|{seed}"),
                                 "train_time_s": round(info["train_time_s"], 2),
                                 "train_tokens_per_s": round(info["train_tokens_per_s"], 1),
                                 "train_loss_last": info["last_train_logs"].get("loss"),
                                 **({"taid_t_final": info["last_train_logs"]["taid/t"]}
                                    if "taid/t" in info["last_train_logs"] else {})})
            metrics: dict[str, Any] = {}
            for key in per_seed[0]:
                if key in ("seed",) or not isinstance(per_seed[0][key], int | float):
                    continue
                mean, std = _mean_std([p[key] for p in per_seed])
                metrics[key] = mean
                if std is not None:
                    metrics[f"{key}_std"] = std
            metrics["tokens_per_s"] = speeds["student"]
            first = f"{method.name}|{config.seeds[0]}"
            rows.append({
                "name": f"student / {method.name}", "role": method.role, "params": student_params,
                "trainable_params": student_trainable,
                "size_mb": round(student_params * 4 / 2**20, 1),
                "metrics": metrics, "per_seed": per_seed,
                "objective": [t.model_dump(mode="json") for t in method.objective],
                "regime": method.model_dump(mode="json", include={"on_policy", "taid", "chunked"}),
                "reliability": scores[first]["reliability"],
                "run_dir": [f"{_slug(method.name)}/seed-{seed}" for seed in config.seeds],
            })
        timings["total_s"] = time.perf_counter() - start
        results: dict[str, Any] = {
            "recipe": "llm_kd",
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "primary_metric": "perplexity",
            "higher_is_better": False,
            "models": rows,
            "student_init": {**_metrics("student init"), "params": student_params,
                             "trainable_params": student_trainable,
                             "source_layers": list(template.config.kdforge_source_layers)},
            "data": splits.summary(),
            "teacher_cache": {"dir": str(cache_dir), "k": config.cache.k, "encoding": config.cache.encoding},
            "seeds": list(config.seeds),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "torch_threads": torch.get_num_threads(),
        }
        write_json_atomic(out / "results.json", results)
        table = results_markdown(results)
        write_text_atomic(out / "results.md", table)
        if config.plot:
            try:
                plot_run(out, results)
            except Exception as exc:  # a plot must never fail a finished run
                log.warning("could not write the plot: %s", exc)
        log.info("results (%s):\n%s", out, table)
        group.barrier()  # the other ranks read results.json after this
        return results


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
    t = results.get("timings", {})
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    return "\n".join(lines)


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
