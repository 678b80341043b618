"""PGKD: performance-guided knowledge distillation for text classification.

Di Palo, Singhi & Fadlallah (2024), "Performance-Guided LLM Knowledge Distillation for
Efficient Text Classification at Scale". A small, cheap student classifier learns from a few
labels; then, round after round:

1. the student is evaluated on the validation set (accuracy, per-class F1);
2. its **hard examples** are mined: validation rows it gets wrong, most confident first;
3. the teacher LLM is shown the student's scores and those hard examples (with their true
   labels) and asked to write new labelled examples of the kind the student fails on
   (one ``<label>: <text>`` per line);
4. the new rows are parsed (label mapped onto the label set), de-duplicated against the pool
   (exact + MinHash near-duplicates, :class:`kdforge.elicit.expansion.Deduplicator`), added
   to the training pool, and the student is retrained from scratch;
5. early stopping: stop after ``patience`` rounds without a validation gain; keep the best.

Two ways to ask (``generation.mode``):

* ``list`` (the paper's): one chat instruction per prompt showing the scores and a mix of hard
  examples, asking for ``k`` new ``<label>: <text>`` lines (:func:`parse_generated`). Needs a
  teacher that follows instructions (a hosted or 7B+ model).
* ``fewshot``: one plain-text completion prompt per requested label, a few-shot list of that
  label's hard examples (validation rows of that label the student got wrong, topped up with
  training rows of the label) in a fixed ``Label: ...`` / ``Text: ...`` layout ending in an
  open ``Text:`` line; the teacher writes one new example (stop at the newline) and the label
  is the requested one. A small model continues a pattern far more reliably than it follows an
  instruction, and the parse cannot fail (:func:`parse_completion`).

Generated rows may then be filtered (``generation.filters``, all must pass):
``teacher_agrees`` keeps a row only when the teacher, asked to classify it (log-likelihood of
each label's verbalizer, calibrated: :func:`calibrate_scores`), picks the requested label;
``student_wrong`` keeps it only when the current student misclassifies it.

The teacher is any :mod:`kdforge.elicit` backend (local, OpenAI-compatible, vLLM); each round's
generation is a resumable job under ``RUN_DIR/rounds/round-NN``. The student is a hashed
bag-of-n-grams classifier (``EmbeddingBag`` + linear, fastText-style: milliseconds per
batch on a CPU, the "efficient at scale" end of the trade-off), trained with
:class:`kdforge.train.Distiller` (cross-entropy on labels). ``results.json`` follows
``docs/run-format.md``: the labels-only student (round 0) as the baseline, the best PGKD round
as the student, test metrics for both.
"""

from __future__ import annotations

import logging
import math
import random
import re
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from kdforge.config import StrictModel
from kdforge.elicit.backends.config import BackendConfig, build_backend
from kdforge.elicit.data import PromptConfig, read_table, render_prompt
from kdforge.elicit.engine import GenerationEngine, collect
from kdforge.elicit.expansion import Deduplicator
from kdforge.elicit.labeling import normalize, parse_label
from kdforge.elicit.types import SamplingParams, build_requests
from kdforge.errors import ConfigError, DataError
from kdforge.io import write_json_atomic, write_text_atomic
from kdforge.recipes import RECIPES, Recipe

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "A small model classifies texts into these labels: {labels}.\n"
    "On validation data it scores: {metrics}.\n"
    "Here are texts it got wrong, with their correct labels:\n{examples}\n\n"
    "Write {k} new, varied texts of the same kind that such a model would find hard, with their "
    "correct labels. One per line, formatted exactly as `<label>: <text>`."
)


class PGKDData(StrictModel):
    asset: str | None = Field("rotten-tomatoes", description="asset with train/validation/test splits")
    train_path: str | None = None
    validation_path: str | None = None
    test_path: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] = Field(default_factory=lambda: ["fresh", "rotten"], min_length=2)
    train_limit: int | None = Field(200, ge=1, description="initial labelled pool (few labels)")
    validation_limit: int | None = Field(500, ge=1)
    test_limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _source(self) -> PGKDData:
        paths = (self.train_path, self.validation_path, self.test_path)
        if any(paths) and not all(paths):
            raise ValueError("give all of train_path, validation_path and test_path (or none, with an asset)")
        if not any(paths) and self.asset is None:
            raise ValueError("set data.asset or the three *_path keys")
        return self


