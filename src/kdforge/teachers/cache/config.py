"""Config of ``kdforge cache-teacher`` and the function that runs it.

The data comes through the data layer (:mod:`kdforge.data`, docs/data.md) as a ``data:`` block;
chat and prompt/completion data keep response-only masks, stored with the cache::

    teacher: {name_or_path: asset:smollm2}
    data:
      path: chats.jsonl               # any DataSpec: preset, file/glob/folder, save_to_disk, Hub id
      format: chat
      block_size: 256                 # the cached sequence length
      packing: false                  # one padded row per conversation (true: packed blocks)
    max_sequences: 1024
    output_dir: outputs/cache/smollm2-chats-k16

The older ``corpus:`` block (plain text) still works, read by the same layer:

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
    feature_layers: null              # e.g. [15, 30]: + those layers' hidden states (int8), for feature terms
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
from kdforge.data.sources import DataSpec
from kdforge.models import HubOptions

log = logging.getLogger(__name__)


class TeacherSpec(HubOptions):
    """Which teacher to run (plus the Hub options ``revision``, ``trust_remote_code``, ``device_map``,
    ``attn_implementation`` of :class:`~kdforge.models.ModelSource`)."""

    name_or_path: str = Field(description="asset name (smollm2 or asset:smollm2), local folder, or Hub id "
                                          "(read like llm_kd's teacher.model)")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path, if any")
    dtype: str = Field("float32", description="auto, float32, bfloat16 or float16")
    device: str | None = Field(None, description="e.g. cuda:0; default: the accelerator if any, else cpu")
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
    """``kdforge cache-teacher`` config: ``data`` (the data layer) or the older ``corpus``."""

    teacher: TeacherSpec
    data: DataSpec | None = Field(None, description="the data (docs/data.md); the cached sequence length "
                                                    "is data.block_size (else data.max_length)")
    corpus: CorpusSpec | None = Field(None, description="older plain-text corpus block (use data instead)")
    tokenizer: str | None = Field(None, description="with data: tokenizer folder/id; default: the teacher's")
    max_sequences: int | None = Field(None, ge=1, description="with data: cache only the first N sequences")
    output_dir: str
    k: int = Field(16, ge=0, description="exact top-k entries per position (0 only with tail_samples)")
    tail_samples: int = Field(
        0, ge=0, le=255,
        description="draws per position from the teacher's distribution outside the top-k (unbiased tail; "
        "valid for forward KL at T=1 only); 0 = top-k only",
    )
    sample_seed: int = Field(0, ge=0, description="seed of the tail draws (row r uses (sample_seed, r))")
    feature_layers: list[int] | None = Field(
        None, description="also store the teacher's hidden states of these hidden_states layers (0 = embeddings), "
                          "for feature terms (hidden_mse, ...) with a cached teacher; e.g. [15, 30]")
    feature_dtype: Literal["int8", "bf16", "fp32"] = Field(
        "int8", description="compression of the stored hidden states: int8 (per-row scaled), bf16, or fp32 (exact)")
    encoding: str = "compact-u8-zstd"
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(256, ge=1, description="sequences per shard (resume granularity)")
    overwrite: bool = False

    @model_validator(mode="after")
    def _k_or_samples(self) -> CacheTeacherConfig:
        if self.k == 0 and self.tail_samples == 0:
            raise ValueError("k=0 keeps nothing: set k >= 1, or tail_samples >= 1 for a pure-sampling cache")
        if (self.data is None) == (self.corpus is None):
            raise ValueError("set exactly one of data (the data layer, docs/data.md) or corpus (older text block)")
        if self.corpus is not None and (self.tokenizer is not None or self.max_sequences is not None):
            raise ValueError("with corpus, set tokenizer and max_sequences inside corpus (or use a data block)")
        if self.data is not None and self.data.block_size is None and self.data.max_length is None:
            raise ValueError("data needs a sequence length for the cache: set data.block_size (e.g. 256)")
        return self

    def data_spec(self) -> DataSpec:
        """The :class:`DataSpec` to read: ``data``, or ``corpus`` as plain text packed into blocks."""
        if self.data is not None:
            return self.data
        assert self.corpus is not None
        return corpus_spec(self.corpus)


def corpus_spec(corpus: CorpusSpec) -> DataSpec:
    """An older ``corpus:`` block as a data-layer spec: plain text (``text_field``), packed into
    ``seq_len`` blocks; ``asset:<name>`` of a data preset is the preset, a folder that is not a
    ``save_to_disk`` folder means its ``*.txt`` files (sorted by name), as before.

    Raises:
        DataError: the path does not exist, or a text folder holds no ``.txt`` files.
    """
    from kdforge.data.sources import PRESETS
    from kdforge.teachers.cache.corpus import corpus_source

    path = corpus.path
    name = path.split(":", 1)[1] if path.startswith("asset:") else None
    source = name if name in PRESETS else corpus_source(resolve_path(path), fmt=corpus.format)
    return DataSpec(path=source, format="text", text_field=corpus.text_field, packing=True,
                    block_size=corpus.seq_len)


def resolve_path(value: str) -> str:
    """``asset:<name>`` -> the installed asset's path (kdforge.assets.ensure); else unchanged."""
    if value.startswith("asset:"):
        from kdforge.assets import ensure

        return str(ensure(value.split(":", 1)[1]))
    return value


