"""Recipe ``cross_tokenizer_kd``: distil a teacher into a student that uses *another tokenizer*.

The student has its own tokenizer (a byte-level BPE trained here on the training documents, or
any local fast tokenizer) and a small Llama body built from a config; the teacher keeps its own.
Every method trains the same student for the same steps on the same texts (per seed):
labels only, or with a cross-tokenizer term (``uld``, ``gold``) through
:class:`~kdforge.teachers.sources.CrossTokenizerTeacher` (positions aligned by character offsets).

Evaluation on held-out documents (the student's tokens, so every method is comparable):

* ``ppl``: the student's perplexity (``exp`` of the mean next-token cross-entropy);
* ``agreement``: top-1 agreement with the teacher at the positions where both tokenizers cut the
  next span alike (one-to-one groups) and the teacher's top token exists in both vocabularies.

Writes ``RUN_DIR/results.json`` / ``results.md`` (mean ± std over seeds) and the student
tokenizer (``RUN_DIR/student_tokenizer``). See docs/cross-tokenizer.md.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from kdforge.config import StrictModel
from kdforge.errors import ConfigError
from kdforge.recipes import RECIPES, Recipe
from kdforge.recipes.subrun import RecipeRun
from kdforge.teachers.sources.base import TeacherSource
from kdforge.train.config import TrainConfig
from kdforge.train.objective import LossTerm, Objective

log = logging.getLogger(__name__)


class TeacherSpec(StrictModel):
    """The teacher: an asset name (``smollm2``), a local folder, or a Hub id."""

    model: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"


class StudentSpec(StrictModel):
    """The student: its tokenizer and a small Llama body (trained from scratch)."""

    tokenizer: str = Field("bpe", description="'bpe' (byte-level BPE trained on the training documents) or a "
                                              "folder holding a fast tokenizer")
    vocab_size: int = Field(4096, ge=300, description="for tokenizer 'bpe'")
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(768, ge=8)


class DataSpec(StrictModel):
    """Texts cut from documents (paragraphs joined up to ``chars`` characters); held-out = other documents."""

    corpus: str = Field("austen", description="'austen' or a folder of .txt files (document = file stem)")
    train_docs: list[str] = Field(default_factory=lambda: ["prideprejudice"])
    eval_docs: list[str] = Field(default_factory=lambda: ["persuasion"])
    chars: int = Field(500, ge=20, description="characters per example")
    seq_len: int = Field(128, ge=8, description="student tokens per example (truncated)")
    train_examples: int = Field(400, ge=1)
    eval_examples: int = Field(48, ge=1)


class CrossTokenizerCacheSpec(StrictModel):
    """The teacher cache of ``teacher_source: cache`` (built over the training texts with the
    teacher's token offsets on first use, resumed or reused after)."""

    dir: str | None = Field(None, description="cache folder (default RUN_DIR/teacher_cache)")
    k: int = Field(64, ge=1, description="top-k entries per teacher position")
    encoding: str = Field("compact-u8-zstd", description="a cache encoding (kdforge cache-teacher --help)")


class MethodSpec(StrictModel):
    name: str
    objective: list[LossTerm]


def _default_methods() -> list[MethodSpec]:
    return [
        MethodSpec(name="labels only", objective=[LossTerm("cross_entropy", 1.0)]),
        MethodSpec(name="ULD", objective=[LossTerm("cross_entropy", 1.0), LossTerm("uld", 1.0)]),
        MethodSpec(name="GOLD hybrid", objective=[LossTerm("cross_entropy", 1.0), LossTerm("gold", 1.0)]),
    ]


class CrossTokenizerConfig(StrictModel):
    """Config of the ``cross_tokenizer_kd`` recipe."""

    output_dir: str = "outputs/cross_tokenizer"
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    span_policy: Literal["merge", "skip"] = "merge"
    teacher_source: Literal["live", "cache"] = Field(
        "live", description="'live': the teacher runs on the training batches; 'cache': its top-k and token offsets "
                            "are cached once (cache:) and training reads them (evaluation still asks the live "
                            "teacher)")
    cache: CrossTokenizerCacheSpec = Field(default_factory=CrossTokenizerCacheSpec)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=100, batch_size=8, lr=1e-3,
                                                                   progress=False))
    methods: list[MethodSpec] = Field(default_factory=_default_methods)
    seeds: list[int] = Field(default_factory=lambda: [0])
    eval_batch_size: int = Field(8, ge=1)
    reuse_teacher_signals: bool = Field(
        True, description="cut the training texts into fixed batches once and keep each batch's teacher signal "
                          "(float16, in memory) for every method, seed and epoch: the frozen teacher gives the same "
                          "signal, so this only saves teacher forwards (batch order is still shuffled per seed)")

    @field_validator("methods")
    @classmethod
    def _unique(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        names = [m.name for m in value]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"method names must be unique and at least one, got {names}")
        return value