class StudentConfig(StrictModel):
    buckets: int = Field(1 << 16, ge=16, description="hashed n-gram vocabulary size")
    dim: int = Field(64, ge=2)
    ngrams: int = Field(2, ge=1, le=3)
    max_features: int = Field(256, ge=8)


class StudentTrain(StrictModel):
    epochs: float = Field(10, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class PGKDGeneration(StrictModel):
    """How the teacher is asked for new examples and which of them are kept (module docstring)."""

    mode: Literal["list", "fewshot"] = "list"
    verbalizers: dict[str, str] = Field(
        default_factory=dict, description="label -> word shown/scored for it (default: the label)")
    header: str = Field("Examples, each with its label.", description="fewshot: first line of the prompt")
    label_name: str = Field("Label", description="fewshot: name of the label line")
    text_name: str = Field("Text", description="fewshot: name of the text line")
    filters: list[Literal["teacher_agrees", "student_wrong"]] = Field(
        default_factory=list, description="conditions a generated row must meet to be kept (all of them)")
    judge_template: str = Field(
        "Text: {text}\n\nWhich label fits this text? Answer with one word: {labels}.",
        description="teacher_agrees: classification prompt over {text} and {labels}")
    judge_prompt: PromptConfig = Field(default_factory=PromptConfig)
    judge_verbalizers: dict[str, str] = Field(
        default_factory=dict,
        description="label -> exact continuation scored for it (default ' ' + its verbalizer)")
    judge_calibration: Literal["batch", "content_free", "none"] = Field(
        "batch", description="teacher_agrees: how the judge's label prior is removed (calibrate_scores)")
    content_free: str = Field("N/A", description="judge_calibration content_free: the content-free text")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(120, ge=1)

    @model_validator(mode="after")
    def _distinct_filters(self) -> PGKDGeneration:
        if len(set(self.filters)) != len(self.filters):
            raise ValueError("generation.filters lists a filter twice")
        return self

    def word(self, label: str) -> str:
        """The word shown for ``label`` in prompts."""
        return self.verbalizers.get(label, label)

    def continuation(self, label: str) -> str:
        """The exact text whose log-likelihood scores ``label`` in the teacher's judgement."""
        return self.judge_verbalizers.get(label, " " + self.word(label))


class PGKDConfig(StrictModel):
    output_dir: str = "outputs/pgkd"
    seed: int = 0
    seeds: list[int] | None = Field(
        None, min_length=1, description="run the whole loop once per seed (SEED folders) and report mean/std")
    teacher: BackendConfig
    data: PGKDData = Field(default_factory=PGKDData)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: StudentTrain = Field(default_factory=StudentTrain)
    rounds: int = Field(3, ge=1, description="PGKD rounds after the labels-only student")
    patience: int = Field(1, ge=1, description="rounds without validation gain before stopping")
    prompts_per_round: int = Field(4, ge=1)
    hard_per_prompt: int = Field(6, ge=1)
    examples_per_reply: int = Field(8, ge=1, description="k new examples asked per prompt")
    template: str = DEFAULT_TEMPLATE
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    generation: PGKDGeneration = Field(default_factory=PGKDGeneration)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.9, top_p=0.95, max_tokens=400, seed=0))
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    progress: bool = False

    @model_validator(mode="after")
    def _known_verbalizers(self) -> PGKDConfig:
        for key in ("verbalizers", "judge_verbalizers"):
            unknown = set(getattr(self.generation, key)) - set(self.data.labels)
            if unknown:
                raise ValueError(f"generation.{key} has labels not in data.labels: {sorted(unknown)}")
        return self


# ---- student --------------------------------------------------------------------------------
def featurize(text: str, cfg: StudentConfig) -> list[int]:
    """Hashed word n-gram ids in ``[1, buckets]`` (0 = padding), CRC32 so ids are stable
    across processes (Python's ``hash`` is salted)."""
    words = normalize(text).split()
    feats = []
    for n in range(1, cfg.ngrams + 1):
        for i in range(len(words) - n + 1):
            feats.append(1 + zlib.crc32(" ".join(words[i:i + n]).encode("utf-8")) % cfg.buckets)
    return feats[: cfg.max_features] or [0]


def encode(texts: list[str], cfg: StudentConfig) -> torch.Tensor:
    """``[N, max_features]`` int64 feature ids, 0-padded."""
    out = torch.zeros(len(texts), cfg.max_features, dtype=torch.long)
    for i, t in enumerate(texts):
        f = featurize(t, cfg)
        out[i, : len(f)] = torch.tensor(f)
    return out


