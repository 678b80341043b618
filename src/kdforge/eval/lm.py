"""Task quality of language models: perplexity, next-token calibration, exact match, ROUGE-L,
answer-level calibration, and a one-pass evaluator for a student, its baseline and its teacher.

Formulas (``N`` real tokens, ``log q(x_t | x_<t)`` the model's log-likelihood of token ``t``):

* ``NLL = -(1/N) sum_t log q(x_t | x_<t)``, ``perplexity = exp(NLL)``. Summed over *all* real
  tokens first and divided once (never a mean of per-batch perplexities).
* next-token ECE (Guo et al., "On Calibration of Modern Neural Networks", 2017): top-1
  confidence ``c_t = max_v q(v | x_<t)``, correctness ``[argmax_v q == x_t]``; 15 equal-width
  bins ``((b-1)/15, b/15]``; ``ECE = sum_b (n_b / N) |acc_b - conf_b|``.
* exact match: SQuAD-style normalised string equality (lower case, no punctuation, no articles,
  collapsed whitespace); the max over references.
* ROUGE-L F-measure (Lin, 2004) from Google's ``rouge-score`` package (the reference
  implementation used by most LM papers), the max over references.
* answer-level calibration: for a question with answer options ``a_1..a_n``, the model's option
  probabilities ``softmax_j(log q(a_j | prompt))`` (optionally length-normalised); prediction =
  argmax, confidence = its probability; accuracy, ECE and Brier score over questions.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError, ShapeError
from kdforge.eval.classification import ReliabilityBins
from kdforge.eval.fidelity import FidelityAccumulator, fidelity_on_real_positions

log = logging.getLogger(__name__)

DEFAULT_BINS = 15

__all__ = [
    "IGNORE_INDEX",
    "AnswerCalibration",
    "LMAccumulator",
    "StreamingReliability",
    "answer_calibration",
    "block_batches",
    "data_batches",
    "eval_split",
    "evaluate_language_models",
    "evaluate_lm_suite",
    "results_markdown",
    "exact_match",
    "generate_answers",
    "load_qa_rows",
    "load_texts",
    "load_token_blocks",
    "normalize_answer",
    "perplexity_from_loglik",
    "rouge_l",
    "score_choices",
    "shift_for_next_token",
    "token_logprobs",
]


# ----------------------------------------------------------------------------- perplexity
def perplexity_from_loglik(total_loglik: float, n_tokens: int) -> float:
    """``exp(-total_loglik / n_tokens)``: perplexity from a *summed* log-likelihood (nats).

    >>> round(perplexity_from_loglik(-2 * math.log(4.0), 2), 6)
    4.0
    """
    if n_tokens <= 0:
        raise DataError(
            "perplexity needs at least one real token, got 0",
            "check the evaluation data is not empty and that labels are not all -100",
        )
    return math.exp(-float(total_loglik) / n_tokens)


def shift_for_next_token(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM logits with their targets.

    Args:
        logits: ``[batch, seq, vocab]``; position ``t`` predicts token ``t + 1``.
        input_ids: ``[batch, seq]``.
        attention_mask: ``[batch, seq]`` (1 = real token); padded targets become ``-100``.
        labels: optional ``[batch, seq]`` unshifted labels (Hugging Face convention, ``-100`` =
            not scored), e.g. response-only labels of chat data (:mod:`kdforge.data.chat`); the
            targets are then ``labels[:, 1:]`` instead of ``input_ids[:, 1:]``.

    Returns:
        ``(logits[:, :-1], targets)`` with targets ``[batch, seq - 1]``.
    """
    targets = (input_ids if labels is None else labels.to(input_ids.device))[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return logits[:, :-1], targets


@torch.no_grad()
def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-likelihood, top-1 confidence and top-1 correctness, chunked.

    Args:
        logits: ``[..., vocab]`` (already aligned with ``labels``).
        labels: ``[...]`` int targets, ``-100`` = ignore.

    Returns:
        ``(loglik, confidence, correct)`` each ``[...]`` float32; ignored positions hold 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ShapeError(
            f"logits positions {tuple(logits.shape[:-1])} != labels {tuple(labels.shape)}",
            "shift logits and labels together (see shift_for_next_token)",
        )
    flat = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1)
    ll, conf, corr = [], [], []
    for start in range(0, flat.shape[0], max(chunk_size, 1)):
        lp = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        y = lab[start : start + chunk_size]
        real = y != IGNORE_INDEX
        safe = torch.where(real, y, torch.zeros_like(y)).long()
        top_lp, top_id = lp.max(-1)
        ll.append(torch.where(real, lp.gather(-1, safe[:, None]).squeeze(-1), 0.0))
        conf.append(torch.where(real, top_lp.exp(), 0.0))
        corr.append(torch.where(real, (top_id == safe).float(), 0.0))
    if not ll:
        empty = torch.zeros(labels.shape, device=logits.device)
        return empty, empty.clone(), empty.clone()
    return (
        torch.cat(ll).reshape(labels.shape),
        torch.cat(conf).reshape(labels.shape),
        torch.cat(corr).reshape(labels.shape),
    )