def run_cache_teacher(config: CacheTeacherConfig) -> Path:
    """Load the tokenizer, read the data (response-only masks kept), load the teacher, build the
    cache; returns its folder.

    Under ``accelerate launch`` / ``torchrun`` with several processes the build is data-parallel:
    every process runs this with the same config, loads its own teacher copy (on
    ``cuda:<LOCAL_RANK>`` when CUDA is available and ``teacher.device`` is unset) and writes its
    share of the shards; the result is byte-identical to a one-process build.
    """
    from kdforge.constants import IGNORE_INDEX
    from kdforge.data.pipeline import prepare_blocks
    from kdforge.models import ModelSource, load_tokenizer
    from kdforge.teachers.cache.writer import build_teacher_cache
    from kdforge.teachers.online import load_teacher

    t = config.teacher
    tok_name = config.corpus.tokenizer if config.corpus is not None else config.tokenizer
    max_sequences = config.corpus.max_sequences if config.corpus is not None else config.max_sequences
    # kdforge.models reads the names (asset, folder, .gguf file, Hub id) and fails like `kdforge run`
    tok_source = tok_name or t.name_or_path
    if tok_name is None and t.gguf_file and Path(resolve_path(t.name_or_path)).is_dir():
        tok_source = str(Path(resolve_path(t.name_or_path)) / t.gguf_file)  # the tokenizer inside the GGUF file
    hub = t.tokenizer_options() if tok_name is None else {}  # the teacher's own tokenizer: same revision
    tokenizer = load_tokenizer(ModelSource(model=tok_source, **hub), what="teacher" if tok_name is None else "tokenizer")
    # the data before the teacher: a data mistake fails fast, and before anything is written
    blocks, labels = prepare_blocks(config.data_spec(), tokenizer, max_blocks=max_sequences)
    mask = labels != IGNORE_INDEX
    loss_mask = None if bool(mask.all()) else mask  # plain text trains every token: an unmasked cache
    log.info("data: %d sequences of %d tokens%s", blocks.shape[0], blocks.shape[1],
             "" if loss_mask is None else f", {int(mask.sum())} trained (response-only)")

    # device auto: the accelerator (cuda:LOCAL_RANK under a multi-process launch), else the CPU
    teacher = load_teacher(t.name_or_path, dtype=t.dtype, device=t.device or "auto", gguf_file=t.gguf_file,
                           vocab_size=t.vocab_size, **t.load_kwargs())
    teacher.name = t.name_or_path
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
        loss_mask=loss_mask,
        feature_layers=config.feature_layers,
        feature_dtype=config.feature_dtype,
    )
