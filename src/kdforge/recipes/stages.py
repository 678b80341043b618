"""Recipe ``stages``: a chain of recipe runs where each stage's output feeds the next.

Progressive distillation in one YAML (``configs/progressive.yaml``):

* **teacher assistant** (Mirzadeh et al., 2020, "Improved Knowledge Distillation via Teacher
  Assistant"): teacher -> a mid-sized assistant -> the small student, the assistant's saved student
  folder being the next stage's teacher (``teacher: {model: "{stages.assistant.student}"}``);
* **PKD-style progressively smaller students**: the same link repeated (30 -> 12 -> 6 layers);
* **general -> task-specific** (ERNIE-Tiny, G2SD): a first stage distils on general text, the next
  starts from its student (``student: {kind: pretrained, model: "{stages.general.student}"}``)
  and distils on the task's data.

Each stage is one run of an existing recipe (``llm_kd`` by default; any registered recipe works,
e.g. ``fashion_mnist_kd``) into ``RUN_DIR/[seed-S/]NAME``. Its config is a recipe YAML
(``config: path.yaml``: a path from the working directory, or the name of a shipped config such as
``quickstart``) or inline (``config: {...}``), then the top-level ``overrides`` (every stage), then
the stage's own ``overrides`` (dotted keys, as ``kdforge run --set``; a mapping merges into the
section it names). Strings anywhere in a stage's config may name an earlier stage's output:

* ``{stages.NAME.student}`` — the saved student folder of stage ``NAME`` (``llm_kd`` with
  ``save_students: true``): its one method of role ``student``;
* ``{stages.NAME.student[METHOD]}`` — the saved student of the method called ``METHOD``;
* ``{stages.NAME.dir}`` — the stage's run folder (e.g. to share its teacher cache:
  ``cache: {dir: "{stages.assistant.dir}/teacher_cache"}``).

With the top-level ``seeds: [0, 1]`` the whole chain runs once per seed (``RUN_DIR/seed-S/NAME``,
every stage's ``seeds`` set to ``[S]``), so the seed-1 student is taught by the seed-1 assistant.

**Resume per stage.** A stage's fingerprint hashes its recipe, its validated config (the run folder
written as ``<RUN_DIR>``) and the fingerprint of the stage before it. A finished stage writes
``stage.json`` (fingerprint, SHA-256 of each saved student's weights) last; ``kdforge run --resume``
skips a stage whose record matches and whose students are intact. A stage whose fingerprint changed
(its own config, or any earlier stage's) starts over in an emptied folder; so does every later
stage, because their fingerprints chain. An interrupted stage with an unchanged fingerprint
continues through its recipe's own ``--resume`` (finished sub-runs kept, checkpoints continued).

Every reference is resolved and every stage's config validated before anything is written:
unknown stage names, references to the stage itself or a later one (a cycle or a forward
reference), and references to a stage that saves no student fail with a
:class:`~kdforge.errors.ConfigError` naming the fix.

**Summary.** ``results.json`` / ``results.md``: every stage's result rows (mean ± std over the
chain seeds). With ``reference: {stage: NAME}`` (``llm_kd`` stages) every saved student of every
stage is also scored on the held-out data of stage ``NAME`` against **that stage's teacher**
(perplexity, top-1 agreement, KL(teacher ‖ student)), so a student taught by an assistant is
compared with the original teacher, not only with its own.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from kdforge.config import StrictModel, read_yaml, validate
from kdforge.errors import ConfigError
from kdforge.recipes import RECIPES, Recipe, _set_dotted, load_recipe
from kdforge.recipes.subrun import (
    FINGERPRINT_FILE,
    RecipeRun,
    SubRun,
    config_key,
    fingerprint,
    slug,
)

log = logging.getLogger(__name__)

__all__ = ["PlannedStage", "ReferenceSpec", "StageSpec", "Stages", "StagesConfig", "plan_stages",
           "stage_references", "summary_markdown"]

RECIPE_NAME = "stages"
STAGE_RECORD = "stage.json"
#: ``{stages.NAME.student}``, ``{stages.NAME.student[METHOD]}``, ``{stages.NAME.dir}``
REFERENCE = re.compile(r"\{stages\.([^.{}\[\]]+)\.([A-Za-z_]+)(?:\[([^\]{}]+)\])?\}")
_OUTPUTS = ("student", "dir")
_RUN_DIR = "<RUN_DIR>"


class StageSpec(StrictModel):
    """One stage: a run of an existing recipe, configured from a file or inline, plus overrides."""

    name: str = Field(description="the stage's name: its folder and how later stages refer to it")
    recipe: str | None = Field(None, description="the recipe this stage runs (default: the config file's "
                                                 "recipe: key, else llm_kd)")
    config: str | dict[str, Any] = Field(default_factory=dict, description=(
        "the stage's recipe config: a YAML path (from the working directory, or a shipped config name such "
        "as quickstart) or the config inline; strings may hold {stages.NAME.student}, "
        "{stages.NAME.student[METHOD]} or {stages.NAME.dir}"))
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "dotted keys set on the config after it is read, like kdforge run --set (student.num_layers: 12)"))

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError(f"stage name {value!r}: use letters, digits, '_' and '-' only (it is a folder name "
                             "and part of {stages.NAME.student})")
        return value


class ReferenceSpec(StrictModel):
    """Score every saved student against one stage's teacher on that stage's held-out data."""

    stage: str = Field(description="the llm_kd stage whose teacher and held-out data every student is scored on")
    batch_size: int = Field(8, ge=1)


class StagesConfig(StrictModel):
    """Config of the ``stages`` recipe (YAML: ``recipe: stages`` plus these keys)."""

    output_dir: str = "outputs/stages"
    stages: list[StageSpec] = Field(min_length=1, description="run in order; each may use earlier stages' outputs")
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "dotted keys set on every stage's config before its own overrides (e.g. a smaller data.seq_len for the "
        "whole chain)"))
    seeds: list[int] | None = Field(None, description=(
        "run the whole chain once per seed (RUN_DIR/seed-S/NAME, every stage's seeds set to [S]); null = once, "
        "each stage with its own seeds"))
    reference: ReferenceSpec | None = Field(None, description=(
        "also score every saved student on this stage's held-out data against its teacher (llm_kd stages)"))

    @model_validator(mode="after")
    def _check(self) -> StagesConfig:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be a non-empty list of distinct ints (or null), got {self.seeds}")
        for i, stage in enumerate(self.stages):
            for ref in stage_references({"config": stage.config, "overrides": [self.overrides, stage.overrides]}):
                try:
                    _check_reference(ref, stage.name, names[:i], names)
                except ConfigError as exc:
                    raise ValueError(f"{exc.problem}; {exc.fix}") from None
        if self.reference is not None and self.reference.stage not in names:
            raise ValueError(f"reference.stage: no stage named {self.reference.stage!r} (stages: {', '.join(names)})")
        return self


# --------------------------------------------------------------------------------------------
# references


@dataclass(frozen=True)
class Reference:
    """One ``{stages.NAME.OUTPUT[METHOD]}`` in a stage's config."""

    text: str
    stage: str
    output: str
    method: str | None


