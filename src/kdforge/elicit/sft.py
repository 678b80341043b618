"""Sequence-level KD: fine-tune a student on the teacher's generations (``kdforge sft``).

Kim & Rush (2016), "Sequence-Level Knowledge Distillation": instead of matching the teacher's
token distributions, the student is trained with cross-entropy on the teacher's *outputs*
(black-box KD; the only option with a hosted teacher). The loss covers the response tokens
only: the prompt is rendered exactly as at generation time (chat template for chat prompts),
its tokens are masked with ``-100``, and the response is followed by EOS so the student
learns to stop.

Input: a generation output folder (``kdforge generate``), a ``curated.jsonl`` from curation,
or any JSONL with ``prompt`` (text or messages) and ``text`` (response) fields. Training runs
on :class:`kdforge.train.Distiller` (``CausalLMTask``, ``cross_entropy``), so checkpoints,
resume, ``metrics.jsonl`` and mixed precision follow the trainer's contract.

Per-sample weights (``weight_field``, default ``"weight"``: curation's weight, or a column of
the rows): when present, the loss is the weighted token mean (:class:`WeightedCausalLMTask`)

.. math::  \mathcal{L} = \frac{\sum_b w_b \sum_t \ell_{bt}}{\sum_b w_b n_b}

over the whole accumulated batch (``n_b`` = response tokens of sample ``b``, ``\ell_{bt}`` its
token cross-entropies), so a weight of 2 is exactly a duplicated sample and a weight of 0
contributes nothing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.errors import ConfigError, DataError
from kdforge.train.tasks import IGNORE_INDEX, CausalLMTask, TaskOutput

log = logging.getLogger(__name__)


def load_sft_records(path: str | Path, weight_field: str | None = "weight",
                     rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """(prompt, response[, weight]) records from a generation folder, curated.jsonl or a JSONL file.

    Curated items (``{"row": record, "weight": w}``) are unwrapped; rows with an empty
    response are skipped. ``weight_field``: the per-sample weight, read from the curated item
    or else from the row; when no row has it the records are unweighted (no ``weight`` key),
    when only some have it, or a weight is not a finite number ``>= 0``, it is a DataError.
    ``None`` ignores weights. ``rows``: records already read from ``path`` (by the data layer).
    """
    from kdforge.elicit.data import read_table

    p = Path(path)
    if rows is None:
        rows = read_table(p)
    out = []
    for r in rows:
        rec = r.get("row", r) if isinstance(r.get("row"), dict) else r
        if "prompt" not in rec or "text" not in rec:
            raise DataError(f"{p}: records need 'prompt' and 'text' fields (got {sorted(rec)})",
                            "give a `kdforge generate` output folder or a JSONL of {prompt, text}, or data "
                            "the data layer reads (chat messages, prompt/completion; docs/data.md)")
        if str(rec["text"]).strip():
            item: dict[str, Any] = {"prompt": rec["prompt"], "text": str(rec["text"])}
            if weight_field is not None:
                w = r[weight_field] if weight_field in r else rec.get(weight_field)
                if w is not None:
                    item["weight"] = _check_weight(w, p, len(out))
            out.append(item)
    return _check_weighted(out, p, weight_field)


def _check_weighted(out: list[dict[str, Any]], p: Path, weight_field: str | None) -> list[dict[str, Any]]:
    if not out:
        raise DataError(f"{p} has no non-empty responses", "check the generation output")
    weighted = sum("weight" in x for x in out)
    if weighted and weighted < len(out):
        raise DataError(f"{p}: {len(out) - weighted} of {len(out)} records have no {weight_field!r} field",
                        "give every record a weight, or train unweighted with weight_field=None "
                        "(CLI: --weight-field none)")
    if weighted and not any(x["weight"] > 0 for x in out):
        raise DataError(f"{p}: every {weight_field!r} is 0, nothing would be learned",
                        "check the curation settings, or train unweighted (--weight-field none)")
    return out


def _check_weight(w: Any, path: Path, i: int) -> float:
    try:
        value = float(w)
    except (TypeError, ValueError):
        raise DataError(f"{path}: record {i} has a non-numeric weight {w!r}",
                        "weights must be numbers >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{path}: record {i} has weight {w!r}", "weights must be finite numbers >= 0")
    return value


def build_sft_examples(records: list[dict[str, Any]], tokenizer: Any, max_length: int, *,
                       chat_template: str | None = None) -> list[dict[str, Any]]:
    """Tokenize (prompt, response) pairs with the data layer's prompt/completion rendering
    (:func:`kdforge.data.chat.render_prompt_completion`): ``input_ids``, ``labels`` (-100 on the
    prompt; the response ends with EOS), and ``weight`` when the record has one. A chat prompt (a
    message list) is rendered with the chat template and its generation prompt, as it was sent.

    Prompts of ``max_length`` tokens or more leave no room for the response: those records are
    dropped (logged); responses are truncated to fit.
    """
    from kdforge.data.chat import render_prompt_completion, truncate

    examples, dropped = [], 0
    for rec in records:
        rendered = truncate(render_prompt_completion(rec["prompt"], rec["text"], tokenizer,
                                                     chat_template=chat_template), max_length)
        if all(t == IGNORE_INDEX for t in rendered.labels):
            dropped += 1
            continue
        ex: dict[str, Any] = {"input_ids": rendered.input_ids, "labels": rendered.labels}
        if "weight" in rec:
            ex["weight"] = float(rec["weight"])
        examples.append(ex)
    if dropped:
        log.warning("dropped %d record(s) whose prompt alone exceeds max_length=%d", dropped, max_length)
    if not examples:
        raise DataError("no training examples fit in max_length", "raise --max-length")
    return examples


def _is_record_table(columns: Sequence[str], spec: Any) -> bool:
    """Rows of a generation output / curation (``prompt`` + ``text``, or ``{row, weight}``) rather
    than data for the data layer's formats."""
    cols = set(columns)
    if "row" in cols:
        return True
    layer_fields = {spec.messages_field, spec.completion_field}
    return spec.format is None and {"prompt", "text"} <= cols and not cols & layer_fields


