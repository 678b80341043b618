"""Recipe ``ranker_kd``: distil a bi-encoder ranker with Margin-MSE (all-mpnet-base-v2 -> cut MiniLM).

``kdforge run configs/ranker_kd.yaml``:

1. **data** (:mod:`kdforge.data.ranking`): (query, positive) = neighbouring sentences of a paragraph
   of the documents (default: Austen's novels, Persuasion held out); ``train_queries`` training and
   ``eval_queries`` held-out pairs are drawn once;
2. the **teacher** (a sentence encoder) embeds every query and positive once
   (``RUN_DIR/teacher/embeddings.safetensors``); each training query gets ``negatives.count``
   negatives from the other training positives, mined from the teacher's top ``negatives.top``
   (hard) or at random, and the teacher's scores of its positive and negatives (dot or cosine);
3. every **method** trains the same cut **student** on the same groups per seed through the
   :class:`~kdforge.train.Distiller` (:class:`~kdforge.train.RankingTask`): ``signal: scores`` for
   score losses (``margin_mse``), ``signal: embeddings`` for embedding losses (``similarity_kd``
   over the group texts of the batch);
4. the teacher, the untrained student (``baseline``), ``references`` and every student rank the
   held-out positives for each held-out query (:mod:`kdforge.eval.retrieval`): MRR@10, nDCG@10,
   recall@k against the true next sentence, and how often the student's top passage is the
   teacher's.

Results: ``results.json`` / ``results.md`` (mean ± std over seeds), students as
``students/<method>/seed-N/model.safetensors``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kdforge.config import StrictModel
from kdforge.recipes import RECIPES, Recipe
from kdforge.recipes.encoder_kd import EncoderSource, EncoderTrain, teacher_embeddings
from kdforge.train.objective import LossTerm

log = logging.getLogger(__name__)

__all__ = ["RankerKDConfig", "RankerKDRecipe"]

RECIPE_NAME = "ranker_kd"


class RankerStudent(EncoderSource):
    model: str = "all-minilm-l6-v2"
    layers: list[int] | None = Field([0, 2, 4], description="encoder layers to keep (null = all)")
    projection: bool = Field(False, description="a linear projection into the teacher's width (score and "
                                                "similarity losses do not need one)")


class RankerData(StrictModel):
    """Documents whose neighbouring sentences make the (query, positive) pairs."""

    path: str = Field("austen", description="preset (austen), a .txt file, glob or folder; one document per file")
    eval_documents: list[str] = Field(default_factory=lambda: ["persuasion"], min_length=1,
                                      description="documents (file stems) whose pairs are held out")
    train_queries: int | None = Field(1500, ge=2, description="training pairs drawn (null = all)")
    eval_queries: int | None = Field(400, ge=2, description="held-out pairs drawn (null = all); their positives "
                                                            "are the candidate pool")
    min_chars: int = Field(40, ge=1, description="shortest sentence kept")
    max_chars: int = Field(200, ge=1, description="longest sentence kept")
    max_length: int = Field(48, ge=4, description="tokens per sentence")
    seed: int = Field(0, description="which pairs are drawn")


class RankerNegatives(StrictModel):
    kind: Literal["teacher", "random"] = Field("teacher", description="teacher: drawn from the teacher's top "
                                                                      "passages (hard); random: uniformly")
    count: int = Field(1, ge=1, description="negatives per query (1: the paper's triples)")
    top: int = Field(30, ge=1, description="teacher-mined negatives come from the teacher's top `top`")


class RankerMethod(StrictModel):
    name: str
    signal: Literal["scores", "embeddings"] = Field("scores", description="what the terms compare: the group's "
                                                    "scores [B, 1+k] or its texts' embeddings [B*(2+k), D]")
    terms: list[LossTerm] = Field(..., min_length=1)


class RankerEval(StrictModel):
    cutoff: int = Field(10, ge=1, description="MRR@cutoff and nDCG@cutoff")
    recall_k: list[int] = Field(default_factory=lambda: [1, 10], min_length=1)
    batch_size: int = Field(64, ge=1)


class RankerKDConfig(StrictModel):
    """Config of the ``ranker_kd`` recipe (``configs/ranker_kd.yaml``)."""

    teacher: EncoderSource = Field(default_factory=EncoderSource)
    student: RankerStudent = Field(default_factory=RankerStudent)
    data: RankerData = Field(default_factory=RankerData)
    negatives: RankerNegatives = Field(default_factory=RankerNegatives)
    score: Literal["dot", "cosine"] = Field("dot", description="query-passage score of both bi-encoders")
    train: EncoderTrain = Field(default_factory=EncoderTrain)
    methods: list[RankerMethod] = Field(default_factory=lambda: [
        RankerMethod(name="Margin-MSE", terms=[LossTerm("margin_mse", 1.0)])], min_length=1)
    baseline: bool = Field(True, description="also score the untrained (cut) student")
    references: list[str] = Field(default_factory=list, description="other encoders scored as they are")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    eval: RankerEval = Field(default_factory=RankerEval)
    output_dir: str = "outputs/ranker_kd"

    @model_validator(mode="after")
    def _check(self) -> RankerKDConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError("method names must be unique")
        if self.data.max_chars < self.data.min_chars:
            raise ValueError("data.max_chars must be >= data.min_chars")
        coordinates = {"embedding_mse", "embedding_cosine"}
        for m in self.methods:
            if not self.student.projection and any(t.name in coordinates for t in m.terms):
                raise ValueError(f"method {m.name!r}: embedding_mse/embedding_cosine compare coordinates with the "
                                 "teacher's: set student.projection: true (or use similarity_kd / margin_mse)")
            if m.signal == "scores" and any(t.name in coordinates | {"similarity_kd"} for t in m.terms):
                raise ValueError(f"method {m.name!r}: embedding losses need signal: embeddings")
            if m.signal == "embeddings" and any(t.name == "margin_mse" for t in m.terms):
                raise ValueError(f"method {m.name!r}: margin_mse compares scores: use signal: scores")
        return self


# -- data ---------------------------------------------------------------------------------------
def _pairs(config: RankerKDConfig) -> dict[str, list[Any]]:
    from kdforge.data.ranking import neighbour_pairs, sample_pairs
    from kdforge.data.text import load_documents
    from kdforge.errors import ConfigError

    docs = load_documents(config.data.path, unwrap=True)
    held = set(config.data.eval_documents)
    missing = sorted(held - set(docs))
    if missing:
        raise ConfigError(f"data.eval_documents names {', '.join(missing)}, not documents of {config.data.path}",
                          f"choose among: {', '.join(sorted(docs))}")
    if held == set(docs):
        raise ConfigError("every document is held out: nothing left to train on", "hold out fewer eval_documents")
    d = config.data
    split = {"train": {k: v for k, v in docs.items() if k not in held}, "eval": {k: docs[k] for k in sorted(held)}}
    out = {}
    for name, n in (("train", d.train_queries), ("eval", d.eval_queries)):
        pairs = neighbour_pairs(split[name], min_chars=d.min_chars, max_chars=d.max_chars)
        if len(pairs) < 2:
            raise ConfigError(f"the {name} documents give {len(pairs)} sentence pairs",
                              "use longer documents or widen data.min_chars/max_chars")
        out[name] = sample_pairs(pairs, n, seed=d.seed)
    return out


def _scores(queries: torch.Tensor, passages: torch.Tensor, config: RankerKDConfig) -> torch.Tensor:
    """``[Q, N]`` scores (``config.score``) of every query against every passage, float64."""
    from kdforge.eval.retrieval import cosine_scores

    return cosine_scores(queries, passages) if config.score == "cosine" else queries.double() @ passages.double().T


def _score(queries: torch.Tensor, passages: torch.Tensor, teacher_top: torch.Tensor | None,
           config: RankerKDConfig) -> dict[str, float]:
    """Retrieval of each held-out query's positive (row i of ``passages``) among all of them."""
    from kdforge.eval.retrieval import retrieval_metrics

    scores = _scores(queries, passages, config)
    out = retrieval_metrics(scores, torch.arange(len(queries)), ks=config.eval.recall_k, cutoff=config.eval.cutoff)
    if teacher_top is not None:
        out["teacher_top1"] = float((scores.argmax(1) == teacher_top).double().mean())
    return out