def stage_references(data: Any) -> Iterator[Reference]:
    """Every ``{stages...}`` reference in the strings of ``data`` (nested dicts and lists)."""
    for text in _strings(data):
        for m in REFERENCE.finditer(text):
            yield Reference(m.group(0), m.group(1), m.group(2), m.group(3))
        if "{stages." in text and not REFERENCE.search(text):
            yield Reference(text, "", "", None)  # malformed: reported by _check_reference


def _strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(data, list | tuple):
        for value in data:
            yield from _strings(value)


def _check_reference(ref: Reference, here: str, earlier: list[str], names: list[str]) -> None:
    """Raise a ConfigError unless ``ref`` names an output of a stage that runs before ``here``."""
    usage = "{stages.NAME.student}, {stages.NAME.student[METHOD]} or {stages.NAME.dir}"
    if not ref.stage or ref.output not in _OUTPUTS:
        raise ConfigError(f"stage {here!r}: {ref.text!r} is not a stage reference", f"write {usage}")
    if ref.method is not None and ref.output != "student":
        raise ConfigError(f"stage {here!r}: {ref.text!r}: only .student takes [METHOD]", f"write {usage}")
    if ref.stage not in names:
        raise ConfigError(f"stage {here!r} refers to {ref.text!r}, but there is no stage named {ref.stage!r}",
                          f"use one of the earlier stages: {', '.join(earlier) or '(none: this is the first stage)'}")
    if ref.stage not in earlier:
        what = "itself" if ref.stage == here else f"stage {ref.stage!r}, which runs after it"
        raise ConfigError(f"stage {here!r} refers to {what} ({ref.text}): a stage can only use the output of an "
                          "earlier stage (a cycle or a forward reference)",
                          "reorder the stages so that every stage comes after the stages it refers to")


