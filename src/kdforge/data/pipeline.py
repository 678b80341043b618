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

from kdforge.constants import IGNORE_INDEX
from kdforge.data.chat import tokenize_dataset
from kdforge.data.collate import pack_dataset
from kdforge.data.sources import DataSpec, load, parse_spec
from kdforge.errors import ConfigError, DataError

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
    if spec.packing and spec.domain_field is not None:
        raise ConfigError(f"data.domain_field {spec.domain_field!r} cannot be kept with packing: a packed block "
                          "mixes the rows of several domains",
                          "set packing: false (rows are padded per split) or remove domain_field")
    raw = load(spec)  # every source error comes before any tokenisation
    out = DatasetDict()
    keep = (spec.domain_field,) if spec.domain_field is not None else ()
    for name, ds in raw.items():
        if spec.domain_field is not None and spec.domain_field not in ds.column_names:
            raise DataError(f"data.domain_field {spec.domain_field!r} is not a column of the {name} split "
                            f"(columns: {', '.join(ds.column_names)})",
                            "name the column that holds each row's domain, or remove domain_field")
        rendered = tokenize_dataset(ds, tokenizer, spec, name=name, keep=keep)
        if spec.packing:
            assert block is not None
            rendered = pack_dataset(rendered, block, mask_document_starts=spec.mask_document_starts, name=name)
        out[name] = rendered
        log.info("%s: %d examples, %d tokens", name, len(rendered), sum(len(x) for x in rendered["input_ids"]))
    return out


def prepare_blocks(
    spec: DataSpec | Mapping[str, Any] | str,
    tokenizer: Any,
    *,
    block_size: int | None = None,
    max_blocks: int | None = None,
    split: str = "train",
) -> tuple[Any, Any]:
    """Fixed-length ``(input_ids, labels)``, each ``LongTensor [N, T]``, of one split of ``spec``:
    the input of a teacher cache, with the response-only labels its loss mask comes from.

    ``T`` is ``block_size``, else ``spec.block_size``, else ``spec.max_length``. With ``packing:
    true`` the rendered examples are packed (:func:`~kdforge.data.collate.pack_sequences`);
    otherwise every example is one row, truncated to ``T`` (``truncation_side``) and right-padded
    with the pad id (:func:`~kdforge.data.collate.pad_token_id`) and label ``-100``. Right padding
    under causal attention leaves the logits of the real tokens unchanged, so a model may read the
    rows with an all-ones attention mask. ``max_blocks`` keeps the first ``N`` rows.

    Raises:
        ConfigError: no block length.
        DataError: any problem of the source or rows; fewer tokens than one packed block.
    """
    import torch

    from kdforge.data.collate import pack_sequences, pad_token_id

    spec = parse_spec(spec)
    block = block_size or spec.block_size or spec.max_length
    if block is None:
        raise ConfigError("fixed-length rows need a block length",
                          "set data.block_size (e.g. 1024), or data.max_length")
    if not spec.packing:
        spec = spec.model_copy(update={"max_length": min(spec.max_length or block, block)})
    raw = load(spec)
    if split not in raw:
        raise ConfigError(f"{spec.path} has no {split!r} split here (got {', '.join(raw)})",
                          "set data.eval_split / eval_fraction / eval_files to make one")
    rendered = tokenize_dataset(raw[split], tokenizer, spec, name=split)
    if spec.packing:
        packed = pack_sequences(rendered["input_ids"], rendered["labels"], block,
                                mask_document_starts=spec.mask_document_starts)
        if not packed["input_ids"]:
            total = sum(len(x) for x in rendered["input_ids"])
            from kdforge.errors import DataError

            raise DataError(f"the {split} data holds {total} tokens, fewer than one block of {block}",
                            "use more data, a smaller block_size, or packing: false")
        ids = torch.tensor(packed["input_ids"], dtype=torch.long)
        labels = torch.tensor(packed["labels"], dtype=torch.long)
    else:
        pad = pad_token_id(tokenizer)
        n = len(rendered)
        ids = torch.full((n, block), pad, dtype=torch.long)
        labels = torch.full((n, block), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(rendered["input_ids"], rendered["labels"])):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    if max_blocks is not None:
        ids, labels = ids[:max_blocks], labels[:max_blocks]
    log.info("%s: %d rows of %d tokens (%s), %d trained", split, ids.shape[0], block,
             "packed" if spec.packing else "padded", int((labels != IGNORE_INDEX).sum()))
    return ids, labels


__all__ = ["prepare", "prepare_blocks"]
