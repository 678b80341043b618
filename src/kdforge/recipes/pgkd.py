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
import random
import re
import time
import zlib
from pathlib import Path
from typing import Any

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
from kdforge.errors import DataError
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


class PGKDConfig(StrictModel):
    output_dir: str = "outputs/pgkd"
    seed: int = 0
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
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.9, top_p=0.95, max_tokens=400, seed=0))
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    progress: bool = False


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
    """Accuracy, per-class precision/recall/F1 and macro F1."""
    pred = probs.argmax(-1).tolist()
    n = max(len(labels), 1)
    out: dict[str, Any] = {"accuracy": sum(p == y for p, y in zip(pred, labels, strict=True)) / n}
    f1s = []
    for c, name in enumerate(names):
        tp = sum(p == c and y == c for p, y in zip(pred, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(pred, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(pred, labels, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
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

        cfg = config
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump({"recipe": "pgkd", **cfg.model_dump(mode="json")},
                                                              sort_keys=False))
        names = cfg.data.labels
        tr_x, tr_y = _load_split(cfg.data, "train", cfg.data.train_limit, cfg.seed)
        va_x, va_y = _load_split(cfg.data, "validation", cfg.data.validation_limit, cfg.seed)
        te_x, te_y = _load_split(cfg.data, "test", cfg.data.test_limit, cfg.seed)
        backend = build_backend(cfg.teacher)
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
            t0 = time.monotonic()
            added = 0
            if model is not None:  # rounds >= 1: the teacher targets the previous student's errors
                added = self._grow(cfg, backend, out, rnd, history[-1], va_x, va_y, names, dedup,
                                   pool_x, pool_y, rng, model)
            model = train_student(pool_x, pool_y, len(names), cfg, out / "rounds" / f"round-{rnd:02d}" / "student")
            val = classification_metrics(predict(model, va_x, cfg.student), va_y, names)
            test = classification_metrics(predict(model, te_x, cfg.student), te_y, names)
            entry = {"round": rnd, "pool": len(pool_x), "added": added, "val": val, "test": test,
                     "seconds": time.monotonic() - t0}
            history.append(entry)
            log.info("PGKD round %d: pool %d (+%d), val acc %.4f macro-F1 %.4f", rnd, len(pool_x), added,
                     val["accuracy"], val["macro_f1"])
            write_json_atomic(out / "rounds.json", history)
            if best is None or val["accuracy"] > best["val"]["accuracy"]:
                best, stale = entry, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stopping: %d round(s) without validation gain", stale)
                    break
        assert best is not None
        results = {
            "recipe": "pgkd",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "primary_metric": "accuracy",
            "higher_is_better": True,
            "models": [
                {"name": "student / labels only", "role": "baseline",
                 "metrics": {**history[0]["test"], "train_rows": history[0]["pool"]},
                 "run_dir": "rounds/round-00/student"},
                {"name": f"student / PGKD (round {best['round']})", "role": "student",
                 "metrics": {**best["test"], "train_rows": best["pool"]},
                 "run_dir": f"rounds/round-{best['round']:02d}/student"},
            ],
            "rounds": history,
            "teacher": backend.describe(),
        }
        write_json_atomic(out / "results.json", results)
        rows = "\n".join(f"| {h['round']} | {h['pool']} | {h['added']} | {h['val']['accuracy']:.4f} | "
                         f"{h['test']['accuracy']:.4f} | {h['test']['macro_f1']:.4f} |" for h in history)
        write_text_atomic(out / "results.md", "# PGKD\n\n| round | train rows | added | val acc | test acc | "
                          f"test macro-F1 |\n|---|---|---|---|---|---|\n{rows}\n\nbest round: {best['round']}\n")
        return results

    def _grow(self, cfg: PGKDConfig, backend: Any, out: Path, rnd: int, last: dict[str, Any],
              va_x: list[str], va_y: list[int], names: list[str], dedup: Deduplicator,
              pool_x: list[str], pool_y: list[int], rng: random.Random, model: nn.Module) -> int:
        probs = predict(model, va_x, cfg.student)
        hard = hard_examples(probs, va_y, cfg.prompts_per_round * cfg.hard_per_prompt)
        if not hard:
            return 0
        rng.shuffle(hard)
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in last["val"].items())
        prompts = []
        for p in range(cfg.prompts_per_round):
            chunk = hard[p * cfg.hard_per_prompt:(p + 1) * cfg.hard_per_prompt] or hard[: cfg.hard_per_prompt]
            examples = "\n".join(f"{names[va_y[i]]}: {va_x[i]}" for i in chunk)
            prompts.append(render_prompt({"labels": ", ".join(names), "metrics": metrics, "examples": examples,
                                          "k": cfg.examples_per_reply}, cfg.prompt, cfg.template))
        reqs = build_requests(prompts, cfg.sampling, namespace=f"pgkd-round-{rnd}")
        rdir = out / "rounds" / f"round-{rnd:02d}" / "teacher"
        GenerationEngine(backend, rdir, progress=cfg.progress, on_error="skip").run(reqs)
        added = 0
        val_keys = {normalize(t) for t in va_x}
        for rec in collect(rdir, reqs):
            for lab, text in parse_generated(rec["text"], names):
                if normalize(text) in val_keys:  # never train on copied validation rows
                    continue
                if dedup.check(text)[0] is None:
                    dedup.add(text)
                    pool_x.append(text)
                    pool_y.append(names.index(lab))
                    added += 1
        return added