def cut_texts(doc: str, chars: int, limit: int) -> list[str]:
    """Consecutive paragraphs of ``doc`` joined (single spaces) into pieces of ~``chars`` characters."""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
    out: list[str] = []
    current = ""
    for par in paragraphs:
        current = f"{current} {par}".strip()
        while len(current) >= chars:
            cut = current.rfind(" ", 0, chars)
            cut = cut if cut > chars // 2 else chars
            out.append(current[:cut])
            current = current[cut:].strip()
            if len(out) >= limit:
                return out
    return out


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style pre-tokenizer and decoder) trained on ``texts``, as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_student(spec: StudentSpec, vocab_size: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = spec.num_heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                                        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                                        num_attention_heads=heads, num_key_value_heads=heads,
                                        max_position_embeddings=max(512, 2 * spec.hidden_size),
                                        tie_word_embeddings=True))


@torch.no_grad()
def evaluate(student: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
             teacher_tops: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Held-out perplexity of ``student`` and its top-1 agreement with the teacher (see module doc).

    ``teacher_tops[i]``: ``(mapped, where)`` for batch ``i``: the teacher's top token as a student
    id (-1 if not shared) and the bool ``[B, T-1]`` one-to-one positions.
    """
    student.eval()
    nll, count, agree, counted = 0.0, 0, 0, 0
    for batch, (mapped, where) in zip(batches, teacher_tops):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        real = labels != -100
        nll += torch.nn.functional.cross_entropy(logits[real], labels[real], reduction="sum").item()
        count += int(real.sum())
        ok = where & real & (mapped >= 0)
        agree += int((logits.argmax(-1)[ok] == mapped[ok]).sum())
        counted += int(ok.sum())
    return {"ppl": math.exp(nll / max(count, 1)), "agreement": agree / max(counted, 1),
            "eval_tokens": count, "agreement_positions": counted}


def teacher_top_tokens(source: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top token at each compared position as a student id (-1: not shared), and
    the one-to-one positions (the agreement's denominator), for :func:`evaluate`."""
    from kdforge.train import CausalLMTask

    cross = source.signal(batch, CausalLMTask()).cross
    to_student = torch.full((cross.vocab_size,), -1, dtype=torch.long)
    to_student[cross.shared_teacher_ids.cpu()] = cross.shared_student_ids.cpu()
    mapped = to_student[cross.logits.argmax(-1).cpu()]
    return mapped, source.last_alignment.one_to_one.cpu() & source.last_alignment.mask.cpu()


@RECIPES.register("cross_tokenizer_kd", "distil into a student with another tokenizer (ULD / GOLD hybrid)")
class CrossTokenizerKD(Recipe):
    config_model = CrossTokenizerConfig

    def run(self, config: CrossTokenizerConfig, output_dir: Path, *, resume: bool = False) -> dict[str, Any]:
        from kdforge.recipes.llm_kd import TeacherSpec as LLMTeacherSpec
        from kdforge.recipes.llm_kd import load_documents, load_teacher
        from kdforge.teachers import CrossTokenizerCollator, CrossTokenizerTeacher
        from kdforge.train import CausalLMTask, Distiller

        start = time.perf_counter()
        run = RecipeRun.start("cross_tokenizer_kd", config, output_dir, record_output_dir=True)
        teacher, teacher_tok = load_teacher(LLMTeacherSpec(model=config.teacher.model, dtype=config.teacher.dtype))
        d = config.data
        docs = load_documents(d.corpus)
        missing = [n for n in [*d.train_docs, *d.eval_docs] if n not in docs]
        if missing:
            raise ConfigError(f"documents {missing} are not in corpus {d.corpus!r}", f"choose from {sorted(docs)}")
        train_texts = [t for n in d.train_docs for t in cut_texts(docs[n], d.chars, d.train_examples)][: d.train_examples]
        eval_texts = [t for n in d.eval_docs for t in cut_texts(docs[n], d.chars, d.eval_examples)][: d.eval_examples]
        s = config.student
        if s.tokenizer == "bpe":
            student_tok = train_bpe([docs[n] for n in d.train_docs], s.vocab_size)
        else:
            from kdforge.models import ModelSource, load_tokenizer

            # kdforge.models: a folder, an asset or a Hub id, with the errors of llm_kd's student.model
            student_tok = load_tokenizer(ModelSource(model=s.tokenizer), what="student")
        if run.main:
            student_tok.save_pretrained(run.out / "student_tokenizer")
        source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, span_policy=config.span_policy)
        collate = CrossTokenizerCollator(student_tok, teacher_tok, max_length=d.seq_len)
        eval_batches = [collate(eval_texts[i: i + config.eval_batch_size])
                        for i in range(0, len(eval_texts), config.eval_batch_size)]
        tops = [teacher_top_tokens(source, b) for b in eval_batches]
        train_data, train_collate, train_source = train_texts, collate, source
        cache_info: dict[str, Any] = {}
        if config.teacher_source == "cache":
            train_data, train_collate, train_source, cache_info = _cached_training(
                config, run.out, teacher, teacher_tok, student_tok, train_texts)
        if config.reuse_teacher_signals:
            bs = config.train.batch_size
            train_data = [dict(train_collate([train_data[j] for j in range(i, i + bs)]), batch_id=torch.tensor(k))
                          for k, i in enumerate(range(0, len(train_data) - bs + 1, bs))]
            train_collate, train_source = _first, ReusedSignals(train_source)
        rows: dict[str, list[dict[str, float]]] = {m.name: [] for m in config.methods}
        for seed in config.seeds:
            for method in config.methods:
                student = build_student(s, len(student_tok), seed)
                needs_teacher = Objective(method.objective).needs_teacher  # from the losses' specs
                update = {"seed": seed, "output_dir": None}
                if config.reuse_teacher_signals:
                    update["batch_size"] = 1  # one item = one fixed batch
                train_cfg = config.train.model_copy(update=update)
                t0 = time.perf_counter()
                Distiller(student, train_source if needs_teacher else None, task=CausalLMTask(),
                          objective=list(method.objective), config=train_cfg, train_data=train_data,
                          collate_fn=train_collate, vocab_policy="cross_tokenizer").train()
                scores = evaluate(student, eval_batches, tops)
                scores["train_s"] = time.perf_counter() - t0
                log.info("%s seed %d: %s", method.name, seed, scores)
                rows[method.name].append(scores)
        results = {
            "recipe": "cross_tokenizer_kd",
            "teacher": config.teacher.model,
            "student_vocab": len(student_tok),
            "teacher_vocab": len(teacher_tok),
            "shared_tokens": len(source.shared_student_ids),
            "teacher_source": config.teacher_source,
            **({"cache": cache_info} if cache_info else {}),
            "methods": {name: _summary(r) for name, r in rows.items()},
            "per_seed": rows,
            "total_s": time.perf_counter() - start,
        }
        run.publish(results, results_markdown(results, config))
        return results


