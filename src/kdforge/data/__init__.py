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
from kdforge.data.vision import (
    ImageClassificationDataset,
    ImageSplits,
    load_fashion_mnist,
    read_idx,
    stratified_indices,
    write_idx,
)

__all__ = [
    "ImageClassificationDataset",
    "ImageSplits",
    "load_fashion_mnist",
    "read_idx",
    "stratified_indices",
    "write_idx",
    "LMBlockDataset",
    "TextSplits",
    "lm_collate",
    "make_lm_splits",
    "pack_tokens",
    "select_blocks",
    "unwrap_paragraphs",
]