class BagOfNgramsClassifier(nn.Module):
    """fastText-style classifier: mean of hashed n-gram embeddings -> linear layer.

    Input ``[B, L]`` feature ids (0 = padding, excluded from the mean); output ``[B, C]`` logits.
    """

    def __init__(self, num_classes: int, cfg: StudentConfig) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(cfg.buckets + 1, cfg.dim, mode="mean", padding_idx=0)
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


def train_student(texts: list[str], labels: list[int], num_classes: int, cfg: PGKDConfig,
                  run_dir: Path | None) -> nn.Module:
    """Train a fresh student on (texts, labels) with :class:`kdforge.train.Distiller` (CE)."""
    from kdforge.train import ClassificationTask, Distiller

    torch.manual_seed(cfg.seed)
    student = BagOfNgramsClassifier(num_classes, cfg.student)
    data = _Rows(encode(texts, cfg.student), torch.tensor(labels, dtype=torch.long))
    d = Distiller(
        student, None, task=ClassificationTask(),
        objective=[{"name": "cross_entropy", "weight": 1.0}],
        config={"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                "weight_decay": cfg.train.weight_decay, "scheduler": "linear", "seed": cfg.seed,
                "progress": cfg.progress, "log_every": 50,
                "output_dir": str(run_dir) if run_dir else None, "keep_last": 1},
        train_data=data,
    )
    d.train()
    return d.unwrapped_student.eval()


@torch.no_grad()
def predict(model: nn.Module, texts: list[str], cfg: StudentConfig) -> torch.Tensor:
    """``[N, C]`` class probabilities."""
    return torch.softmax(model(encode(texts, cfg)), dim=-1)


