"""kdforge.data: one data layer on Hugging Face ``datasets``, plus LM blocks and images.

- :mod:`kdforge.data.sources`: :class:`DataSpec` and :func:`load` (Hub ids, local files, saved
  datasets, presets; train/eval splits; the ``.txt`` rule);
- :mod:`kdforge.data.chat`: rows to tokens (text, prompt/completion, chat templates) with
  response-only ``labels``;
- :mod:`kdforge.data.collate`: packing into blocks or right padding per batch;
- :mod:`kdforge.data.pipeline`: :func:`prepare` (all of the above);
- :mod:`kdforge.data.options`: the ``--data SPEC`` options the commands share;
- :mod:`kdforge.data.text`: packed ``[N, T]`` token blocks split by document (the LM-KD recipe
  and the teacher cache); :mod:`kdforge.data.vision`: images.

docs/data.md describes the layer with YAML examples.
"""

from kdforge.data.chat import (
    Rendered,
    detect_format,
    render_chat,
    render_prompt_completion,
    render_text,
    tokenize_dataset,
)
from kdforge.data.collate import (
    make_collator,
    pack_dataset,
    pack_sequences,
    pad_batch,
    pad_token_id,
)
from kdforge.data.pipeline import prepare, prepare_blocks
from kdforge.data.sources import (
    PRESETS,
    DataSpec,
    Preset,
    load,
    parse_spec,
    read_splits,
    register_preset,
    split_txt,
)
from kdforge.data.text import (
    LMBlockDataset,
    TextSplits,
    blocks_to_dataset,
    lm_collate,
    load_documents,
    make_lm_splits,
    pack_tokens,
    select_blocks,
    unwrap_paragraphs,
)
from kdforge.data.vision import (
    ImageClassificationDataset,
    ImageSplits,
    load_fashion_mnist,
    read_idx,
    stratified_indices,
    write_idx,
)

__all__ = [
    "PRESETS",
    "DataSpec",
    "ImageClassificationDataset",
    "ImageSplits",
    "LMBlockDataset",
    "Preset",
    "Rendered",
    "TextSplits",
    "blocks_to_dataset",
    "detect_format",
    "lm_collate",
    "load",
    "load_documents",
    "load_fashion_mnist",
    "make_collator",
    "make_lm_splits",
    "pack_dataset",
    "pack_sequences",
    "pack_tokens",
    "pad_batch",
    "pad_token_id",
    "parse_spec",
    "prepare",
    "prepare_blocks",
    "read_idx",
    "read_splits",
    "register_preset",
    "render_chat",
    "render_prompt_completion",
    "render_text",
    "select_blocks",
    "split_txt",
    "stratified_indices",
    "tokenize_dataset",
    "unwrap_paragraphs",
    "write_idx",
]