# ----------------------------------------------------------------------------- calibration
@dataclass
class StreamingReliability:
    """Streaming equal-width reliability bins (top-1 confidence vs correctness).

    Same binning as :func:`kdforge.eval.classification.reliability_bins` (bin ``b`` holds
    confidences in ``(b/n, (b+1)/n]``, confidence 0 goes to bin 0), but fed batch by batch so
    millions of tokens never sit in memory. :meth:`result` returns the classification module's
    :class:`~kdforge.eval.classification.ReliabilityBins` (``.ece``, ``.to_dict()`` in the
    ``reliability`` format of ``docs/run-format.md``).
    """

    n_bins: int = DEFAULT_BINS
    count: list[int] = field(default_factory=list)
    conf_sum: list[float] = field(default_factory=list)
    correct_sum: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_bins < 1:
            raise ConfigError(f"n_bins must be >= 1, got {self.n_bins}", "use e.g. 15 bins")
        if not self.count:
            self.count = [0] * self.n_bins
            self.conf_sum = [0.0] * self.n_bins
            self.correct_sum = [0.0] * self.n_bins

    def update(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add ``[N]`` confidences in [0, 1] and ``[N]`` 0/1 correctness."""
        conf = confidence.detach().reshape(-1).double().cpu().clamp(0.0, 1.0)
        corr = correct.detach().reshape(-1).double().cpu()
        idx = (conf * self.n_bins).ceil().long().sub(1).clamp(0, self.n_bins - 1)
        cnt = torch.bincount(idx, minlength=self.n_bins)
        cs = torch.bincount(idx, weights=conf, minlength=self.n_bins)
        ks = torch.bincount(idx, weights=corr, minlength=self.n_bins)
        for b in range(self.n_bins):
            self.count[b] += int(cnt[b])
            self.conf_sum[b] += float(cs[b])
            self.correct_sum[b] += float(ks[b])

    @property
    def total(self) -> int:
        return sum(self.count)

    def accuracy(self) -> float:
        n = self.total
        return sum(self.correct_sum) / n if n else math.nan

    def result(self) -> ReliabilityBins:
        n = self.n_bins
        return ReliabilityBins(
            lower=[b / n for b in range(n)],
            upper=[(b + 1) / n for b in range(n)],
            confidence=[c / k if k else math.nan for c, k in zip(self.conf_sum, self.count)],
            accuracy=[a / k if k else math.nan for a, k in zip(self.correct_sum, self.count)],
            count=list(self.count),
        )

    def ece(self) -> float:
        """``sum_b (n_b / N) |acc_b - conf_b|`` (``nan`` when empty)."""
        return self.result().ece


@dataclass
class LMAccumulator:
    """Streaming LM quality: summed log-likelihood, token accuracy and next-token calibration."""

    n_bins: int = DEFAULT_BINS
    chunk_size: int = 1024
    loglik_sum: float = 0.0
    n_tokens: int = 0
    bins: StreamingReliability = field(init=False)

    def __post_init__(self) -> None:
        self.bins = StreamingReliability(self.n_bins)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add aligned ``[batch, seq, vocab]`` logits and ``[batch, seq]`` labels (-100 ignored)."""
        self.add(token_logprobs(logits, labels, chunk_size=self.chunk_size), labels)

    def add(self, scored: tuple[torch.Tensor, torch.Tensor, torch.Tensor], labels: torch.Tensor) -> None:
        """Add :func:`token_logprobs`' ``(loglik, confidence, correct)`` already computed, so that
        several accumulators (all positions, one domain) share one pass over the vocabulary."""
        ll, conf, corr = scored
        real = labels != IGNORE_INDEX
        self.loglik_sum += float(ll[real].double().sum())
        self.n_tokens += int(real.sum())
        self.bins.update(conf[real], corr[real])

    def compute(self) -> dict[str, float]:
        """``{"nll", "perplexity", "token_accuracy", "ece", "n_tokens"}``."""
        if self.n_tokens == 0:
            return {"nll": math.nan, "perplexity": math.nan, "token_accuracy": math.nan,
                    "ece": math.nan, "n_tokens": 0.0}
        return {
            "nll": -self.loglik_sum / self.n_tokens,
            "perplexity": perplexity_from_loglik(self.loglik_sum, self.n_tokens),
            "token_accuracy": self.bins.accuracy(),
            "ece": self.bins.ece(),
            "n_tokens": float(self.n_tokens),
        }


# ----------------------------------------------------------------------------- generated answers
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_refs(ref: str | Sequence[str]) -> list[str]:
    return [ref] if isinstance(ref, str) else list(ref)


def _check_pairs(predictions: Sequence[str], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions but {len(references)} references",
            "pass one prediction per reference (a reference may be a list of strings)",
        )
    if not predictions:
        raise DataError("no predictions to score", "pass at least one prediction/reference pair")


def exact_match(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, normalize: bool = True
) -> float:
    """Fraction of predictions equal to one of their references (SQuAD-normalised by default)."""
    _check_pairs(predictions, references)
    norm = normalize_answer if normalize else (lambda s: s)
    hits = sum(
        any(norm(p) == norm(r) for r in _as_refs(refs)) for p, refs in zip(predictions, references)
    )
    return hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (``rouge-score``, Porter stemming), max over references."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise ConfigError(
            "ROUGE-L needs the rouge-score package", "pip install rouge-score"
        ) from exc
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for p, refs in zip(predictions, references):
        total += max(scorer.score(r, p)["rougeL"].fmeasure for r in _as_refs(refs))
    return total / len(predictions)