def _cached_training(config: CrossTokenizerConfig, out: Path, teacher: Any, teacher_tok: Any, student_tok: Any,
                     train_texts: list[str]) -> tuple[Any, Any, TeacherSource, dict[str, Any]]:
    """Build (or reuse) the cross-tokenizer cache over the training texts the student covers, and
    return its dataset, collator, source and cost (bytes per teacher token, with and without the
    offsets; build seconds)."""
    from kdforge.teachers.cache import (
        CachedCrossTokenizerCollator,
        CrossTokenizerCacheDataset,
        build_cross_tokenizer_cache,
    )
    from kdforge.teachers.crosstok import encode_student
    from kdforge.teachers.sources import CachedCrossTokenizerTeacher

    seq_len = config.data.seq_len
    covered = encode_student(train_texts, student_tok, max_length=seq_len)[1]  # what the live teacher reads
    cache_dir = Path(config.cache.dir) if config.cache.dir else out / "teacher_cache"
    t0 = time.perf_counter()
    build_cross_tokenizer_cache(teacher, teacher_tok, covered, cache_dir, k=config.cache.k,
                                encoding=config.cache.encoding, batch_size=config.train.batch_size)
    build_s = time.perf_counter() - t0
    dataset = CrossTokenizerCacheDataset(cache_dir, covered, teacher_tokenizer=teacher_tok)
    stats = dataset.cache.manifest["stats"]
    tokens = dataset.cache.manifest["dataset"]["num_tokens"]
    real = int(sum(dataset.cache.token_offsets(i)[1] for i in range(len(dataset))))
    info = {"dir": str(cache_dir), "k": config.cache.k, "encoding": config.cache.encoding, "build_s": build_s,
            "bytes_per_token": stats["bytes_per_token"] * tokens / real,
            "offsets_bytes_per_token": stats["offsets_bytes_per_token"] * tokens / real,
            "teacher_tokens": real}
    log.info("teacher cache %s: %.1f B per teacher token (+ %.2f B for the token offsets)", cache_dir,
             info["bytes_per_token"], info["offsets_bytes_per_token"])
    source = CachedCrossTokenizerTeacher(teacher_tok, student_tok, vocab_size=dataset.vocab_size,
                                         span_policy=config.span_policy)
    return dataset, CachedCrossTokenizerCollator(student_tok, max_length=seq_len), source, info


