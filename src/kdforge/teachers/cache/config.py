"""Config of ``kdforge cache-teacher`` and the function that runs it.

Example ``configs/cache-smollm2-austen.yaml``::

    teacher:
      name_or_path: asset:smollm2     # a Hub id, a local folder, or asset:<name>
      dtype: float32
    corpus:
      path: asset:austen              # .txt file/folder, .jsonl, saved HF dataset, or asset:<name>
      seq_len: 128
      max_sequences: 1024
    output_dir: outputs/cache/smollm2-austen-k16
    k: 16
    tail_samples: 0                   # e.g. 16: + 16 draws from the tail per position (forward KL only)
    encoding: compact-u8-zstd
    batch_size: 8
    shard_size: 256
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kdforge.config import StrictModel

log = logging.getLogger(__name__)


class TeacherSpec(StrictModel):
    """Which teacher to run."""

    name_or_path: str = Field(description="Hub id, local folder, or asset:<name> (e.g. asset:smollm2)")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path, if any")
    dtype: str = Field("float32", description="auto, float32, bfloat16 or float16")
    device: str | None = Field(None, description="e.g. cuda:0; default: cuda if available else cpu")
    vocab_size: int | None = Field(None, ge=1, description="slice logits to this many ids (drop embedding padding)")


class CorpusSpec(StrictModel):
    """Which text to run the teacher over, and how to cut it into sequences."""

    path: str = Field(description=".txt file or folder, .jsonl, saved HF dataset, or asset:<name>")
    format: Literal["auto", "text", "jsonl", "hf"] = "auto"
    text_field: str = "text"
    tokenizer: str | None = Field(None, description="tokenizer folder/id; default: the teacher's")
    seq_len: int = Field(128, ge=2)
    max_sequences: int | None = Field(None, ge=1)


class CacheTeacherConfig(StrictModel):
    """``kdforge cache-teacher`` config."""

    teacher: TeacherSpec
    corpus: CorpusSpec
    output_dir: str
    k: int = Field(16, ge=0, description="exact top-k entries per position (0 only with tail_samples)")
    tail_samples: int = Field(
        0, ge=0, le=255,
        description="draws per position from the teacher's distribution outside the top-k (unbiased tail; "
        "valid for forward KL at T=1 only); 0 = top-k only",
    )
    sample_seed: int = Field(0, ge=0, description="seed of the tail draws (row r uses (sample_seed, r))")
    encoding: str = "compact-u8-zstd"
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(256, ge=1, description="sequences per shard (resume granularity)")
    overwrite: bool = False

    @model_validator(mode="after")
    def _k_or_samples(self) -> CacheTeacherConfig:
        if self.k == 0 and self.tail_samples == 0:
            raise ValueError("k=0 keeps nothing: set k >= 1, or tail_samples >= 1 for a pure-sampling cache")
        return self


def resolve_path(value: str) -> str:
    """``asset:<name>`` -> the installed asset's path (kdforge.assets.ensure); else unchanged."""
    if value.startswith("asset:"):
        from kdforge.assets import ensure

        return str(ensure(value.split(":", 1)[1]))
    return value


def run_cache_teacher(config: CacheTeacherConfig) -> Path:
    """Load teacher and tokenizer, read and pack the corpus, build the cache; returns its folder.

    Under ``accelerate launch`` / ``torchrun`` with several processes the build is data-parallel:
    every process runs this with the same config, loads its own teacher copy (on
    ``cuda:<LOCAL_RANK>`` when CUDA is available and ``teacher.device`` is unset) and writes its
    share of the shards; the result is byte-identical to a one-process build.
    """
    import os

    import torch
    from transformers import AutoTokenizer

    from kdforge.errors import AssetError
    from kdforge.teachers.cache.corpus import pack_tokens, read_texts
    from kdforge.teachers.cache.writer import build_teacher_cache
    from kdforge.teachers.online import load_teacher

    t = config.teacher
    teacher_path = resolve_path(t.name_or_path)
    tok_path = resolve_path(config.corpus.tokenizer) if config.corpus.tokenizer else teacher_path
    tok_kwargs = {"gguf_file": t.gguf_file} if t.gguf_file and not config.corpus.tokenizer else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **tok_kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"cannot load tokenizer {tok_path!r}: {str(exc).splitlines()[0]}",
            "set corpus.tokenizer to a folder holding tokenizer.json / tokenizer_config.json",
        ) from None
    from kdforge.distributed import launched_world_size

    default_device = "cpu"
    if torch.cuda.is_available():
        default_device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if launched_world_size() > 1 else "cuda"
    device = t.device or default_device
    teacher = load_teacher(teacher_path, dtype=t.dtype, device=device, gguf_file=t.gguf_file, vocab_size=t.vocab_size)
    teacher.name = t.name_or_path

    texts = read_texts(resolve_path(config.corpus.path), text_field=config.corpus.text_field, fmt=config.corpus.format)
    blocks = pack_tokens(texts, tokenizer, config.corpus.seq_len, max_blocks=config.corpus.max_sequences)
    log.info("corpus: %d documents -> %d sequences of %d tokens", len(texts), blocks.shape[0], blocks.shape[1])
    return build_teacher_cache(
        teacher,
        blocks,
        config.output_dir,
        k=config.k,
        tail_samples=config.tail_samples,
        sample_seed=config.sample_seed,
        encoding=config.encoding,
        batch_size=config.batch_size,
        shard_size=config.shard_size,
        tokenizer=tokenizer,
        overwrite=config.overwrite,
        data_parallel=True,  # a one-process group when not launched with several processes
    )