@dataclass
class AnswerCalibration:
    """Answer-level calibration over multiple-choice questions."""

    accuracy: float
    ece: float
    brier: float
    n_questions: int
    reliability: dict[str, list]

    def as_metrics(self, prefix: str = "answer_") -> dict[str, float]:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}ece": self.ece,
                f"{prefix}brier": self.brier}


def answer_calibration(
    choice_logliks: Sequence[Sequence[float]],
    gold: Sequence[int],
    *,
    choice_lengths: Sequence[Sequence[int]] | None = None,
    n_bins: int = DEFAULT_BINS,
) -> AnswerCalibration:
    """Calibration of a model's choice among a given answer set.

    Args:
        choice_logliks: per question, the summed log-likelihood of each option given the prompt.
        gold: per question, the index of the correct option.
        choice_lengths: optional token counts per option; when given the option scores are
            length-normalised (mean log-likelihood per token) before the softmax.
        n_bins: reliability bins over confidence.

    Brier score: ``mean_q sum_j (P_qj - [j == gold_q])^2`` over the option distribution.
    """
    if len(choice_logliks) != len(gold) or not gold:
        raise DataError(
            f"{len(choice_logliks)} option score lists for {len(gold)} gold answers",
            "pass one list of option log-likelihoods per question, and at least one question",
        )
    bins = StreamingReliability(n_bins)
    brier = 0.0
    confs, corrs = [], []
    for i, (scores, g) in enumerate(zip(choice_logliks, gold)):
        s = torch.tensor([float(x) for x in scores], dtype=torch.float64)
        if choice_lengths is not None:
            s = s / torch.tensor([max(int(n), 1) for n in choice_lengths[i]], dtype=torch.float64)
        if not 0 <= int(g) < s.numel():
            raise DataError(
                f"question {i}: gold index {g} outside its {s.numel()} options",
                "gold must be a 0-based index into that question's choices",
            )
        probs = torch.softmax(s, dim=0)
        pred = int(probs.argmax())
        onehot = torch.zeros_like(probs)
        onehot[int(g)] = 1.0
        brier += float(((probs - onehot) ** 2).sum())
        confs.append(float(probs[pred]))
        corrs.append(float(pred == int(g)))
    bins.update(torch.tensor(confs), torch.tensor(corrs))
    return AnswerCalibration(
        accuracy=bins.accuracy(), ece=bins.ece(), brier=brier / len(gold),
        n_questions=len(gold), reliability=bins.result().to_dict(),
    )


