"""The data layer end to end: spec -> raw rows -> tokens with response-only labels -> blocks.

Example::

    from kdforge.data import parse_spec, prepare, make_collator
    spec = parse_spec({"path": "chats.jsonl", "eval_fraction": 0.1, "max_length": 1024})
    dd = prepare(spec, tokenizer)                  # DatasetDict(train=..., eval=...)
    loader = DataLoader(dd["train"].with_format("torch"), batch_size=8,
                        collate_fn=make_collator(tokenizer))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kdforge.data.chat import tokenize_dataset
from kdforge.data.collate import pack_dataset
from kdforge.data.sources import DataSpec, load, parse_spec
from kdforge.errors import ConfigError

log = logging.getLogger(__name__)


def prepare(spec: DataSpec | Mapping[str, Any] | str, tokenizer: Any) -> Any:
    """``DatasetDict`` of ``input_ids``/``attention_mask``/``labels`` for every split of ``spec``.

    Rows are rendered by :func:`~kdforge.data.chat.tokenize_dataset`; with ``packing: true`` each
    split is then packed into ``block_size`` (default ``max_length``) blocks.

    Raises:
        ConfigError: ``packing`` without ``block_size`` or ``max_length``.
        DataError: any problem of the source or the rows (see :func:`~kdforge.data.sources.load`,
            :func:`~kdforge.data.chat.tokenize_dataset`).
    """
    from datasets import DatasetDict

    spec = parse_spec(spec)
    block = spec.block_size or spec.max_length
    if spec.packing and block is None:
        raise ConfigError("packing needs a block length", "set data.block_size (or data.max_length), e.g. 1024")
    raw = load(spec)  # every source error comes before any tokenisation
    out = DatasetDict()
    for name, ds in raw.items():
        rendered = tokenize_dataset(ds, tokenizer, spec, name=name)
        if spec.packing:
            assert block is not None
            rendered = pack_dataset(rendered, block, mask_document_starts=spec.mask_document_starts, name=name)
        out[name] = rendered
        log.info("%s: %d examples, %d tokens", name, len(rendered), sum(len(x) for x in rendered["input_ids"]))
    return out


__all__ = ["prepare"]
