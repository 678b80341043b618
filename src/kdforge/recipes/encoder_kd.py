"""Recipe ``encoder_kd``: distil a sentence encoder (all-mpnet-base-v2 -> a cut all-MiniLM-L6-v2).

``kdforge run configs/encoder_kd.yaml``:

1. the **teacher** (a sentence encoder: asset, folder or Hub id) embeds the training and held-out
   sentences once (``RUN_DIR/teacher/embeddings.safetensors``, reused under the same fingerprint);
2. every **method** (a list of weighted embedding losses: ``embedding_mse``, ``embedding_cosine``,
   ``similarity_kd``; :mod:`kdforge.losses.embedding`) trains the same **student** (an encoder cut to
   ``student.layers``, with a linear projection into the teacher's width when ``projection``) on the
   same batches per seed through the :class:`~kdforge.train.Distiller`
   (:class:`~kdforge.train.SentenceEmbeddingTask`);
3. every student, the **untrained** student (``baseline: true``) and optional ``references``
   (e.g. the full all-MiniLM-L6-v2) are scored on the held-out sentences against the teacher
   (:mod:`kdforge.eval.embeddings`): similarity agreement (Spearman of pairwise cosines), top-1
   neighbour agreement and recall@10, and a k-NN probe of the labels (Rotten Tomatoes
   fresh/rotten) from the labelled training sentences.

Results: ``results.json`` / ``results.md`` (mean ± std over seeds), trained students as
``students/<method>/seed-N/model.safetensors``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from kdforge.config import StrictModel
from kdforge.data.sources import DataSpec
from kdforge.models import ModelSource
from kdforge.recipes import RECIPES, Recipe
from kdforge.train.objective import LossTerm

log = logging.getLogger(__name__)

__all__ = ["EncoderKDConfig", "EncoderKDRecipe"]

RECIPE_NAME = "encoder_kd"


class EncoderSource(ModelSource):
    """A sentence encoder (asset ``all-mpnet-base-v2`` / ``all-minilm-l6-v2``, folder or Hub id)."""

    model: str = "all-mpnet-base-v2"


class StudentEncoder(EncoderSource):
    model: str = "all-minilm-l6-v2"
    layers: list[int] | None = Field([0, 2, 4], description="encoder layers to keep (null = all)")
    projection: bool = Field(True, description="a linear projection into the teacher's width (needed by "
                                               "embedding_mse/embedding_cosine when the widths differ)")


class EncoderData(StrictModel):
    """Sentences (``data.spec``: the data layer, e.g. the rotten-tomatoes preset) and their labels."""

    spec: DataSpec = Field(default_factory=lambda: DataSpec(path="rotten-tomatoes", split="train", eval_split="test",
                                                            limit=4000))
    eval_limit: int | None = Field(1000, ge=3, description="held-out sentences scored (null = all)")
    label_field: str | None = Field("label", description="labels for the k-NN probe (null = no probe)")
    max_length: int = Field(64, ge=4, description="tokens per sentence")


class EncoderTrain(StrictModel):
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)


class EncoderMethod(StrictModel):
    name: str
    terms: list[LossTerm] = Field(..., min_length=1)


class EncoderEval(StrictModel):
    knn: int = Field(10, ge=1)
    recall_k: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)


class EncoderKDConfig(StrictModel):
    """Config of the ``encoder_kd`` recipe (``configs/encoder_kd.yaml``)."""

    teacher: EncoderSource = Field(default_factory=EncoderSource)
    student: StudentEncoder = Field(default_factory=StudentEncoder)
    data: EncoderData = Field(default_factory=EncoderData)
    train: EncoderTrain = Field(default_factory=EncoderTrain)
    methods: list[EncoderMethod] = Field(default_factory=lambda: [
        EncoderMethod(name="embedding MSE", terms=[LossTerm("embedding_mse", 1.0)])], min_length=1)
    baseline: bool = Field(True, description="also score the untrained (cut) student")
    references: list[str] = Field(default_factory=list, description="other encoders scored as they are")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    eval: EncoderEval = Field(default_factory=EncoderEval)
    output_dir: str = "outputs/encoder_kd"

    @model_validator(mode="after")
    def _unique(self) -> EncoderKDConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError("method names must be unique")
        return self


def _texts_labels(rows: Any, config: EncoderKDConfig, limit: int | None) -> tuple[list[str], torch.Tensor | None]:
    from kdforge.errors import DataError

    field = config.data.spec.text_field
    if field not in rows.column_names:
        raise DataError(f"the data has no text field {field!r} (columns: {', '.join(rows.column_names)})",
                        "set data.spec.text_field to the column holding the sentences")
    rows = rows.select(range(min(limit, len(rows)))) if limit is not None else rows
    texts = [str(t) for t in rows[field]]
    label_field = config.data.label_field
    if label_field is None or label_field not in rows.column_names:
        return texts, None
    names = sorted({str(v) for v in rows[label_field]})
    return texts, torch.tensor([names.index(str(v)) for v in rows[label_field]])


def _score(emb: torch.Tensor, ref_emb: torch.Tensor | None, teacher_eval: torch.Tensor, data: Mapping[str, Any],
           config: EncoderKDConfig) -> dict[str, float]:
    from kdforge.eval.embeddings import knn_accuracy, neighbour_agreement, similarity_agreement

    out = {"similarity_spearman": similarity_agreement(emb, teacher_eval)}
    if emb.shape == teacher_eval.shape:  # same space (a projected student): how close each vector is
        out["cosine_to_teacher"] = float(torch.nn.functional.cosine_similarity(emb, teacher_eval, dim=-1).mean())
    nn_ = neighbour_agreement(emb, teacher_eval, k=config.eval.recall_k)
    out |= {"neighbour_top1": nn_["top1"], f"recall_at_{config.eval.recall_k}": nn_["recall_at_k"]}
    if ref_emb is not None and data["train_labels"] is not None and data["eval_labels"] is not None:
        out["knn_accuracy"] = knn_accuracy(ref_emb, data["train_labels"], emb, data["eval_labels"], k=config.eval.knn)
    return out


def teacher_embeddings(run: Any, teacher: EncoderSource, parts: Mapping[str, list[str]], *, batch_size: int,
                       max_length: int) -> dict[str, torch.Tensor]:
    """The teacher's embeddings of each named list of texts (``{name: [N_name, D]}``), computed once
    per run: a sub-run ``teacher/`` keyed by the teacher, ``max_length`` and the texts, reused when
    they match (``encoder_kd`` and ``ranker_kd``)."""
    from safetensors.torch import load_file, save

    from kdforge.io import write_bytes_atomic
    from kdforge.recipes.subrun import config_key
    from kdforge.students.encoder import encode, load_sentence_encoder

    sub = run.subrun("the teacher's embeddings", "teacher", {
        "teacher": config_key(teacher), "max_length": max_length, **parts},
        length=16, record="teacher.json")
    if sub.reuse() is not None:
        return load_file(sub.dir / "embeddings.safetensors")
    sub.prepare(resume=False)
    model, tok = load_sentence_encoder(teacher, what="teacher")
    t0 = time.perf_counter()
    texts = [t for part in parts.values() for t in part]
    emb = encode(model, tok, texts, batch_size=batch_size, max_length=max_length)
    seconds = time.perf_counter() - t0
    out, start = {}, 0
    for name, part in parts.items():
        out[name] = emb[start:start + len(part)].contiguous()
        start += len(part)
    if run.main:
        write_bytes_atomic(sub.dir / "embeddings.safetensors", save(out))
        sub.finish({"texts": len(texts), "dim": int(emb.shape[1]), "seconds": seconds},
                   weights="embeddings.safetensors")
    run.barrier()
    log.info("teacher embedded %d texts in %.1f s", len(texts), seconds)
    return out


def _collate(tokenizer: Any, max_length: int) -> Any:
    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer([it["text"] for it in items], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "teacher_embeddings": torch.stack([it["teacher_embeddings"] for it in items])}

    return collate


@RECIPES.register(RECIPE_NAME, "sentence-encoder distillation (all-mpnet-base-v2 -> cut MiniLM): similarity, "
                  "retrieval and k-NN agreement over seeds")
class EncoderKDRecipe(Recipe):
    """See the module docstring."""

    config_model = EncoderKDConfig

    def check(self, config: EncoderKDConfig, output_dir: Path) -> list[Any]:
        from kdforge.preflight.checks import check_objective, check_output_dir
        from kdforge.preflight.problems import Problems

        problems = Problems()
        for i, m in enumerate(config.methods):
            check_objective(problems, f"methods.{i}.terms", m.terms, teacher="dense", vocab_size=8)
        check_output_dir(problems, "output_dir", output_dir)
        return problems.items

    def run(self, config: EncoderKDConfig, output_dir: Path) -> dict[str, Any]:
        from kdforge.data.sources import load
        from kdforge.recipes.subrun import RecipeRun

        started = time.perf_counter()
        run = RecipeRun.start(RECIPE_NAME, config, output_dir)
        splits = load(config.data.spec)
        if "eval" not in splits:
            from kdforge.errors import ConfigError

            raise ConfigError("encoder_kd needs held-out sentences", "set data.spec.eval_split, eval_fraction or "
                              "eval_files")
        train_texts, train_labels = _texts_labels(splits["train"], config, None)
        eval_texts, eval_labels = _texts_labels(splits["eval"], config, config.data.eval_limit)
        data = {"train_texts": train_texts, "train_labels": train_labels, "eval_texts": eval_texts,
                "eval_labels": eval_labels}
        teacher_train, teacher_eval = self._teacher(run, config, data)
        rows: list[dict[str, Any]] = [{"name": "teacher", "role": "teacher", "model": config.teacher.model,
                                       "metrics": {"cosine_to_teacher": 1.0, "similarity_spearman": 1.0,
                                                   "neighbour_top1": 1.0}}]
        probe = data["train_labels"] is not None
        if probe:
            rows[0]["metrics"]["knn_accuracy"] = _score(teacher_eval, teacher_train, teacher_eval, data,
                                                        config)["knn_accuracy"]
        for name in (["student before distillation"] if config.baseline else []) + list(config.references):
            rows.append(self._reference(config, data, teacher_eval, name))
        for method in config.methods:
            per_seed = [self._student(run, config, method, seed, data, teacher_train, teacher_eval)
                        for seed in config.seeds]
            rows.append(_summary(method.name, "student", per_seed))
        results = {"recipe": RECIPE_NAME, "teacher": config.teacher.model, "student": config.student.model,
                   "student_layers": config.student.layers, "train_sentences": len(train_texts),
                   "eval_sentences": len(eval_texts), "seeds": list(config.seeds), "models": rows,
                   "seconds": time.perf_counter() - started}
        from rich.console import Console

        markdown = results_markdown(results)
        run.publish(results, markdown)
        Console().print(markdown, markup=False, highlight=False)
        return results

    # -- teacher ------------------------------------------------------------------------------
    @staticmethod
    def _teacher(run: Any, config: EncoderKDConfig, data: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's embeddings of the training and held-out sentences, computed once."""
        emb = teacher_embeddings(run, config.teacher, {"train": data["train_texts"], "eval": data["eval_texts"]},
                                 batch_size=config.eval.batch_size, max_length=config.data.max_length)
        return emb["train"], emb["eval"]

    # -- references (no training) --------------------------------------------------------------
    @staticmethod
    def _reference(config: EncoderKDConfig, data: Mapping[str, Any], teacher_eval: torch.Tensor,
                   name: str) -> dict[str, Any]:
        from kdforge.students.encoder import encode, load_sentence_encoder

        if name == "student before distillation":  # the cut student in its own space (no projection)
            source, layers = config.student, config.student.layers
        else:
            source, layers = EncoderSource(model=name), None
        model, tok = load_sentence_encoder(source, layers=layers, what=name)
        emb = encode(model, tok, data["eval_texts"], batch_size=config.eval.batch_size,
                     max_length=config.data.max_length)
        ref = (encode(model, tok, data["train_texts"], batch_size=config.eval.batch_size,
                      max_length=config.data.max_length) if data["train_labels"] is not None else None)
        params = sum(p.numel() for p in model.parameters())
        return {"name": name, "role": "reference", "model": source.model, "params": params,
                "metrics": _score(emb, ref, teacher_eval, data, config)}

    # -- one student ---------------------------------------------------------------------------
    @staticmethod
    def _student(run: Any, config: EncoderKDConfig, method: EncoderMethod, seed: int, data: Mapping[str, Any],
                 teacher_train: torch.Tensor, teacher_eval: torch.Tensor) -> dict[str, Any]:
        from kdforge.recipes.subrun import config_key, copy_of, slug, train_student
        from kdforge.students.encoder import encode, load_sentence_encoder
        from kdforge.train import Distiller, Objective, SentenceEmbeddingTask, TrainConfig

        sub = run.subrun(f"{method.name!r}, seed {seed}", Path("students") / slug(method.name) / f"seed-{seed}", {
            "student": config_key(config.student), "train": config_key(config.train),
            "method": config_key(method), "seed": seed, "teacher": config_key(config.teacher),
            "data": [len(data["train_texts"]), len(data["eval_texts"]), config_key(config.data)],
        }, length=16, record="result.json")
        cached = sub.reuse()
        if cached is not None:
            return cached
        sub.prepare(resume=False)
        torch.manual_seed(seed)
        dim = int(teacher_train.shape[1])
        model, tok = load_sentence_encoder(config.student, layers=config.student.layers,
                                           projection_dim=dim if config.student.projection else None, what="student")
        dataset = [{"text": t, "teacher_embeddings": e} for t, e in zip(data["train_texts"], teacher_train)]
        tr = config.train
        steps = max(1, int(len(dataset) / tr.batch_size * tr.epochs))
        train_cfg = TrainConfig(max_steps=steps, batch_size=tr.batch_size, lr=tr.lr, weight_decay=tr.weight_decay,
                                scheduler="linear", warmup_steps=int(tr.warmup_ratio * steps), max_grad_norm=1.0,
                                seed=seed, log_every=max(1, steps // 10), output_dir=str(sub.dir), progress=False)
        distiller = Distiller(model, None, task=SentenceEmbeddingTask(), objective=Objective(method.terms),
                              config=train_cfg, train_data=dataset, collate_fn=_collate(tok, config.data.max_length))
        trained = train_student(distiller, resume=False, empty=copy_of(model))
        student = trained.model
        emb = encode(student, tok, data["eval_texts"], batch_size=config.eval.batch_size,
                     max_length=config.data.max_length)
        ref = (encode(student, tok, data["train_texts"], batch_size=config.eval.batch_size,
                      max_length=config.data.max_length) if data["train_labels"] is not None else None)
        metrics = _score(emb, ref, teacher_eval, data, config)
        log.info("%s seed %d: %s", method.name, seed, metrics)
        result = None
        if run.main:
            result = sub.finish({"method": method.name, "seed": seed, "steps": trained.state.step,
                                 "train_seconds": trained.seconds, "params": sum(p.numel() for p in student.parameters()),
                                 "metrics": metrics}, weights="model.safetensors", model=student)
        run.barrier()
        return result if result is not None else sub.read_finished()


def _summary(name: str, role: str, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    keys = list(per_seed[0]["metrics"])
    metrics: dict[str, float] = {}
    for k in keys:
        vals = [r["metrics"][k] for r in per_seed]
        metrics[k] = statistics.fmean(vals)
        metrics[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"name": name, "role": role, "params": per_seed[0]["params"], "metrics": metrics,
            "per_seed": [{"seed": r["seed"], **r["metrics"]} for r in per_seed],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in per_seed)}


def results_markdown(results: Mapping[str, Any]) -> str:
    cols = [("cosine_to_teacher", "cosine to teacher"), ("similarity_spearman", "similarity ρ"),
            ("neighbour_top1", "top-1 neighbour"),
            ("recall_at_10", "recall@10"), ("knn_accuracy", "k-NN accuracy %")]
    present = [(k, h) for k, h in cols if any(k in m["metrics"] for m in results["models"])]
    lines = [f"# encoder_kd: {results['teacher']} -> {results['student']} layers {results['student_layers']} "
             f"({results['train_sentences']} training, {results['eval_sentences']} held-out sentences, "
             f"seeds {results['seeds']})", "",
             "| model | params | " + " | ".join(h for _, h in present) + " |",
             "|---|---|" + "---|" * len(present)]
    for m in results["models"]:
        cells = []
        for k, _ in present:
            v = m["metrics"].get(k)
            scale = 100.0 if k == "knn_accuracy" else 1.0
            std = m["metrics"].get(f"{k}_std")
            cells.append("–" if v is None else f"{v * scale:.3f}" + (f" ± {std * scale:.3f}" if std is not None else ""))
        lines.append(f"| {m['name']} | {m.get('params', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