@torch.no_grad()
def score_choices(
    model: torch.nn.Module, tokenizer: Any, prompt: str, choices: Sequence[str]
) -> tuple[list[float], list[int]]:
    """Summed log-likelihood of each continuation ``choice`` after ``prompt``, and its length.

    The prompt and prompt+choice are tokenised separately; the choice tokens are those past the
    prompt's tokens (tokenisers that merge across the boundary are handled by comparing the
    common prefix).
    """
    device = next(model.parameters()).device
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    scores, lengths = [], []
    for choice in choices:
        ids = tokenizer(prompt + choice, add_special_tokens=True)["input_ids"]
        start = 0
        while start < min(len(p_ids), len(ids)) and p_ids[start] == ids[start]:
            start += 1
        start = max(start, 1)
        if start >= len(ids):
            raise DataError(
                f"choice {choice!r} adds no token after the prompt",
                "make each choice a non-empty continuation (e.g. start it with a space)",
            )
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits.float()
        lp = torch.log_softmax(logits[0, start - 1 : len(ids) - 1], dim=-1)
        tgt = x[0, start:]
        scores.append(float(lp.gather(-1, tgt[:, None]).sum()))
        lengths.append(len(ids) - start)
    return scores, lengths


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    stop: str | None = "\n",
) -> list[str]:
    """Greedy answers to ``prompts`` (one at a time, so no padding side issues); cut at ``stop``."""
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        if stop:
            text = text.split(stop)[0] if text.strip() else text
        answers.append(text.strip())
    return answers


# ----------------------------------------------------------------------------- data
#: splits ``kdforge eval`` reads when none is named, in order of preference
EVAL_SPLITS = ("test", "validation", "eval", "train")


def eval_split(spec: Any) -> Any:
    """The raw rows to evaluate on: the held-out part when the spec names one (``eval_split``,
    ``eval_fraction`` or ``eval_files``, as :func:`kdforge.data.load` splits it, so a run and its
    evaluation hold out the same rows); else the spec's ``split`` when it was set, else the first of
    :data:`EVAL_SPLITS` the source has (else its first split).

    Raises:
        DataError: the source cannot be read, or has no such split.
    """
    from kdforge.data import load, parse_spec
    from kdforge.data.sources import read_splits

    spec = parse_spec(spec)
    if any(getattr(spec, k) is not None for k in ("eval_split", "eval_fraction", "eval_files")):
        return load(spec)["eval"]
    splits = read_splits(spec)
    if "split" in spec.model_fields_set:
        name = spec.split
    else:
        name = next((n for n in EVAL_SPLITS if n in splits), next(iter(splits), spec.split))
    if name not in splits:
        raise DataError(f"{spec.path} has no split {name!r} (splits: {', '.join(splits) or 'none'})",
                        "pass --split with one of those")
    ds = splits[name]
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return ds


def load_texts(path: str | Path, *, text_field: str = "text", split: str | None = None) -> list[str]:
    """Texts of a data source read by the data layer (:mod:`kdforge.data.sources`): a ``.txt``
    file is one document (the package's ``.txt`` rule), ``.jsonl``/``.csv``/``.parquet`` rows give
    their ``text_field``, a ``save_to_disk`` folder its ``split`` (default test, else validation)."""
    from kdforge.data import parse_spec

    spec = parse_spec({"path": str(path), "text_field": text_field, **({"split": split} if split else {})})
    ds = eval_split(spec)
    if text_field not in ds.column_names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {ds.column_names})",
                        "pass --text-field with the name of the text column")
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"no text found in {path}", "check the file is non-empty and the text field name")
    return texts