# --------------------------------------------------------------------------------------------
# the plan: every stage resolved and validated before anything runs


@dataclass
class PlannedStage:
    """One stage of one chain, resolved.

    Attributes:
        spec: the stage as written.
        recipe: the recipe it runs.
        seed: the chain seed (None without top-level ``seeds``).
        dir: its run folder.
        raw: its config data before references were substituted (for labels in the summary).
        config: its validated recipe config (references substituted, ``output_dir`` = ``dir``).
        fingerprint: hash of recipe, config and the previous stage's fingerprint.
    """

    spec: StageSpec
    recipe: str
    seed: int | None
    dir: Path
    raw: dict[str, Any]
    config: BaseModel
    fingerprint: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" + (f" (seed {self.seed})" if self.seed is not None else "")

    def students(self) -> dict[str, dict[int, Path]]:
        """method -> seed -> the saved student folder (``llm_kd`` with ``save_students``; else empty)."""
        if self.recipe != "llm_kd" or not getattr(self.config, "save_students", False):
            return {}
        return {m.name: {s: self.dir / slug(m.name) / f"seed-{s}" / "student" for s in self.config.seeds}
                for m in self.config.methods}

    def student_folder(self, method: str | None, user: str) -> Path:
        """The folder ``{stages.NAME.student[method]}`` stands for, or a ConfigError saying why none."""
        if self.recipe != "llm_kd":
            raise ConfigError(f"stage {user!r} uses the student of stage {self.name!r}, but that stage runs "
                              f"{self.recipe}, which saves no student folder",
                              f"refer to an llm_kd stage, or use {{stages.{self.name}.dir}} for its run folder")
        if not self.config.save_students:
            raise ConfigError(f"stage {user!r} uses the student of stage {self.name!r}, which saves none "
                              "(save_students: false)", f"set save_students: true in stage {self.name!r}")
        names = [m.name for m in self.config.methods]
        if method is None:
            students = [m.name for m in self.config.methods if m.role == "student"]
            if len(students) != 1:
                raise ConfigError(f"stage {user!r} uses {{stages.{self.name}.student}}, but stage {self.name!r} "
                                  f"trains {len(students)} methods of role student ({', '.join(students) or 'none'})",
                                  f"name one: {{stages.{self.name}.student[METHOD]}} with METHOD one of "
                                  f"{', '.join(names)}")
            method = students[0]
        if method not in names:
            raise ConfigError(f"stage {user!r}: stage {self.name!r} has no method named {method!r}",
                              f"methods of stage {self.name!r}: {', '.join(names)}")
        if len(self.config.seeds) != 1:
            raise ConfigError(f"stage {user!r} uses the student of stage {self.name!r}, which trains seeds "
                              f"{self.config.seeds}: which seed's student is meant is ambiguous",
                              "set the top-level seeds: [..] to run the whole chain once per seed, or give "
                              f"stage {self.name!r} one seed")
        return self.students()[method][self.config.seeds[0]]


def _resolve_file(path: str) -> Path:
    """A stage's ``config:`` file: a path from the working directory, else a shipped config name."""
    p = Path(path)
    if p.is_file():
        return p
    from kdforge.configs import find_recipe

    try:
        return find_recipe(path).path
    except ConfigError:
        raise ConfigError(f"stage config file not found: {path}",
                          "give a path from the working directory, or a shipped config name "
                          "(`kdforge recipes list`)") from None