@RECIPES.register(RECIPE_NAME, "ranker distillation (Margin-MSE, all-mpnet-base-v2 -> cut MiniLM): next-sentence "
                  "retrieval MRR/nDCG/recall over seeds")
class RankerKDRecipe(Recipe):
    """See the module docstring."""

    config_model = RankerKDConfig

    def check(self, config: RankerKDConfig, output_dir: Path) -> list[Any]:
        from kdforge.preflight.checks import check_objective, check_output_dir
        from kdforge.preflight.problems import Problems

        problems = Problems()
        for i, m in enumerate(config.methods):
            check_objective(problems, f"methods.{i}.terms", m.terms, teacher="dense", vocab_size=8)
        check_output_dir(problems, "output_dir", output_dir)
        return problems.items

    def run(self, config: RankerKDConfig, output_dir: Path) -> dict[str, Any]:
        from kdforge.recipes.subrun import RecipeRun

        started = time.perf_counter()
        run = RecipeRun.start(RECIPE_NAME, config, output_dir)
        pairs = _pairs(config)
        teacher = self._teacher(run, config, pairs)
        data = self._groups(config, pairs, teacher)
        teacher_scores = _score(teacher["eval_q"], teacher["eval_p"], None, config)
        teacher_top = _scores(teacher["eval_q"], teacher["eval_p"], config).argmax(1)
        rows: list[dict[str, Any]] = [{"name": "teacher", "role": "teacher", "model": config.teacher.model,
                                       "metrics": {**teacher_scores, "teacher_top1": 1.0}}]
        for name in (["student before distillation"] if config.baseline else []) + list(config.references):
            rows.append(self._reference(config, pairs, teacher_top, name))
        for method in config.methods:
            per_seed = [self._student(run, config, method, seed, pairs, data, teacher_top) for seed in config.seeds]
            rows.append(_summary(method.name, per_seed))
        results = {"recipe": RECIPE_NAME, "teacher": config.teacher.model, "student": config.student.model,
                   "student_layers": config.student.layers, "train_queries": len(pairs["train"]),
                   "eval_queries": len(pairs["eval"]), "negatives": config.negatives.model_dump(mode="json"),
                   "seeds": list(config.seeds), "models": rows, "seconds": time.perf_counter() - started}
        from rich.console import Console

        markdown = results_markdown(results)
        run.publish(results, markdown)
        Console().print(markdown, markup=False, highlight=False)
        return results

    # -- teacher ------------------------------------------------------------------------------
    @staticmethod
    def _teacher(run: Any, config: RankerKDConfig, pairs: Mapping[str, list[Any]]) -> dict[str, torch.Tensor]:
        """The teacher's embeddings of every training/held-out query and positive, computed once."""
        parts = {"train_q": [p.query for p in pairs["train"]], "train_p": [p.positive for p in pairs["train"]],
                 "eval_q": [p.query for p in pairs["eval"]], "eval_p": [p.positive for p in pairs["eval"]]}
        return teacher_embeddings(run, config.teacher, parts, batch_size=config.eval.batch_size,
                                  max_length=config.data.max_length)

    @staticmethod
    def _groups(config: RankerKDConfig, pairs: Mapping[str, list[Any]], teacher: Mapping[str, torch.Tensor]
                ) -> list[dict[str, Any]]:
        """Training groups (query, positive, negatives) with the teacher's scores and embeddings."""
        from kdforge.data.ranking import mine_negatives
        from kdforge.losses.ranking import pair_scores

        tq, tp = teacher["train_q"].float(), teacher["train_p"].float()
        n = len(pairs["train"])
        if config.negatives.kind == "teacher":  # every query against every training positive, [n, n]
            unit = torch.nn.functional.normalize
            pool = unit(tq, dim=-1) @ unit(tp, dim=-1).T if config.score == "cosine" else tq @ tp.T
        else:
            pool = torch.zeros(n, n)
        neg = config.negatives
        negatives = mine_negatives(pool, torch.arange(n), kind=neg.kind, count=neg.count, top=neg.top,
                                   seed=config.data.seed)
        groups = []
        for i, pair in enumerate(pairs["train"]):
            idx = [i, *negatives[i].tolist()]
            passages = tp[idx]  # [1 + k, D], positive first
            scores = pair_scores(tq[i:i + 1], passages[None], score=config.score)[0]
            groups.append({"texts": [pair.query, *(pairs["train"][j].positive for j in idx)],
                           "teacher_scores": scores, "teacher_embeddings": torch.cat([tq[i:i + 1], passages])})
        return groups

    # -- references (no training) --------------------------------------------------------------
    @staticmethod
    def _reference(config: RankerKDConfig, pairs: Mapping[str, list[Any]], teacher_top: torch.Tensor,
                   name: str) -> dict[str, Any]:
        from kdforge.students.encoder import load_sentence_encoder

        if name == "student before distillation":
            source, layers = config.student, config.student.layers
        else:
            source, layers = EncoderSource(model=name), None
        model, tok = load_sentence_encoder(source, layers=layers, what=name)
        return {"name": name, "role": "baseline", "model": source.model,
                "params": sum(p.numel() for p in model.parameters()),
                "metrics": _evaluate(model, tok, config, pairs, teacher_top)}

    # -- one student ---------------------------------------------------------------------------
    @staticmethod
    def _student(run: Any, config: RankerKDConfig, method: RankerMethod, seed: int, pairs: Mapping[str, list[Any]],
                 data: list[dict[str, Any]], teacher_top: torch.Tensor) -> dict[str, Any]:
        from kdforge.data.ranking import collate_groups
        from kdforge.recipes.subrun import config_key, copy_of, slug, train_student
        from kdforge.students.encoder import load_sentence_encoder
        from kdforge.train import Distiller, Objective, RankingTask, TrainConfig

        sub = run.subrun(f"{method.name!r}, seed {seed}", Path("students") / slug(method.name) / f"seed-{seed}", {
            "student": config_key(config.student), "train": config_key(config.train),
            "method": config_key(method), "seed": seed, "teacher": config_key(config.teacher),
            "data": config_key(config.data), "negatives": config_key(config.negatives),
            "score": config.score,
        }, length=16, record="result.json")
        cached = sub.reuse()
        if cached is not None:
            return cached
        sub.prepare(resume=False)
        torch.manual_seed(seed)
        dim = int(data[0]["teacher_embeddings"].shape[-1])
        model, tok = load_sentence_encoder(config.student, layers=config.student.layers,
                                           projection_dim=dim if config.student.projection else None, what="student")
        tr = config.train
        steps = max(1, int(len(data) / tr.batch_size * tr.epochs))
        train_cfg = TrainConfig(max_steps=steps, batch_size=tr.batch_size, lr=tr.lr, weight_decay=tr.weight_decay,
                                scheduler="linear", warmup_steps=int(tr.warmup_ratio * steps), max_grad_norm=1.0,
                                seed=seed, log_every=max(1, steps // 10), output_dir=str(sub.dir), progress=False)
        # a narrower student without projection compares cosine relations only: zero-pad it (exact)
        pad = dim if method.signal == "embeddings" and not config.student.projection else None
        distiller = Distiller(model, None, task=RankingTask(method.signal, score=config.score, pad_to=pad),
                              objective=Objective(method.terms), config=train_cfg, train_data=data,
                              collate_fn=collate_groups(tok, config.data.max_length))
        trained = train_student(distiller, resume=False, empty=copy_of(model))
        student = trained.model
        metrics = _evaluate(student, tok, config, pairs, teacher_top)
        log.info("%s seed %d: %s", method.name, seed, metrics)
        result = None
        if run.main:
            result = sub.finish({"method": method.name, "seed": seed, "steps": trained.state.step,
                                 "train_seconds": trained.seconds, "params": sum(p.numel() for p in student.parameters()),
                                 "metrics": metrics}, weights="model.safetensors", model=student)
        run.barrier()
        return result if result is not None else sub.read_finished()


def _evaluate(model: torch.nn.Module, tok: Any, config: RankerKDConfig, pairs: Mapping[str, list[Any]],
              teacher_top: torch.Tensor) -> dict[str, float]:
    from kdforge.students.encoder import encode

    kw = {"batch_size": config.eval.batch_size, "max_length": config.data.max_length}
    q = encode(model, tok, [p.query for p in pairs["eval"]], **kw)
    p = encode(model, tok, [p.positive for p in pairs["eval"]], **kw)
    return _score(q, p, teacher_top, config)


def _summary(name: str, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    for k in per_seed[0]["metrics"]:
        vals = [r["metrics"][k] for r in per_seed]
        metrics[k] = statistics.fmean(vals)
        metrics[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"name": name, "role": "student", "params": per_seed[0]["params"], "metrics": metrics,
            "per_seed": [{"seed": r["seed"], **r["metrics"]} for r in per_seed],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in per_seed)}


def results_markdown(results: Mapping[str, Any]) -> str:
    keys = [k for k in results["models"][0]["metrics"] if not k.endswith("_std")]
    heads = {"teacher_top1": "same top-1 as teacher"}
    lines = [f"# ranker_kd: {results['teacher']} -> {results['student']} layers {results['student_layers']} "
             f"({results['train_queries']} training queries, {results['negatives']['count']} "
             f"{results['negatives']['kind']} negative(s) each; {results['eval_queries']} held-out queries, "
             f"seeds {results['seeds']})", "",
             "| model | params | " + " | ".join(heads.get(k, k) for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for m in results["models"]:
        cells = []
        for k in keys:
            v, std = m["metrics"].get(k), m["metrics"].get(f"{k}_std")
            cells.append("–" if v is None else f"{v:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        lines.append(f"| {m['name']} | {m.get('params', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