def data_batches(
    spec: Any,
    tokenizer: Any,
    *,
    block_size: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    domain: str | None = None,
    packing: bool | None = None,
) -> list[dict[str, Any]]:
    """Evaluation batches of any data the data layer reads (:mod:`kdforge.data`).

    Rows are rendered by :func:`kdforge.data.chat.tokenize_dataset` with their labels: every
    token of plain text, only completion / assistant tokens of prompt-completion and chat data
    (``train_on: completion``), so perplexity, accuracy, ECE and fidelity count response tokens
    only. ``packing`` (default: on for text, off otherwise, or the spec's ``packing`` when set):
    the rendered examples are concatenated and cut into ``[n, block_size]`` blocks (at least one,
    possibly short, block), as before the data layer; otherwise each example is its own row,
    right-padded per batch (labels ``-100`` on padding). ``max_tokens`` keeps the first tokens
    (packed) or the first examples whose tokens fit (at least one).
    """
    from kdforge.data import parse_spec, tokenize_dataset
    from kdforge.data.chat import detect_format
    from kdforge.data.collate import pad_batch, pad_token_id

    spec = parse_spec(spec)
    rows = eval_split(spec)
    fmt = detect_format(rows.column_names, spec)
    if packing is None:
        packing = spec.packing if "packing" in spec.model_fields_set else fmt == "text"
    try:
        rendered = tokenize_dataset(rows, tokenizer, spec, name="eval")
    except DataError as exc:
        if "empty after rendering" not in exc.problem:
            raise
        raise DataError(f"{spec.path} has fewer than 2 tokens to evaluate ({exc.problem})",
                        f"pass more evaluation text; {exc.fix}") from None
    ids_rows, label_rows = rendered["input_ids"], rendered["labels"]
    if packing:
        ids = [t for r in ids_rows for t in r]
        labels = [t for r in label_rows for t in r]
        if max_tokens is not None:
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        id_blocks = _to_blocks(torch.tensor(ids, dtype=torch.long), block_size)
        label_blocks = _to_blocks(torch.tensor(labels, dtype=torch.long), block_size)
        out = batches_from_blocks(id_blocks, batch_size=batch_size, domain=domain)
        if fmt != "text":  # plain text scores every token: labels == input_ids, nothing to carry
            for batch, lab in zip(out, label_blocks.split(max(batch_size, 1))):
                batch["labels"] = lab
        return out
    examples, total = [], 0
    for ids, labels in zip(ids_rows, label_rows):
        if max_tokens is not None and examples and total + len(ids) > max_tokens:
            break
        examples.append({"input_ids": ids, "labels": labels})
        total += len(ids)
    pad = pad_token_id(tokenizer)
    out = []
    for start in range(0, len(examples), max(batch_size, 1)):
        batch: dict[str, Any] = dict(pad_batch(examples[start : start + batch_size], pad_token_id=pad))
        if domain is not None:
            batch["domain"] = domain
        out.append(batch)
    return out


def _read_jsonl(p: Path) -> Iterator[dict]:
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p} line {i + 1} is not valid JSON ({exc.msg})", "fix or remove that line") from exc


def load_token_blocks(path: str | Path, *, block_size: int) -> torch.Tensor:
    """Token ids from a raw token-id file: ``.jsonl`` rows with ``input_ids``, ``.npy`` (1-D
    stream or 2-D blocks) or ``.pt`` (a tensor). 1-D streams are cut into ``[n, block_size]``."""
    p = Path(path)
    if p.suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(p)).long()
    elif p.suffix == ".pt":
        ids = torch.load(p, weights_only=True).long()
    elif p.suffix == ".jsonl":
        rows = [r["input_ids"] for r in _read_jsonl(p) if "input_ids" in r]
        if not rows:
            raise DataError(f"{p} has no rows with 'input_ids'", "write one {\"input_ids\": [...]} per line")
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    else:
        raise DataError(f"unknown token-id file type {p.suffix!r}", "use .npy, .pt or .jsonl with input_ids")
    return _to_blocks(ids, block_size)


def _to_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    if ids.dim() == 2:
        return ids
    if ids.dim() != 1:
        raise DataError(f"token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}", "flatten them")
    if ids.numel() < 2:
        raise DataError("fewer than 2 tokens to evaluate", "pass more evaluation text")
    if ids.numel() < block_size:
        return ids[None]
    n = ids.numel() // block_size
    return ids[: n * block_size].reshape(n, block_size)