def classification_metrics(probs: torch.Tensor, labels: list[int], names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class F1 (``f1/<name>``) and macro F1 of class probabilities ``[N, C]``.

    Built on :mod:`kdforge.eval.classification`: accuracy is :func:`~kdforge.eval.accuracy`;
    recall of class ``c`` is :func:`~kdforge.eval.per_class_accuracy`
    ``#(pred = c, y = c) / #(y = c)``, and with predictions and labels swapped the same function
    gives the precision ``#(pred = c, y = c) / #(pred = c)``. ``F1 = 2 P R / (P + R)``; a class
    never predicted or never present counts as P or R = 0 (then F1 = 0). Values are float32
    fractions as everywhere in ``kdforge.eval``.
    """
    from kdforge.eval.classification import accuracy, per_class_accuracy

    y = torch.tensor(labels, dtype=torch.long)
    pred = probs.argmax(-1)
    out: dict[str, Any] = {"accuracy": accuracy(pred, y) if labels else 0.0}
    recall = per_class_accuracy(pred, y, len(names))
    precision = per_class_accuracy(y, pred, len(names))
    f1s = []
    for name, p, r in zip(names, precision, recall, strict=True):
        p, r = (0.0 if math.isnan(p) else p), (0.0 if math.isnan(r) else r)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[f"f1/{name}"] = f1
        f1s.append(f1)
    out["macro_f1"] = sum(f1s) / len(f1s)
    return out


def hard_examples(probs: torch.Tensor, labels: list[int], k: int) -> list[int]:
    """Indices of misclassified rows, most confidently wrong first (then the least confident
    correct ones if fewer than ``k`` are wrong)."""
    pred = probs.argmax(-1)
    conf = probs.max(-1).values
    y = torch.tensor(labels)
    wrong = [int(i) for i in torch.nonzero(pred != y).flatten()]
    wrong.sort(key=lambda i: -float(conf[i]))
    if len(wrong) < k:
        right = [int(i) for i in torch.nonzero(pred == y).flatten()]
        right.sort(key=lambda i: float(conf[i]))
        wrong += right[: k - len(wrong)]
    return wrong[:k]


LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])?\s*\**([^:\n]{1,40}?)\**\s*[:\-–]\s*(.+?)\s*$")


def parse_generated(text: str, labels: list[str]) -> list[tuple[str, str]]:
    """``<label>: <text>`` lines of a teacher reply -> (label, text); other lines are ignored."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        lab = parse_label(m.group(1), labels)
        body = m.group(2).strip().strip("\"'“”").strip()
        if lab is not None and len(body.split()) >= 3:
            out.append((lab, body))
    return out


def parse_completion(text: str, min_words: int = 3, max_words: int = 120) -> str | None:
    """The example a few-shot completion wrote: its first non-empty line, quotes stripped;
    ``None`` when that line has fewer than ``min_words`` or more than ``max_words`` words."""
    for line in text.splitlines():
        body = line.strip().strip("\"'“”").strip()
        if body:
            return body if min_words <= len(body.split()) <= max_words else None
    return None


def fewshot_prompt(examples: list[str], label_word: str, gen: PGKDGeneration) -> str:
    """Plain-text few-shot prompt asking for one more example of ``label_word``::

        <header>

        Label: negative
        Text: <example 1>

        ...
        Label: negative
        Text:
    """
    blocks = [f"{gen.label_name}: {label_word}\n{gen.text_name}: {' '.join(t.split())}" for t in examples]
    return (gen.header.strip() + "\n\n" + "\n\n".join(blocks)
            + f"\n\n{gen.label_name}: {label_word}\n{gen.text_name}:")


def teacher_judge(backend: Any, texts: list[str], names: list[str], gen: PGKDGeneration) -> list[list[float]]:
    """Raw log-likelihood label scores ``[len(texts)][len(names)]`` from the teacher:
    ``log p(v_y | prompt(x))`` with ``v_y`` the label's verbalizer (:meth:`PGKDGeneration.continuation`)
    after ``judge_template``. Needs a backend with log-likelihood scoring (local ``transformers``).
    Calibration is applied by :func:`calibrate_scores`."""
    conts = [gen.continuation(n) for n in names]
    label_list = ", ".join(gen.word(n) for n in names)
    prompts = [render_prompt({"text": t, "labels": label_list}, gen.judge_prompt, gen.judge_template) for t in texts]
    many = getattr(backend, "score_many", None)
    return many(prompts, conts) if many is not None else [backend.score_continuations(q, conts) for q in prompts]


def calibrate_scores(scores: list[list[float]], how: str, prior: list[float] | None = None) -> list[list[float]]:
    """Remove the judge's label prior from raw scores ``[N][C]``.

    * ``content_free`` (Zhao et al. 2021, "Calibrate Before Use"): subtract the scores of a
      content-free input (``prior``, e.g. the prompt with ``"N/A"``).
    * ``batch`` (Zhou et al. 2024, "Batch Calibration"): subtract the mean score of each label
      over the batch being judged. Right when the batch is balanced over labels by
      construction, as PGKD's few-shot requests are.
    * ``none``: raw scores.
    """
    if how == "none" or not scores:
        return scores
    if how == "content_free":
        if prior is None:
            raise ValueError("content_free calibration needs the content-free prior")
        ref = prior
    else:
        ref = [sum(col) / len(scores) for col in zip(*scores, strict=True)]
    return [[a - b for a, b in zip(row, ref, strict=True)] for row in scores]


def _count_tokens(backend: Any, prompts: list[Any], conts: list[str]) -> int | None:
    """Tokens a log-likelihood pass reads (each prompt once per continuation), when the backend
    exposes its tokenizer; ``None`` otherwise."""
    tok, render = getattr(backend, "tokenizer", None), getattr(backend, "render", None)
    if tok is None or render is None:
        return None
    c = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in conts)
    return sum(len(tok(render(q), add_special_tokens=False)["input_ids"]) * len(conts) + c for q in prompts)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---- recipe ---------------------------------------------------------------------------------
