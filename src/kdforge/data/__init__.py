"""kdforge.data: datasets and collators (text: :mod:`kdforge.data.text`; images: :mod:`kdforge.data.vision`)."""

from kdforge.data.text import (
    LMBlockDataset,
    TextSplits,
    lm_collate,
    make_lm_splits,
    pack_tokens,
    select_blocks,
    unwrap_paragraphs,
)

__all__ = [
    "LMBlockDataset",
    "TextSplits",
    "lm_collate",
    "make_lm_splits",
    "pack_tokens",
    "select_blocks",
    "unwrap_paragraphs",
]