def block_batches(
    tokenizer: Any,
    texts: Iterable[str],
    *,
    block_size: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    domain: str | None = None,
) -> list[dict[str, Any]]:
    """Concatenate tokenised texts (separated by EOS when the tokenizer has one) and cut them into
    ``[batch_size, block_size]`` batches, keeping at most ``max_tokens`` tokens."""
    stream: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    blocks = _to_blocks(torch.tensor(stream, dtype=torch.long), block_size)
    return batches_from_blocks(blocks, batch_size=batch_size, domain=domain)


def batches_from_blocks(
    blocks: torch.Tensor, *, batch_size: int = 8, domain: str | None = None
) -> list[dict[str, Any]]:
    """``[n, L]`` id blocks -> list of ``{"input_ids", "attention_mask"}`` batches (tagged with
    ``"domain"`` when given, for per-domain breakdowns)."""
    out: list[dict[str, Any]] = []
    for b in blocks.split(max(batch_size, 1)):
        batch: dict[str, Any] = {"input_ids": b, "attention_mask": torch.ones_like(b)}
        if domain is not None:
            batch["domain"] = domain
        out.append(batch)
    return out


def load_qa_rows(path: str | Path) -> list[dict[str, Any]]:
    """QA rows from a ``.jsonl`` file: ``prompt`` plus ``answer`` (string or list of strings)
    and/or ``choices`` (list of strings) with ``gold`` (0-based index of the right choice)."""
    rows = list(_read_jsonl(Path(path)))
    if not rows:
        raise DataError(f"no QA rows in {path}", "write one JSON object per line")
    for i, r in enumerate(rows):
        if "prompt" not in r or not ("answer" in r or "choices" in r):
            raise DataError(
                f"{path} line {i + 1} needs 'prompt' and 'answer' or 'choices'+'gold'",
                'e.g. {"prompt": "Q: ... A:", "answer": "Paris"}',
            )
        if "choices" in r and "gold" not in r:
            raise DataError(f"{path} line {i + 1} has choices but no 'gold' index", "add 'gold': <index>")
    return rows