def sft_examples(spec: Any, tokenizer: Any, *, max_length: int = 512, weight_field: str | None = "weight",
                 records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Training examples of ``kdforge sft`` from a data spec (:class:`kdforge.data.DataSpec`).

    Generation outputs and curated files (records of ``prompt`` + ``text``) go through
    :func:`load_sft_records` / :func:`build_sft_examples`; any other data (chat ``messages``,
    prompt/completion, text) through :func:`kdforge.data.chat.tokenize_dataset` with
    response-only labels. ``weight_field`` is read from either when present.
    """
    from kdforge.data import parse_spec

    spec = parse_spec(spec)
    if records is None:
        kind, payload = sft_source(spec, weight_field)
    else:
        kind, payload = "records", records
    if kind == "records":
        return build_sft_examples(payload, tokenizer, spec.max_length or max_length, chat_template=spec.chat_template)
    return _rows_examples(spec, tokenizer, payload, max_length, weight_field)


def _rows_examples(spec: Any, tokenizer: Any, ds: Any, max_length: int, weight_field: str | None) -> list[dict[str, Any]]:
    """Examples of data-layer rows (chat, prompt/completion, text): response-only labels."""
    from kdforge.data.chat import tokenize_dataset

    limit = spec.max_length or max_length
    keep = [weight_field] if weight_field and weight_field in ds.column_names else []
    rendered = tokenize_dataset(ds, tokenizer, spec.model_copy(update={"max_length": limit}), keep=keep)
    examples = []
    for i, row in enumerate(rendered):
        ex: dict[str, Any] = {"input_ids": row["input_ids"], "labels": row["labels"]}
        if keep:
            if row[weight_field] is None:
                raise DataError(f"{spec.path}: row {i} has no {weight_field!r}",
                                "give every row a weight, or train unweighted (--weight-field none)")
            ex["weight"] = _check_weight(row[weight_field], Path(spec.path), i)
        examples.append(ex)
    if keep and not any(e["weight"] > 0 for e in examples):
        raise DataError(f"{spec.path}: every {weight_field!r} is 0, nothing would be learned",
                        "train unweighted (--weight-field none)")
    return examples


def sft_source(spec: Any, weight_field: str | None = "weight") -> tuple[str, Any]:
    """``("records", [...])`` for generation outputs and curated files, else ``("rows", Dataset)``:
    the data read (through the data layer) before any model is loaded, so a data mistake fails fast.

    Raises:
        DataError: the data does not exist or cannot be read.
    """
    from kdforge.data.sources import BUILDERS, load
    from kdforge.elicit.data import _is_generation_output, _plain_rows

    p = Path(spec.path).expanduser()
    if _is_generation_output(p):
        return "records", load_sft_records(p, weight_field)
    if not p.exists() and (p.suffix.lower() in BUILDERS or spec.path.startswith((".", "/", "~"))):
        raise DataError(f"data file not found: {p}",
                        "check data.path (relative paths start at the working directory)")
    ds = load(spec)["train"]
    if _is_record_table(ds.column_names, spec):
        return "records", load_sft_records(p, weight_field, rows=_plain_rows(ds))
    return "rows", ds


def pack_examples(examples: list[dict[str, Any]], block_size: int, *,
                  mask_document_starts: bool = False) -> list[dict[str, Any]]:
    """Examples packed into full blocks of ``block_size`` tokens, labels carried along
    (:func:`kdforge.data.collate.pack_sequences`: response-only masks survive, the tail that does
    not fill a block is dropped). ``packing: true`` in the data spec; padding per batch otherwise.

    Raises:
        ConfigError: the examples are weighted (a weight belongs to one sample, not to a block).
        DataError: fewer tokens than one block.
    """
    from kdforge.data.collate import pack_sequences

    if any("weight" in ex for ex in examples):
        raise ConfigError("per-sample weights cannot be packed: a block mixes samples",
                          "set packing: false (the default), or train unweighted (--weight-field none)")
    packed = pack_sequences([ex["input_ids"] for ex in examples], [ex["labels"] for ex in examples], block_size,
                            mask_document_starts=mask_document_starts)
    if not packed["input_ids"]:
        raise DataError(f"the data holds fewer tokens than one block of {block_size}",
                        "use more data, a smaller block_size, or packing: false")
    log.info("packed %d examples into %d blocks of %d tokens", len(examples), len(packed["input_ids"]), block_size)
    return [{"input_ids": i, "labels": y} for i, y in zip(packed["input_ids"], packed["labels"])]


WEIGHT_SCALE = 1000


class WeightedCausalLMTask(CausalLMTask):
    """:class:`~kdforge.train.CausalLMTask` with a weight per sample: its loss term
    ``weighted_cross_entropy`` is the weighted token mean (module docstring), normalised by the
    weighted real tokens of the whole accumulated batch.

    Batches carry ``weight`` ``[B]`` (:func:`weighted_collate`). The trainer divides each term
    by the integer count :meth:`count` returns for the accumulated batch, so the task counts
    weighted tokens in fixed point, ``round(SCALE * sum_b w_b n_b)``, and its term is
    ``SCALE * sum_b w_b sum_t l_bt``: the ratio is the weighted mean (relative rounding error
    below ``1 / (2 * SCALE * sum_b w_b n_b)``; exact for integer weights). Logged throughput is
    therefore in ``weighted_tokens_x1000`` per second.
    """

    scale = WEIGHT_SCALE
    unit = f"weighted_tokens_x{WEIGHT_SCALE}"
    term_names = ("weighted_cross_entropy",)

    @staticmethod
    def _weights(batch: Mapping[str, Any]) -> torch.Tensor:
        if "weight" not in batch:
            raise DataError("a weighted SFT batch has no 'weight'", "collate with weighted_collate")
        return batch["weight"]

    def count(self, batch: Mapping[str, Any]) -> int:
        n = (self.shifted_labels(batch) != IGNORE_INDEX).sum(dim=1).double()
        return int(round(float((n * self._weights(batch).double().to(n.device)).sum()) * self.scale))

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Mapping[str, Any], *,
                extras: Mapping[str, nn.Module] | None = None, chunked: bool = False) -> TaskOutput:
        if chunked:
            raise ConfigError("weighted SFT does not support chunked=True", "set chunked=False")
        out = super().forward(student, teacher, batch, extras=extras, chunked=False)
        logits, labels = out.student_logits, out.labels
        assert logits is not None and labels is not None
        tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        w = self._weights(batch).to(device=tok.device, dtype=tok.dtype)
        out.extra_terms["weighted_cross_entropy"] = (tok * out.mask * w[:, None]).sum() * self.scale
        return out


def weighted_collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """:func:`kdforge.data.text.lm_collate` plus ``weight`` ``[B]`` float32."""
    from kdforge.data.text import lm_collate

    out = lm_collate([{k: v for k, v in ex.items() if k != "weight"} for ex in batch], pad_token_id=pad_token_id)
    out["weight"] = torch.tensor([float(ex["weight"]) for ex in batch], dtype=torch.float32)
    return out


def run_sft(data: str | Path, student: str, output_dir: str | Path, *, tokenizer: str | None = None,
            max_length: int = 512, train: dict[str, Any] | None = None,
            weight_field: str | None = "weight", data_spec: Any = None) -> dict[str, Any]:
    """Fine-tune ``student`` (HF folder or Hub id) on teacher generations or any data the data
    layer reads; save it under ``output_dir/student``; return the final training metrics.

    ``data_spec``: a :class:`kdforge.data.DataSpec` (or mapping) read instead of ``data`` (e.g.
    chat ``messages`` or a prompt/completion csv with its field names); the loss covers completion
    / assistant tokens only. ``weight_field``: per-sample weights (see :func:`load_sft_records`);
    when the data has them the loss is the weighted token mean (:class:`WeightedCausalLMTask`),
    otherwise plain response-token cross-entropy.
    """
    from kdforge.data import parse_spec
    from kdforge.data.text import lm_collate
    from kdforge.io import write_json_atomic
    from kdforge.models import ModelSource, load_causal_lm, load_tokenizer
    from kdforge.train import Distiller

    out = Path(output_dir)
    spec = parse_spec(data_spec if data_spec is not None else {"path": str(data)})
    source = sft_source(spec, weight_field)  # the cheap checks first: a bad data path fails before any model loads
    # kdforge.models: asset names, folders and Hub ids read (and refused) like `kdforge run`'s student
    tok = load_tokenizer(ModelSource(model=tokenizer or student), what="student" if tokenizer is None else "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if source[0] == "records":
        examples = build_sft_examples(source[1], tok, spec.max_length or max_length, chat_template=spec.chat_template)
    else:
        examples = _rows_examples(spec, tok, source[1], max_length, weight_field)
    if spec.packing:
        examples = pack_examples(examples, spec.block_size or spec.max_length or max_length,
                                 mask_document_starts=spec.mask_document_starts)
    model = load_causal_lm(ModelSource(model=student, device="cpu", dtype="float32"), what="student")  # the trainer places it
    cfg = {"batch_size": 8, "lr": 5e-5, "scheduler": "cosine", "warmup_steps": 0,
           **(train or {}), "output_dir": str(out)}
    if cfg.get("max_steps") is None and cfg.get("epochs") is None:
        cfg["epochs"] = 1
    weighted = "weight" in examples[0]
    if weighted:
        task: CausalLMTask = WeightedCausalLMTask()
        objective = [{"name": "weighted_cross_entropy", "source": "task", "weight": 1.0}]
        collate = lambda b: weighted_collate(b, pad_token_id=tok.pad_token_id)  # noqa: E731
        log.info("per-sample weights from %r: sum %.3f over %d examples", weight_field,
                 sum(e["weight"] for e in examples), len(examples))
    else:
        task, objective = CausalLMTask(), [{"name": "cross_entropy", "weight": 1.0}]
        collate = lambda b: lm_collate(b, pad_token_id=tok.pad_token_id)  # noqa: E731
    d = Distiller(model, None, task=task, objective=objective, config=cfg, train_data=examples, collate_fn=collate)
    state = d.train()
    path = d.save_student(out / "student")
    tok.save_pretrained(path)
    summary = {"task": "sft", "examples": len(examples), "student": str(path),
               "weighted": weighted, "weight_field": weight_field if weighted else None,
               "steps": getattr(state, "step", None), "data": str(spec.path)}
    write_json_atomic(out / "sft_summary.json", summary)
    log.info("SFT finished: %s", json.dumps(summary))
    return summary
