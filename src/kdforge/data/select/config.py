"""Config of ``kdforge select`` and the function that runs it.

Example ``src/kdforge/configs/select_miniplm.yaml``::

    method: miniplm
    teacher: {name_or_path: asset:smollm2, dtype: float32}
    reference: {name_or_path: outputs/reference-4layer}   # its own tokenizer is used
    corpus: {path: data/mixed.jsonl, text_field: text}
    output_dir: outputs/select/miniplm
    fraction: 0.5
    mode: top             # or sample (P ∝ exp(score / temperature))
    max_length: 256
    batch_size: 8
    chunk_size: 256       # documents per resumable chunk
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.models import HubOptions

log = logging.getLogger(__name__)

__all__ = ["ScoringModelSpec", "SelectConfig", "SelectCorpusSpec", "load_corpus", "run_select"]


class ScoringModelSpec(HubOptions):
    """A causal LM that scores documents, with its own tokenizer (plus the Hub options ``revision``,
    ``trust_remote_code``, ``device_map``, ``attn_implementation`` of :class:`~kdforge.models.ModelSource`)."""

    name_or_path: str = Field(description="asset name (smollm2 or asset:smollm2), local folder, or Hub id "
                                          "(read like llm_kd's teacher.model)")
    tokenizer: str | None = Field(None, description="tokenizer folder/id; default: the model's")
    dtype: str = Field("float32", description="auto, float32, bfloat16 or float16")
    device: str | None = Field(None, description="e.g. cuda:0; default: the accelerator if any, else cpu")


class SelectCorpusSpec(StrictModel):
    """The documents to select from."""

    path: str = Field(description=".jsonl (one document per line), saved HF dataset, .txt file/folder, or asset:<name>")
    format: Literal["auto", "text", "jsonl", "hf"] = "auto"
    text_field: str = "text"
    max_documents: int | None = Field(None, ge=1, description="use only the first N documents")


class SelectConfig(StrictModel):
    """``kdforge select`` config."""

    method: Literal["miniplm"] = "miniplm"
    teacher: ScoringModelSpec
    reference: ScoringModelSpec
    corpus: SelectCorpusSpec
    output_dir: str
    fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of the documents kept")
    mode: Literal["top", "sample"] = Field("top", description="top: highest scores; sample: P ∝ exp(score/T)")
    temperature: float = Field(1.0, gt=0.0, description="temperature of mode=sample")
    seed: int = Field(0, ge=0, description="seed of mode=sample")
    max_length: int = Field(512, ge=2, description="tokens per document (truncated), per model")
    batch_size: int = Field(8, ge=1)
    chunk_size: int = Field(256, ge=1, description="documents per score chunk (resume granularity)")
    overwrite: bool = False


def load_corpus(spec: SelectCorpusSpec) -> Any:
    """The corpus as a ``datasets.Dataset`` with a ``spec.text_field`` column (jsonl/hf keep
    their other columns; a .txt file/folder gives one document per file)."""
    from datasets import Dataset, load_from_disk

    from kdforge.errors import DataError
    from kdforge.teachers.cache.config import resolve_path
    from kdforge.teachers.cache.corpus import read_texts

    p = Path(resolve_path(spec.path))
    fmt = spec.format
    if fmt == "auto":
        fmt = ("hf" if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() else "text") \
            if p.is_dir() else ("jsonl" if p.suffix in (".jsonl", ".json") else "text")
    if fmt == "jsonl" and p.is_file():
        rows = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{p}:{lineno} is not valid JSON", "write one JSON object per line") from None
        ds = Dataset.from_list(rows)
    elif fmt == "hf" and p.is_dir():
        ds = load_from_disk(str(p))
        if isinstance(ds.column_names, dict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    else:
        ds = Dataset.from_dict({spec.text_field: read_texts(p, text_field=spec.text_field, fmt=fmt)})
    if spec.text_field not in ds.column_names:
        raise DataError(f"{p} has columns {ds.column_names}, no {spec.text_field!r}", "set corpus.text_field")
    if spec.max_documents is not None and len(ds) > spec.max_documents:
        ds = ds.select(range(spec.max_documents))
    return ds


def _scorer(spec: ScoringModelSpec, config: SelectConfig, role: str) -> Any:
    """A scorer on ``spec``'s model: loaded by :mod:`kdforge.models` (asset name, folder or Hub id;
    the same errors as ``kdforge run``), on the accelerator unless ``device`` says otherwise."""
    from kdforge.data.select.scorer import CausalLMScorer
    from kdforge.models import ModelSource, load_tokenizer
    from kdforge.teachers.online import load_teacher

    hub = spec.tokenizer_options() if spec.tokenizer is None else {}  # the model's own tokenizer: same revision
    tokenizer = load_tokenizer(ModelSource(model=spec.tokenizer or spec.name_or_path, **hub), what=role)
    model = load_teacher(spec.name_or_path, dtype=spec.dtype, device=spec.device or "auto", **spec.load_kwargs())
    return CausalLMScorer(model, tokenizer, max_length=config.max_length, batch_size=config.batch_size,
                          name=spec.name_or_path)


def run_select(config: SelectConfig) -> Any:
    """Load both models and the corpus, run MiniPLM selection; returns its
    :class:`~kdforge.data.select.miniplm.MiniPLMResult`."""
    from kdforge.data.select.miniplm import miniplm_select

    corpus = load_corpus(config.corpus)
    log.info("corpus: %d documents", len(corpus))
    return miniplm_select(corpus, _scorer(config.teacher, config, "teacher"),
                          _scorer(config.reference, config, "reference"), config.output_dir,
                          fraction=config.fraction, mode=config.mode, temperature=config.temperature,
                          seed=config.seed, text_field=config.corpus.text_field, chunk_size=config.chunk_size,
                          overwrite=config.overwrite)