def _load_split(cfg: PGKDData, split: str, limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    if cfg.asset is not None and not cfg.train_path:
        from kdforge.assets import ensure

        path = ensure(cfg.asset) / f"{split}.jsonl"
    else:
        path = Path({"train": cfg.train_path, "validation": cfg.validation_path, "test": cfg.test_path}[split])  # type: ignore[arg-type]
    rows = read_table(path)
    random.Random(f"{seed}-{split}").shuffle(rows)  # the files may be ordered (e.g. by movie)
    if limit is not None:
        rows = rows[:limit]
    texts, ys = [], []
    for r in rows:
        if cfg.text_field not in r or cfg.label_field not in r:
            raise DataError(f"{path}: rows need {cfg.text_field!r} and {cfg.label_field!r}",
                            "set data.text_field / data.label_field")
        lab = parse_label(str(r[cfg.label_field]), cfg.labels)
        if lab is None:
            raise DataError(f"{path}: label {r[cfg.label_field]!r} is not one of {cfg.labels}", "fix data.labels")
        texts.append(str(r[cfg.text_field]))
        ys.append(cfg.labels.index(lab))
    if not texts:
        raise DataError(f"{path} has no rows", "check the file and the limits")
    return texts, ys


@RECIPES.register("pgkd", "performance-guided KD: teacher writes examples where the student fails")
class PGKD(Recipe):
    config_model = PGKDConfig

    def run(self, config: PGKDConfig, output_dir: Path) -> dict[str, Any]:
        import yaml

        from kdforge.distributed import launched_world_size

        if launched_world_size() > 1:
            # every rank would call the teacher and write the same rounds: refuse before any work
            raise ConfigError(
                f"pgkd runs in one process, but this is one of {launched_world_size()} launched processes",
                "run `kdforge run` without accelerate launch (its student trains in seconds; the teacher "
                "calls are the cost: point teacher at a vLLM or OpenAI-compatible server for throughput)",
            )
        cfg = config
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump({"recipe": "pgkd", **cfg.model_dump(mode="json")},
                                                              sort_keys=False))
        backend = build_backend(cfg.teacher)
        if not cfg.seeds:
            return self._run_seed(cfg, out, backend)
        per_seed = [self._run_seed(cfg.model_copy(update={"seed": s, "seeds": None}), out / f"seed-{s}", backend)
                    for s in cfg.seeds]
        return self._aggregate(cfg, out, per_seed, backend)

    # ---- one seed -------------------------------------------------------------------------
    def _run_seed(self, cfg: PGKDConfig, out: Path, backend: Any) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        names = cfg.data.labels
        tr_x, tr_y = _load_split(cfg.data, "train", cfg.data.train_limit, cfg.seed)
        va_x, va_y = _load_split(cfg.data, "validation", cfg.data.validation_limit, cfg.seed)
        te_x, te_y = _load_split(cfg.data, "test", cfg.data.test_limit, cfg.seed)
        dedup = Deduplicator(cfg.near_dup_threshold, 1.0)  # dedup only; diversity is the teacher's job
        for t in tr_x:
            if dedup.check(t)[0] is None:
                dedup.add(t)
        pool_x, pool_y = list(tr_x), list(tr_y)
        rng = random.Random(cfg.seed)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        stale = 0
        model: nn.Module | None = None
        for rnd in range(cfg.rounds + 1):
            t0, c0 = time.monotonic(), time.process_time()
            teacher: dict[str, Any] = {}
            if model is not None:  # rounds >= 1: the teacher targets the previous student's errors
                teacher = self._grow(cfg, backend, out, rnd, history[-1], (tr_x, tr_y), (va_x, va_y), names,
                                     dedup, pool_x, pool_y, rng, model)
            model = train_student(pool_x, pool_y, len(names), cfg, out / "rounds" / f"round-{rnd:02d}" / "student")
            val = classification_metrics(predict(model, va_x, cfg.student), va_y, names)
            test = classification_metrics(predict(model, te_x, cfg.student), te_y, names)
            entry = {"round": rnd, "pool": len(pool_x), "added": teacher.get("added", 0), "val": val, "test": test,
                     "teacher": teacher, "seconds": time.monotonic() - t0, "cpu_seconds": time.process_time() - c0}
            history.append(entry)
            log.info("PGKD seed %d round %d: pool %d (+%d), val acc %.4f, test acc %.4f", cfg.seed, rnd, len(pool_x),
                     entry["added"], val["accuracy"], test["accuracy"])
            write_json_atomic(out / "rounds.json", history)
            if best is None or val["accuracy"] > best["val"]["accuracy"]:
                best, stale = entry, 0
            else:
                stale += 1
                if stale >= cfg.patience and rnd < cfg.rounds:
                    log.info("early stopping: %d round(s) without validation gain", stale)
                    break
        assert best is not None
        spent = {k: sum(h["teacher"].get(k) or 0 for h in history)
                 for k in ("generation_calls", "prompt_tokens", "completion_tokens", "judge_calls", "judge_tokens")}
        results = {
            "recipe": "pgkd",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "primary_metric": "accuracy",
            "higher_is_better": True,
            "classes": names,
            "seed": cfg.seed,
            "models": [
                {"name": "student / labels only", "role": "baseline",
                 "metrics": {**history[0]["test"], "train_rows": history[0]["pool"]},
                 "run_dir": "rounds/round-00/student"},
                {"name": f"student / PGKD (round {best['round']})", "role": "student",
                 "metrics": {**best["test"], "train_rows": best["pool"]},
                 "run_dir": f"rounds/round-{best['round']:02d}/student"},
            ],
            "best_round": best["round"],
            "rounds": history,
            "teacher_spent": spent,
            "teacher": backend.describe(),
        }
        write_json_atomic(out / "results.json", results)
        rows = "\n".join(
            f"| {h['round']} | {h['pool']} | {h['added']} | {h['teacher'].get('generation_calls', 0)} | "
            f"{h['teacher'].get('completion_tokens', 0)} | {h['val']['accuracy']:.4f} | {h['test']['accuracy']:.4f} | "
            f"{h['test']['macro_f1']:.4f} |" for h in history)
        write_text_atomic(out / "results.md", "# PGKD\n\n| round | train rows | added | teacher calls | "
                          "completion tokens | val acc | test acc | test macro-F1 |\n|---|---|---|---|---|---|---|---|\n"
                          f"{rows}\n\nbest round: {best['round']}\n")
        return results

    # ---- several seeds --------------------------------------------------------------------
    def _aggregate(self, cfg: PGKDConfig, out: Path, per_seed: list[dict[str, Any]], backend: Any) -> dict[str, Any]:
        models = []
        for j, (name, role) in enumerate([("student / labels only", "baseline"), ("student / PGKD (best round)", "student")]):
            metrics: dict[str, float] = {}
            for key in ("accuracy", "macro_f1", "train_rows"):
                mean, std = _mean_std([float(r["models"][j]["metrics"][key]) for r in per_seed])
                metrics[key], metrics[f"{key}_std"] = mean, std
            models.append({"name": name, "role": role, "metrics": metrics,
                           "per_seed": [{"seed": r["seed"], **r["models"][j]["metrics"]} for r in per_seed],
                           "run_dir": [f"seed-{r['seed']}/{r['models'][j]['run_dir']}" for r in per_seed]})
        depth = min(len(r["rounds"]) for r in per_seed)
        by_round = []
        for k in range(depth):
            hs = [r["rounds"][k] for r in per_seed]
            row: dict[str, Any] = {"round": k}
            for key, get in {"pool": lambda h: h["pool"], "added": lambda h: h["added"],
                             "val_accuracy": lambda h: h["val"]["accuracy"],
                             "test_accuracy": lambda h: h["test"]["accuracy"],
                             "test_macro_f1": lambda h: h["test"]["macro_f1"],
                             "generation_calls": lambda h: h["teacher"].get("generation_calls", 0),
                             "prompt_tokens": lambda h: h["teacher"].get("prompt_tokens", 0),
                             "completion_tokens": lambda h: h["teacher"].get("completion_tokens", 0),
                             "judge_calls": lambda h: h["teacher"].get("judge_calls", 0),
                             "judge_tokens": lambda h: h["teacher"].get("judge_tokens") or 0,
                             "cpu_seconds": lambda h: h["cpu_seconds"]}.items():
                row[key], row[f"{key}_std"] = _mean_std([float(get(h)) for h in hs])
            by_round.append(row)
        results = {
            "recipe": "pgkd",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "primary_metric": "accuracy",
            "higher_is_better": True,
            "classes": cfg.data.labels,
            "seeds": list(cfg.seeds or []),
            "models": models,
            "rounds_mean": by_round,
            "per_seed": [{"seed": r["seed"], "best_round": r["best_round"], "teacher_spent": r["teacher_spent"],
                          "rounds": r["rounds"]} for r in per_seed],
            "teacher": backend.describe(),
        }
        write_json_atomic(out / "results.json", results)
        lines = ["# PGKD", "", f"seeds: {results['seeds']} (mean ± std over seeds; test accuracy on "
                 f"{'all' if cfg.data.test_limit is None else cfg.data.test_limit} test rows)", "",
                 "| round | train rows | added | teacher calls | completion tokens | val acc | test acc |",
                 "|---|---|---|---|---|---|---|"]
        for r in by_round:
            lines.append(f"| {r['round']} | {r['pool']:.0f} | {r['added']:.1f} | {r['generation_calls']:.0f} | "
                         f"{r['completion_tokens']:.0f} | {r['val_accuracy']:.4f} ± {r['val_accuracy_std']:.4f} | "
                         f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f} |")
        lines += ["", "| model | test accuracy | test macro-F1 |", "|---|---|---|"]
        for m in models:
            mm = m["metrics"]
            lines.append(f"| {m['name']} | {mm['accuracy']:.4f} ± {mm['accuracy_std']:.4f} | "
                         f"{mm['macro_f1']:.4f} ± {mm['macro_f1_std']:.4f} |")
        write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
        return results

    # ---- one round of teacher generation --------------------------------------------------
    def _grow(self, cfg: PGKDConfig, backend: Any, out: Path, rnd: int, last: dict[str, Any],
              train: tuple[list[str], list[int]], val: tuple[list[str], list[int]], names: list[str],
              dedup: Deduplicator, pool_x: list[str], pool_y: list[int], rng: random.Random,
              model: nn.Module) -> dict[str, Any]:
        """Ask the teacher for new rows aimed at ``model``'s validation errors, filter them and
        add the kept ones to the pool; return this round's counts and teacher spend."""
        va_x, va_y = val
        gen = cfg.generation
        probs = predict(model, va_x, cfg.student)
        sampling = cfg.sampling
        if sampling.seed is not None:  # fresh samples per seed and round, each reproducible
            sampling = sampling.model_copy(update={"seed": sampling.seed + 1000 * cfg.seed + rnd})
        if gen.mode == "fewshot":
            prompts, metas = self._fewshot_prompts(cfg, probs, train, val, names, rng)
            if not sampling.stop:  # one example per completion
                sampling = sampling.model_copy(update={"stop": ["\n"]})
        else:
            prompts, metas = self._list_prompts(cfg, probs, last, val, names, rng)
        if not prompts:
            return {"added": 0}
        reqs = build_requests(prompts, sampling, metas=metas, namespace=f"pgkd-round-{rnd}")
        rdir = out / "rounds" / f"round-{rnd:02d}"
        GenerationEngine(backend, rdir / "teacher", progress=cfg.progress, on_error="skip").run(reqs)
        records = collect(rdir / "teacher", reqs)
        stats: dict[str, Any] = {
            "generation_calls": len(records),
            "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in records),
            "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in records),
            "judge_calls": 0, "judge_tokens": 0, "truncated": 0, "parsed": 0, "duplicates": 0,
            "rejected": {f: 0 for f in gen.filters}, "added": 0, "added_per_label": {n: 0 for n in names},
        }
        val_keys = {normalize(t) for t in va_x}
        cands: list[tuple[str, int]] = []
        seen: set[str] = set()
        for rec in records:
            if gen.mode == "fewshot":
                if rec.get("finish_reason") == "length":  # cut off mid-example by max_tokens
                    stats["truncated"] += 1
                    continue
                text = parse_completion(rec["text"], gen.min_words, gen.max_words)
                parsed = [] if text is None else [(rec["meta"]["label"], text)]
            else:
                parsed = parse_generated(rec["text"], names)
            for lab, text in parsed:
                stats["parsed"] += 1
                key = normalize(text)
                if key in val_keys or key in seen or dedup.check(text)[0] is not None:
                    stats["duplicates"] += 1  # never train on copied validation rows or repeats
                    continue
                seen.add(key)
                dedup.add(text)  # also a rejected candidate: its near-copies are not asked about again
                cands.append((text, names.index(lab)))
        if "student_wrong" in gen.filters and cands:
            pred = predict(model, [t for t, _ in cands], cfg.student).argmax(-1).tolist()
            keep = [c for c, p in zip(cands, pred, strict=True) if p != c[1]]
            stats["rejected"]["student_wrong"] = len(cands) - len(keep)
            cands = keep
        if "teacher_agrees" in gen.filters and cands:
            judged = self._judge(backend, rdir / "judge.json", [t for t, _ in cands], names, gen, stats)
            keep = [c for c, j in zip(cands, judged, strict=True) if j == c[1]]
            stats["rejected"]["teacher_agrees"] = len(cands) - len(keep)
            cands = keep
        for text, y in cands:
            pool_x.append(text)
            pool_y.append(y)
            stats["added"] += 1
            stats["added_per_label"][names[y]] += 1
        write_json_atomic(rdir / "added.json", [{"text": t, "label": names[y]} for t, y in cands])
        return stats

    def _fewshot_prompts(self, cfg: PGKDConfig, probs: torch.Tensor, train: tuple[list[str], list[int]],
                         val: tuple[list[str], list[int]], names: list[str],
                         rng: random.Random) -> tuple[list[str | list[dict[str, str]]], list[dict[str, Any]]]:
        """``prompts_per_round`` few-shot prompts, split evenly over the labels; the shots of
        label ``c`` are validation rows of ``c`` the student misclassified (topped up with
        training rows of ``c`` when there are too few)."""
        va_x, va_y = val
        pred = probs.argmax(-1).tolist()
        prompts: list[str | list[dict[str, str]]] = []
        metas: list[dict[str, Any]] = []
        k = cfg.hard_per_prompt
        for c, name in enumerate(names):
            count = cfg.prompts_per_round // len(names) + (1 if c < cfg.prompts_per_round % len(names) else 0)
            wrong = [va_x[i] for i in range(len(va_y)) if va_y[i] == c and pred[i] != c]
            extra = [t for t, y in zip(*train, strict=True) if y == c]
            for _ in range(count):
                shots = rng.sample(wrong, min(k, len(wrong)))
                if len(shots) < k and extra:
                    shots += rng.sample(extra, min(k - len(shots), len(extra)))
                if not shots:
                    continue
                rng.shuffle(shots)
                prompts.append(fewshot_prompt(shots, cfg.generation.word(name), cfg.generation))
                metas.append({"label": name})
        return prompts, metas

    def _list_prompts(self, cfg: PGKDConfig, probs: torch.Tensor, last: dict[str, Any],
                      val: tuple[list[str], list[int]], names: list[str],
                      rng: random.Random) -> tuple[list[str | list[dict[str, str]]], list[dict[str, Any]]]:
        """The paper's instruction prompts: scores plus a mix of hard examples, ``k`` new rows asked."""
        va_x, va_y = val
        hard = hard_examples(probs, va_y, cfg.prompts_per_round * cfg.hard_per_prompt)
        if not hard:
            return [], []
        rng.shuffle(hard)
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in last["val"].items())
        prompts: list[str | list[dict[str, str]]] = []
        for p in range(cfg.prompts_per_round):
            chunk = hard[p * cfg.hard_per_prompt:(p + 1) * cfg.hard_per_prompt] or hard[: cfg.hard_per_prompt]
            examples = "\n".join(f"{names[va_y[i]]}: {va_x[i]}" for i in chunk)
            prompts.append(render_prompt({"labels": ", ".join(names), "metrics": metrics, "examples": examples,
                                          "k": cfg.examples_per_reply}, cfg.prompt, cfg.template))
        return prompts, [{} for _ in prompts]

    def _judge(self, backend: Any, path: Path, texts: list[str], names: list[str], gen: PGKDGeneration,
               stats: dict[str, Any]) -> list[int]:
        """Teacher labels (indices) of ``texts`` after ``gen.judge_calibration``. Raw scores are
        cached in ``path`` with the calls and tokens spent, so a rerun (or another calibration)
        scores nothing twice and still reports the full spend."""
        import json

        cache: dict[str, Any] = (json.loads(path.read_text()) if path.exists()
                                 else {"scores": {}, "prior": None, "calls": 0, "tokens": 0})
        todo = [t for t in dict.fromkeys(texts) if t not in cache["scores"]]
        need_prior = gen.judge_calibration == "content_free" and cache["prior"] is None
        if todo or need_prior:
            asked = todo + ([gen.content_free] if need_prior else [])
            scores = teacher_judge(backend, asked, names, gen)
            if need_prior:
                cache["prior"] = scores.pop()
            cache["scores"].update(zip(todo, scores, strict=True))
            conts = [gen.continuation(n) for n in names]
            words = ", ".join(gen.word(n) for n in names)
            prompts = [render_prompt({"text": t, "labels": words}, gen.judge_prompt, gen.judge_template) for t in asked]
            cache["calls"] += len(asked)
            cache["tokens"] += _count_tokens(backend, prompts, conts) or 0
            write_json_atomic(path, cache)
        stats["judge_calls"], stats["judge_tokens"] = cache["calls"], cache["tokens"]
        cal = calibrate_scores([cache["scores"][t] for t in texts], gen.judge_calibration, cache["prior"])
        return [max(range(len(row)), key=row.__getitem__) for row in cal]