# ----------------------------------------------------------------------------- one-pass evaluator
def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.no_grad()
def evaluate_language_models(
    models: Mapping[str, torch.nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    teacher: str | None = None,
    n_bins: int = DEFAULT_BINS,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Perplexity, token accuracy, next-token ECE and (with a teacher) fidelity in one pass.

    The teacher runs once per batch and every other model is compared with that batch's teacher
    logits, so each batch holds at most two models' logits at a time.

    Args:
        models: name -> causal LM (``model(input_ids=..., attention_mask=...).logits``).
        batches: dicts with ``input_ids`` ``[B, L]`` and optional ``attention_mask`` and
            ``labels`` (unshifted, ``-100`` = not scored: only response tokens of chat or
            prompt/completion data count towards every metric, fidelity included).
        teacher: the key of ``models`` that is the teacher (fidelity is measured against it).
        vocab_size: compare only the first ``vocab_size`` logits (the shared tokenizer
            vocabulary) when models pad their embedding matrices differently.

    Returns:
        name -> ``{"metrics": {...}, "reliability": {...}}``; fidelity keys (``agreement``,
        ``kl_to_teacher``, ``kl_from_teacher``, ``js_to_teacher``) for non-teacher models.
        Batches carrying a ``"domain"`` string add ``"breakdowns"``: perplexity (and agreement)
        per domain.
    """
    if teacher is not None and teacher not in models:
        raise ConfigError(f"teacher {teacher!r} is not one of the models {list(models)}", "name the teacher's key")
    lm_acc = {name: LMAccumulator(n_bins=n_bins, chunk_size=chunk_size) for name in models}
    fid_acc = {name: FidelityAccumulator(chunk_size=chunk_size) for name in models if name != teacher}
    dom_lm: dict[str, dict[str, LMAccumulator]] = {name: {} for name in models}
    dom_fid: dict[str, dict[str, FidelityAccumulator]] = {name: {} for name in models}
    order = ([teacher] if teacher else []) + [n for n in models if n != teacher]
    n_batches = 0
    warned_width = False
    for batch in batches:
        n_batches += 1
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        domain = batch.get("domain")
        t_logits = None
        for name in order:
            model = models[name]
            dev = _model_device(model)
            kwargs = {"input_ids": ids.to(dev)}
            if mask is not None:
                kwargs["attention_mask"] = mask.to(dev)
            extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
            logits = model(**kwargs, **extra).logits  # no KV cache: one scoring pass
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            s_logits, labels = shift_for_next_token(logits, kwargs["input_ids"], kwargs.get("attention_mask"),
                                                    batch.get("labels"))
            scored = token_logprobs(s_logits, labels, chunk_size=chunk_size)  # once per batch
            lm_acc[name].add(scored, labels)
            if domain is not None:
                dom_lm[name].setdefault(str(domain), LMAccumulator(n_bins=n_bins, chunk_size=chunk_size)).add(
                    scored, labels)
            if name == teacher:
                t_logits = s_logits
            elif t_logits is not None:
                if int(t_logits.shape[-1]) != int(s_logits.shape[-1]):
                    v = min(int(t_logits.shape[-1]), int(s_logits.shape[-1]))
                    if not warned_width:
                        warned_width = True
                        log.warning(
                            "teacher and %s logits differ in width (%d vs %d); comparing the first "
                            "%d (pass vocab_size=len(tokenizer) to make this explicit)",
                            name, t_logits.shape[-1], s_logits.shape[-1], v,
                        )
                    t_cmp, s_cmp = t_logits[..., :v], s_logits[..., :v]
                else:
                    t_cmp, s_cmp = t_logits, s_logits
                real = labels != IGNORE_INDEX  # response tokens only on chat data: skip the rest's divergences
                per = fidelity_on_real_positions(s_cmp, t_cmp.to(s_cmp.device), real, chunk_size=chunk_size)
                fid_acc[name].add(per, real)
                if domain is not None:
                    dom_fid[name].setdefault(str(domain), FidelityAccumulator(chunk_size=chunk_size)).add(
                        per, real)
            del logits, s_logits
    if n_batches == 0:
        raise DataError("no evaluation batches", "pass non-empty evaluation data")
    out: dict[str, dict[str, Any]] = {}
    for name in models:
        metrics: dict[str, Any] = dict(lm_acc[name].compute())
        if name in fid_acc and teacher is not None:
            fid = fid_acc[name].compute("token")
            fid.pop("n_tokens", None)
            metrics.update(fid)
        out[name] = {"metrics": metrics, "reliability": lm_acc[name].bins.result().to_dict()}
        if dom_lm[name]:
            bd = {"perplexity by domain": {d: a.compute()["perplexity"] for d, a in dom_lm[name].items()}}
            if dom_fid[name]:
                bd["agreement by domain"] = {d: a.compute()["agreement"] for d, a in dom_fid[name].items()}
            out[name]["breakdowns"] = bd
    return out


# ----------------------------------------------------------------------------- full suite
ROLES = ("teacher", "baseline", "student")


@torch.no_grad()
def evaluate_lm_suite(
    models: Mapping[str, tuple[str, torch.nn.Module]],
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    tokenizer: Any = None,
    qa_rows: Sequence[Mapping[str, Any]] | None = None,
    measure_cost: bool = True,
    latency_repeats: int = 20,
    max_new_tokens: int = 32,
    n_bins: int = DEFAULT_BINS,
    chunk_size: int = 1024,
    data_description: str | None = None,
) -> dict[str, Any]:
    """Evaluate a teacher, baselines and students the same way; return ``results.json`` content.

    Args:
        models: name -> ``(role, model)``; role is ``teacher`` (at most one), ``baseline`` or
            ``student``. Fidelity is measured against the teacher when there is one.
        batches: LM evaluation batches (see :func:`block_batches`).
        tokenizer: needed for ``qa_rows``.
        qa_rows: rows from :func:`load_qa_rows`: generated answers are scored with exact match
            and ROUGE-L; rows with ``choices`` + ``gold`` give answer-level calibration.
        measure_cost: parameters and size (``kdforge.eval.cost``), and latency of one forward
            pass over one ``[1, block]`` batch; speed-up and compression against the teacher.

    Returns:
        ``{"recipe": "eval", "created", "primary_metric": "perplexity", "higher_is_better":
        False, "models": [...]}`` in the layout of ``docs/run-format.md``.
    """
    import datetime as _dt

    from kdforge.eval.cost import cost_report

    teachers = [n for n, (role, _) in models.items() if role == "teacher"]
    for name, (role, _) in models.items():
        if role not in ROLES:
            raise ConfigError(f"model {name!r} has role {role!r}", f"use one of {', '.join(ROLES)}")
    if len(teachers) > 1:
        raise ConfigError(f"{len(teachers)} teachers given ({teachers})", "evaluate against one teacher at a time")
    teacher = teachers[0] if teachers else None
    if not batches:
        raise DataError("no evaluation batches", "pass non-empty evaluation data")
    lm = evaluate_language_models({n: m for n, (_, m) in models.items()}, batches, teacher=teacher,
                                  n_bins=n_bins, chunk_size=chunk_size)
    entries = []
    for name, (role, model) in models.items():
        metrics: dict[str, Any] = dict(lm[name]["metrics"])
        entry: dict[str, Any] = {"name": name, "role": role}
        if qa_rows:
            if tokenizer is None:
                raise ConfigError("QA evaluation needs a tokenizer", "pass --tokenizer (or a model folder with one)")
            metrics.update(_qa_metrics(model, tokenizer, qa_rows, max_new_tokens=max_new_tokens, n_bins=n_bins))
        if measure_cost:
            example = {k: v[:1].to(_model_device(model)) for k, v in batches[0].items()
                       if isinstance(v, torch.Tensor) and k != "labels"}
            cost = cost_report(model, example, warmup=2, repeats=max(latency_repeats, 1))
            entry["params"] = cost["params"]
            entry["size_mb"] = cost["size_mb"]
            metrics.update({"params": float(cost["params"]), "size_mb": cost["size_mb"],
                            "latency_ms": cost["latency_ms_p50"], "latency_ms_p95": cost["latency_ms_p95"],
                            "tokens_per_s": cost["throughput_per_s"] * example["input_ids"].shape[1]})
        entry["metrics"] = metrics
        entry["reliability"] = lm[name]["reliability"]
        if "breakdowns" in lm[name]:
            entry["breakdowns"] = lm[name]["breakdowns"]
        entries.append(entry)
    if teacher is not None and measure_cost:
        t = next(e for e in entries if e["name"] == teacher)["metrics"]
        for e in entries:
            if e["name"] != teacher:
                e["metrics"]["speedup_vs_teacher"] = t["latency_ms"] / e["metrics"]["latency_ms"]
                e["metrics"]["compression_vs_teacher"] = t["params"] / max(e["metrics"]["params"], 1.0)
    entries.sort(key=lambda e: ROLES.index(e["role"]))
    return {
        "recipe": "eval",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "primary_metric": "perplexity",
        "higher_is_better": False,
        "data": data_description,
        "n_tokens": int(next(iter(lm.values()))["metrics"]["n_tokens"]),
        "models": entries,
    }


def _qa_metrics(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                max_new_tokens: int, n_bins: int) -> dict[str, float]:
    out: dict[str, float] = {}
    gen_rows = [r for r in rows if "answer" in r]
    if gen_rows:
        preds = generate_answers(model, tokenizer, [r["prompt"] for r in gen_rows], max_new_tokens=max_new_tokens)
        refs = [r["answer"] for r in gen_rows]
        out["exact_match"] = exact_match(preds, refs)
        out["rouge_l"] = rouge_l(preds, refs)
    mc_rows = [r for r in rows if "choices" in r]
    if mc_rows:
        scores, lengths = zip(*(score_choices(model, tokenizer, r["prompt"], r["choices"]) for r in mc_rows))
        cal = answer_calibration(list(scores), [int(r["gold"]) for r in mc_rows], n_bins=n_bins)
        out.update(cal.as_metrics())
    return out


def results_markdown(results: Mapping[str, Any]) -> str:
    """The ``results.md`` table of a results dict (same numbers as ``results.json``)."""
    from kdforge.eval.report import fmt

    keys: set[str] = set()
    for m in results["models"]:
        keys |= set(m["metrics"])
    cols = fmt.ordered_metric_keys(keys, results.get("primary_metric")) + [
        k for k in fmt.COST_KEYS if k in keys]
    lines = ["| model | role | " + " | ".join(fmt.label(k) for k in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for m in results["models"]:
        vals = [fmt.fmt_value(k, m["metrics"].get(k)) for k in cols]
        lines.append(f"| {m['name']} | {m['role']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
