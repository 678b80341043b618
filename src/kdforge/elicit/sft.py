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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kdforge.errors import AssetError, ConfigError, DataError

log = logging.getLogger(__name__)


def load_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """(prompt, response) records from a generation folder, curated.jsonl or a JSONL file.

    Curated items (``{"row": record, "weight": w}``) are unwrapped; rows with an empty
    response are skipped.
    """
    from kdforge.elicit.data import read_table

    p = Path(path)
    rows = read_table(p)
    out = []
    for r in rows:
        rec = r.get("row", r) if isinstance(r.get("row"), dict) else r
        if "prompt" not in rec or "text" not in rec:
            raise DataError(f"{p}: records need 'prompt' and 'text' fields (got {sorted(rec)})",
                            "give a `kdforge generate` output folder or a JSONL of {prompt, text}")
        if str(rec["text"]).strip():
            out.append({"prompt": rec["prompt"], "text": str(rec["text"])})
    if not out:
        raise DataError(f"{p} has no non-empty responses", "check the generation output")
    return out


def build_sft_examples(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Tokenize (prompt, response) pairs: ``input_ids``, ``labels`` (-100 on the prompt).

    Prompts longer than ``max_length`` leave no room for the response: those records are
    dropped (logged); responses are truncated to fit.
    """
    eos = tokenizer.eos_token or ""
    examples, dropped = [], 0
    for rec in records:
        prompt = rec["prompt"]
        if isinstance(prompt, list):
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("the data has chat prompts but the student tokenizer has no chat template",
                                  "use a student with a chat template, or plain-text prompts")
            prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            prompt_text = str(prompt)
        p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(rec["text"] + eos, add_special_tokens=False)["input_ids"]
        room = max_length - len(p_ids)
        if room < 1:
            dropped += 1
            continue
        r_ids = r_ids[:room]
        examples.append({"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids})
    if dropped:
        log.warning("dropped %d record(s) whose prompt alone exceeds max_length=%d", dropped, max_length)
    if not examples:
        raise DataError("no training examples fit in max_length", "raise --max-length")
    return examples


def _from_pretrained(cls: Any, name: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name)``; a missing folder or unreachable Hub id is an AssetError."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"cannot load the {what} {name!r}: {str(exc).splitlines()[0]}",
            "check the folder holds config.json/tokenizer files and weights"
            if Path(name).exists()
            else "check the path or Hub id (a Hub id needs the network: HF_HUB_OFFLINE=0)",
        ) from None


def run_sft(data: str | Path, student: str, output_dir: str | Path, *, tokenizer: str | None = None,
            max_length: int = 512, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune ``student`` (HF folder or Hub id) on teacher generations; save it under
    ``output_dir/student``; return the final training metrics."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.data.text import lm_collate
    from kdforge.io import write_json_atomic
    from kdforge.train import CausalLMTask, Distiller

    out = Path(output_dir)
    records = load_sft_records(data)  # the cheap checks first: a bad data path fails before any model loads
    tok = _from_pretrained(AutoTokenizer, tokenizer or student, "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = _from_pretrained(AutoModelForCausalLM, student, "student", dtype=torch.float32)
    examples = build_sft_examples(records, tok, max_length)
    cfg = {"batch_size": 8, "lr": 5e-5, "scheduler": "cosine", "warmup_steps": 0,
           **(train or {}), "output_dir": str(out)}
    if cfg.get("max_steps") is None and cfg.get("epochs") is None:
        cfg["epochs"] = 1
    d = Distiller(model, None, task=CausalLMTask(), objective=[{"name": "cross_entropy", "weight": 1.0}],
                  config=cfg, train_data=examples,
                  collate_fn=lambda b: lm_collate(b, pad_token_id=tok.pad_token_id))
    state = d.train()
    path = d.save_student(out / "student")
    tok.save_pretrained(path)
    summary = {"task": "sft", "examples": len(examples), "student": str(path),
               "steps": getattr(state, "step", None), "data": str(data)}
    write_json_atomic(out / "sft_summary.json", summary)
    log.info("SFT finished: %s", json.dumps(summary))
    return summary