def _apply(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``_set_dotted``, except that a mapping set on a mapping is merged into it key by key (so
    ``--set overrides.data.seq_len=64`` changes one key of ``data``, not the whole section)."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(value, dict) and isinstance(node, dict):
        for key, item in value.items():
            _apply(data, f"{dotted}.{key}", item)
    else:
        _set_dotted(data, dotted, copy.deepcopy(value))


def _stage_data(spec: StageSpec, common: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The stage's recipe name and config data (file or inline, then the common and its own overrides)."""
    if isinstance(spec.config, str):
        data = read_yaml(_resolve_file(spec.config))
    else:
        data = copy.deepcopy(spec.config)
    named = data.pop("recipe", None)
    if spec.recipe is not None and named is not None and named != spec.recipe:
        raise ConfigError(f"stage {spec.name!r}: recipe: {spec.recipe} but its config file says recipe: {named}",
                          "remove one of the two or make them agree")
    recipe = spec.recipe or named or "llm_kd"
    if recipe == RECIPE_NAME:
        raise ConfigError(f"stage {spec.name!r} runs the stages recipe itself", "list its stages in this chain instead")
    for dotted, value in [*(common or {}).items(), *spec.overrides.items()]:
        _apply(data, dotted, value)
    return recipe, data


def _substitute(data: Any, resolve: Callable[[Reference], str]) -> Any:
    if isinstance(data, str):
        return REFERENCE.sub(lambda m: resolve(Reference(m.group(0), m.group(1), m.group(2), m.group(3))), data)
    if isinstance(data, dict):
        return {k: _substitute(v, resolve) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute(v, resolve) for v in data]
    return data


def plan_stages(config: StagesConfig, output_dir: str | Path) -> list[list[PlannedStage]]:
    """Every chain (one per top-level seed, or one) as resolved, validated stages; nothing is written.

    Raises:
        ConfigError: a stage config that does not validate, an unknown recipe or config file, or a
            reference to an unknown stage, to the stage itself or a later one, or to a stage that
            saves no (or no unambiguous) student.
    """
    out = Path(output_dir)
    names = [s.name for s in config.stages]
    chains: list[list[PlannedStage]] = []
    for seed in (config.seeds if config.seeds is not None else [None]):
        chain: list[PlannedStage] = []
        previous = ""
        for i, spec in enumerate(config.stages):
            recipe, data = _stage_data(spec, config.overrides)
            model = load_recipe(recipe).config_model
            folder = out / (f"seed-{seed}" if seed is not None else "") / spec.name
            if seed is not None:
                if "seeds" not in model.model_fields:
                    raise ConfigError(f"stage {spec.name!r}: recipe {recipe} has no seeds key, so the top-level "
                                      "seeds cannot be applied to it", "remove the top-level seeds")
                data["seeds"] = [seed]
            if "output_dir" in model.model_fields:
                data["output_dir"] = str(folder)
            raw = copy.deepcopy(data)
            done = {p.name: p for p in chain}

            def resolve(ref: Reference, here: str = spec.name, earlier: list[str] = names[:i],
                        done: dict[str, PlannedStage] = done) -> str:
                _check_reference(ref, here, earlier, names)
                target = done[ref.stage]
                return str(target.dir if ref.output == "dir" else target.student_folder(ref.method, here))

            for ref in stage_references(data):
                _check_reference(ref, spec.name, names[:i], names)
            resolved = validate(model, _substitute(data, resolve), source=f"stage {spec.name!r} ({recipe})")
            dumped = json.dumps(config_key(resolved, exclude={"output_dir"}), sort_keys=True, default=str)
            # paths under RUN_DIR hash as <RUN_DIR>/...: a chain copied into another run folder is reused there
            key = {"recipe": recipe, "config": dumped.replace(str(out) + os.sep, _RUN_DIR + "/"), "previous": previous}
            stage = PlannedStage(spec, recipe, seed, folder, raw, resolved, fingerprint(key))
            previous = stage.fingerprint
            chain.append(stage)
        chains.append(chain)
    if config.reference is not None:
        target = next(s for s in chains[0] if s.name == config.reference.stage)
        if target.recipe != "llm_kd":
            raise ConfigError(f"reference.stage: stage {target.name!r} runs {target.recipe}, not llm_kd",
                              "name an llm_kd stage (its teacher and held-out data score every student)")
    return chains


# --------------------------------------------------------------------------------------------
# running one stage


def _stage_sub(run: RecipeRun, stage: PlannedStage) -> SubRun:
    return SubRun(run, stage.label, stage.dir, stage.fingerprint, stage.dir / STAGE_RECORD)


def _students_intact(stage: PlannedStage, record: dict[str, Any]) -> bool:
    """Whether every student the record lists still has the weights it had when the stage finished."""
    from kdforge.io import sha256_file

    for rel, sha in (record.get("students") or {}).items():
        path = stage.dir / rel
        if not path.is_file() or sha256_file(path) != sha:
            log.warning("resume: %s of %s is missing or changed; rerunning the stage", rel, stage.label)
            return False
    return (stage.dir / "results.json").is_file()


def _run_stage(run: RecipeRun, stage: PlannedStage, resume: bool) -> dict[str, Any]:
    """Reuse a finished stage (``resume``, same fingerprint, intact students) or run it."""
    import inspect

    from kdforge.io import ensure_dir, sha256_file, write_json_atomic, write_text_atomic

    sub = _stage_sub(run, stage)

    def finished() -> dict[str, Any] | None:
        record = sub.read_finished() if resume else None
        return record if record is not None and _students_intact(stage, record) else None

    if run.decide(finished) is not None:
        log.info("resume: %s finished earlier (%s); not rerun", stage.label, stage.dir)
        return json.loads((stage.dir / "results.json").read_text(encoding="utf-8"))
    if run.main:
        marker = stage.dir / FINGERPRINT_FILE
        old = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
        if stage.dir.exists() and old != stage.fingerprint:
            log.info("%s: its config or an earlier stage changed; starting it over in an empty %s",
                     stage.label, stage.dir)
            shutil.rmtree(stage.dir)
        ensure_dir(stage.dir)
        sub.record.unlink(missing_ok=True)
        write_text_atomic(marker, stage.fingerprint + "\n")
    run.barrier()
    recipe = load_recipe(stage.recipe)()
    log.info("%s: running %s into %s", stage.label, stage.recipe, stage.dir)
    kwargs = {"resume": resume} if "resume" in inspect.signature(recipe.run).parameters else {}
    results = recipe.run(stage.config, stage.dir, **kwargs)
    if run.main:
        students = {}
        for per_seed in stage.students().values():
            for folder in per_seed.values():
                weights = folder / "model.safetensors"
                if weights.is_file():
                    students[str(weights.relative_to(stage.dir))] = sha256_file(weights)
        write_json_atomic(sub.record, {"fingerprint": stage.fingerprint, "stage": stage.name,
                                       "recipe": stage.recipe, "seed": stage.seed, "students": students})
    run.barrier()
    return results


# --------------------------------------------------------------------------------------------
# the reference evaluation (llm_kd stages)


def _reference_scores(chain: list[PlannedStage], ref: ReferenceSpec) -> dict[tuple[str, str, int], dict[str, float]]:
    """``(stage, method, seed) -> {ref_perplexity, ref_agreement, ref_kl_to_teacher}`` of every saved
    student of the chain, scored on the reference stage's held-out data against its teacher."""
    from kdforge.eval.lm import evaluate_language_models
    from kdforge.models import ModelSource, load_causal_lm
    from kdforge.recipes.llm_kd import check_inputs

    target = next(s for s in chain if s.name == ref.stage)
    _, data = check_inputs(target.config)
    teacher = load_causal_lm(target.config.teacher, what="reference teacher").requires_grad_(False).eval()
    width = int(teacher.get_output_embeddings().weight.shape[0])
    models: dict[str, torch.nn.Module] = {"reference": teacher}
    keys: dict[str, tuple[str, str, int]] = {}
    for stage in chain:
        for method, per_seed in stage.students().items():
            for seed, folder in per_seed.items():
                if (folder / "config.json").is_file():
                    name = f"{stage.name}|{method}|{seed}"
                    keys[name] = (stage.name, method, seed)
                    models[name] = load_causal_lm(ModelSource(model=str(folder), dtype="float32", device="cpu"),
                                                  what=f"student of stage {stage.name!r}").eval()
    vocab = min(int(m.get_output_embeddings().weight.shape[0]) for m in models.values())
    # one pass: the reference teacher's logits are computed once per batch for every student
    got = evaluate_language_models(models, data.eval_batches(ref.batch_size), teacher="reference",
                                   vocab_size=vocab if vocab != width else None)
    scores: dict[tuple[str, str, int], dict[str, float]] = {}
    for name, key in keys.items():
        m = got[name]["metrics"]
        scores[key] = {"ref_perplexity": float(m["perplexity"]), "ref_agreement": float(m["agreement"]),
                       "ref_kl_to_teacher": float(m["kl_to_teacher"])}
    return scores


# --------------------------------------------------------------------------------------------
# the summary


_SHOWN = ("perplexity", "accuracy", "agreement", "kl_to_teacher", "ref_perplexity", "ref_agreement",
          "ref_kl_to_teacher")


@dataclass
class _Row:
    stage: str
    recipe: str
    name: str
    role: str
    teacher: str
    params: int | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per seed: {"seed", metric: value}


def _teacher_label(stage: PlannedStage) -> str:
    teacher = stage.raw.get("teacher")
    if isinstance(teacher, dict) and "model" in teacher:
        return str(teacher["model"])
    if isinstance(teacher, str):
        return teacher
    return "(recipe default)" if stage.recipe == "llm_kd" else "(the recipe's)"


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not k.endswith("_std")}


def _collect(rows: dict[tuple[str, str], _Row], stage: PlannedStage, results: dict[str, Any],
             ref: dict[tuple[str, str, int], dict[str, float]]) -> None:
    """Add one stage run's result rows (one chain seed) to the summary rows."""
    method_of = ({f"student / {m.name}": m.name for m in stage.config.methods}
                 if stage.recipe == "llm_kd" else {})
    for model in results.get("models", []):
        name = str(model.get("name") or model.get("method") or "?")
        row = rows.setdefault((stage.name, name), _Row(stage.name, stage.recipe, name, str(model.get("role", "")),
                                                       _teacher_label(stage), model.get("params")))
        if stage.seed is None and model.get("per_seed"):  # the stage's own seeds
            samples = [(p.get("seed"), p) for p in model["per_seed"]]
        else:
            samples = [(stage.seed, model.get("metrics") or {})]
        for seed, metrics in samples:
            extra = ref.get((stage.name, method_of[name], seed), {}) if name in method_of and seed is not None else {}
            row.samples.append({"seed": seed, **_numbers(metrics), **extra})


def _summary(rows: dict[tuple[str, str], _Row], config: StagesConfig, chains: list[list[PlannedStage]]
             ) -> dict[str, Any]:
    """``results.json``: one model per (stage, model) in the run-format layout (``docs/run-format.md``:
    name, role, metrics as mean with ``_std`` over seeds, per_seed), plus the stage and its teacher."""
    models = []
    for row in rows.values():
        metrics: dict[str, float] = {}
        for k in dict.fromkeys(k for sample in row.samples for k in sample if k != "seed"):
            finite = [x[k] for x in row.samples if k in x and math.isfinite(x[k])]
            if finite:
                metrics[k] = statistics.fmean(finite)
                if len(finite) > 1:
                    metrics[f"{k}_std"] = statistics.stdev(finite)
        models.append({"name": f"{row.stage} / {row.name}", "role": row.role, "stage": row.stage,
                       "recipe": row.recipe, "model": row.name, "teacher": row.teacher,
                       **({"params": row.params} if row.params is not None else {}),
                       "metrics": metrics, "per_seed": row.samples})
    recipes = {s.recipe for s in chains[0]}
    primary = "perplexity" if recipes == {"llm_kd"} else ("accuracy" if recipes == {"fashion_mnist_kd"} else None)
    return {"recipe": RECIPE_NAME, "primary_metric": primary, "higher_is_better": primary == "accuracy",
            "stages": [s.name for s in config.stages], "seeds": config.seeds,
            "reference": config.reference.model_dump() if config.reference else None, "models": models}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary table: one row per (stage, model), metrics as mean ± std over seeds."""
    shown = [k for k in _SHOWN if any(k in r["metrics"] for r in summary["models"])]
    heads = {"perplexity": "held-out ppl", "accuracy": "accuracy", "agreement": "agreement (own teacher)",
             "kl_to_teacher": "KL(own teacher‖model)", "ref_perplexity": "ppl (reference data)",
             "ref_agreement": "agreement (reference teacher)", "ref_kl_to_teacher": "KL(reference teacher‖model)"}
    seeds = summary.get("seeds")
    lines = [f"# stages results ({'chain seeds ' + str(seeds) if seeds else 'one chain'})", ""]
    if summary.get("reference"):
        lines += [f"Reference: every saved student scored on stage {summary['reference']['stage']!r}'s held-out "
                  "data against its teacher.", ""]
    lines += ["| stage | model | role | teacher | " + " | ".join(heads[k] for k in shown) + " |",
              "|" + "---|" * (4 + len(shown))]
    for r in summary["models"]:
        cells = []
        for k in shown:
            v, s = r["metrics"].get(k), r["metrics"].get(f"{k}_std")
            digits = ".1f" if "perplexity" in k else ".3f"
            cells.append("–" if v is None else format(v, digits) + (f" ± {format(s, digits)}" if s is not None else ""))
        lines.append(f"| {r['stage']} | {r['model']} | {r['role']} | {r['teacher']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the recipe


@RECIPES.register(RECIPE_NAME, "chain recipe runs (teacher assistant, progressively smaller or general -> task "
                               "students): each stage's saved student feeds the next; resume per stage")
class Stages(Recipe):
    """See the module docstring."""

    config_model = StagesConfig

    def check(self, config: StagesConfig, output_dir: Path) -> list[Any]:
        """The plan's errors, plus each first-chain stage's own pre-flight checks for stages that
        use no earlier stage's output (the others' inputs do not exist before the run)."""
        from kdforge.preflight import Problem

        try:
            chains = plan_stages(config, output_dir)
        except ConfigError as exc:
            return [Problem("stages", exc.problem, exc.fix)]
        problems: list[Any] = []
        for stage in chains[0]:
            if any(True for _ in stage_references(stage.raw)):
                continue
            for p in load_recipe(stage.recipe)().check(stage.config, stage.dir):
                problems.append(Problem(f"stages.{stage.name}.{p.key}", p.problem, p.fix))
        return problems

    def estimate(self, config: StagesConfig, output_dir: Path) -> Any:
        return None

    def probe(self, config: StagesConfig) -> float | None:
        return None

    def run(self, config: StagesConfig, output_dir: Path, *, resume: bool = False) -> dict[str, Any]:
        """Run every chain's stages in order (see the module docstring); return the summary."""
        chains = plan_stages(config, output_dir)  # every reference and stage config checked first
        run = RecipeRun.start(RECIPE_NAME, config, output_dir, record_output_dir=True)
        rows: dict[tuple[str, str], _Row] = {}
        for chain in chains:
            done = [(stage, _run_stage(run, stage, resume)) for stage in chain]
            if not run.main:
                continue
            ref = _reference_scores(chain, config.reference) if config.reference is not None else {}
            for stage, results in done:
                _collect(rows, stage, results, ref)
        if not run.main:
            return run.wait_for_results()
        summary = _summary(rows, config, chains)
        table = summary_markdown(summary)
        run.publish(summary, table)
        log.info("stages results (%s):\n%s", run.out, table)
        return summary