def _first(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate of pre-collated batches (the loader's batch size is 1)."""
    return items[0]


class ReusedSignals(TeacherSource):
    """A :class:`~kdforge.teachers.sources.CrossTokenizerTeacher` whose signal is computed once per
    fixed batch (``batch_id``) and kept in float16: the teacher is frozen, so every method, seed and
    epoch would recompute the same signal. Recipe-internal (it holds every training batch's teacher
    logits in memory)."""

    scores_new_samples = False
    tokenizes_itself = True

    def __init__(self, source: TeacherSource) -> None:
        self.source, self.provides = source, source.provides
        self.memo: dict[int, Any] = {}

    def modules(self) -> list[torch.nn.Module]:
        return self.source.modules()

    def place(self, device: Any) -> None:
        self.source.place(device)

    def signal(self, batch: Any, task: Any, *, features: Any = None) -> Any:
        key = int(batch["batch_id"])
        if key not in self.memo:
            sig = self.source.signal(batch, task, features=features)
            self.memo[key] = replace(sig, cross=replace(sig.cross, logits=sig.cross.logits.half()))
        sig = self.memo[key]
        return replace(sig, cross=replace(sig.cross, logits=sig.cross.logits.float()))


def _summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ppl", "agreement", "train_s"):
        values = [r[key] for r in rows]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def results_markdown(results: dict[str, Any], config: CrossTokenizerConfig) -> str:
    seeds = len(config.seeds)
    lines = [
        f"teacher {results['teacher']} (vocabulary {results['teacher_vocab']}) -> student with its own tokenizer "
        f"(vocabulary {results['student_vocab']}, {results['shared_tokens']} tokens shared by string); "
        f"{config.train.max_steps} steps, {seeds} seed(s), span policy {config.span_policy}, "
        f"teacher signal: {results.get('teacher_source', 'live')}",
        "",
        "| method | held-out ppl (student tokens) | top-1 agreement at aligned positions | train s |",
        "|---|---|---|---|",
    ]

    def fmt(m: dict[str, Any], key: str, spec: str) -> str:
        std = m.get(f"{key}_std")
        return f"{m[key]:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")

    for name, m in results["methods"].items():
        lines.append(f"| {name} | {fmt(m, 'ppl', '.2f')} | {fmt(m, 'agreement', '.3f')} | {m['train_s']:.0f} |")
    if "cache" in results:
        c = results["cache"]
        lines += ["", f"teacher cache (k={c['k']}, {c['encoding']}): {c['bytes_per_token']:.2f} B per teacher token, "
                      f"of which {c['offsets_bytes_per_token']:.2f} B token offsets; built in {c['build_s']:.0f} s"]
    return "\n".join(lines) + "\n"
