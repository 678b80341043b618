"""Examples to batches: packing into fixed blocks, or right padding per batch.

**Packing** (:func:`pack_sequences`, :func:`pack_dataset`) concatenates the rendered examples in
order and cuts the stream into blocks of ``block_size`` tokens, carrying each token's label with
it, so a response-only mask survives packing unchanged. Blocks *cross documents*: a block may end
one example and start the next, and attention is not reset at the boundary (no block-diagonal
mask, no per-document ``position_ids``), exactly as in GPT-style pretraining. Labels are not
shifted (the model predicts ``labels[t]`` from tokens ``< t``), so the only cross-document target
is the *first token of each document*, predicted from the previous document's tokens:
``mask_document_starts=True`` sets those labels to ``IGNORE_INDEX``. Text examples end with EOS,
so by default the model learns "after EOS comes a new document". The incomplete tail block is
dropped (logged). Packing is exact (no token lost or reordered) but holds the token stream of the
split in memory once.

**Padding** (:func:`pad_batch`) right-pads each batch to its longest example (optionally a
multiple of ``pad_to_multiple_of``): ``input_ids`` with the pad id (the tokenizer's
``pad_token_id``, else its ``eos_token_id``: :func:`pad_token_id`), ``attention_mask`` with 0,
``labels`` with ``IGNORE_INDEX``; any other key (e.g. cached teacher top-k ``[T, k]``) with 0.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def pack_sequences(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None,
    block_size: int,
    *,
    mask_document_starts: bool = False,
) -> dict[str, list[list[int]]]:
    """Pack examples into full blocks of ``block_size`` tokens (module doc).

    Args:
        input_ids: token ids per example.
        labels: labels per example, same lengths (None: every token trained).
        block_size: block length ``T``.
        mask_document_starts: label the first token of every example ``IGNORE_INDEX``.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each ``N`` lists of ``T`` ints with
        ``N = floor(total / T)``; the concatenated blocks equal the first ``N * T`` tokens of the
        concatenated examples.
    """
    if block_size < 2:
        raise ConfigError(f"block_size must be at least 2, got {block_size}", "use e.g. block_size: 1024")
    ids_stream: list[int] = []
    label_stream: list[int] = []
    for i, ids in enumerate(input_ids):
        lab = list(ids) if labels is None else list(labels[i])
        if len(lab) != len(ids):
            raise DataError(f"example {i} has {len(ids)} input_ids but {len(lab)} labels",
                            "render examples with kdforge.data.chat.tokenize_dataset")
        if mask_document_starts and lab:
            lab[0] = IGNORE_INDEX
        ids_stream.extend(int(t) for t in ids)
        label_stream.extend(int(t) for t in lab)
    n = len(ids_stream) // block_size
    if len(ids_stream) - n * block_size:
        log.info("packing: %d trailing tokens do not fill a block of %d and are dropped",
                 len(ids_stream) - n * block_size, block_size)
    cut = [slice(b * block_size, (b + 1) * block_size) for b in range(n)]
    return {"input_ids": [ids_stream[s] for s in cut], "attention_mask": [[1] * block_size for _ in cut],
            "labels": [label_stream[s] for s in cut]}


def pack_dataset(ds: Any, block_size: int, *, mask_document_starts: bool = False, name: str = "train") -> Any:
    """A rendered ``datasets.Dataset`` packed into blocks (:func:`pack_sequences`, one pass).

    Raises:
        DataError: the examples hold fewer tokens than one block.
    """
    def _pack(batch: dict[str, list]) -> dict[str, list]:
        return pack_sequences(batch["input_ids"], batch.get("labels"), block_size,
                              mask_document_starts=mask_document_starts)

    packed = ds.map(_pack, batched=True, batch_size=None, remove_columns=ds.column_names,
                    desc=f"pack {name} into blocks of {block_size}")
    if len(packed) == 0:
        total = sum(len(x) for x in ds["input_ids"])
        raise DataError(f"the {name} data holds {total} tokens, fewer than one block of {block_size}",
                        "use more data, a smaller block_size, or packing: false")
    return packed


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's ``pad_token_id``, else its ``eos_token_id``.

    Raises:
        DataError: it has neither.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has neither a pad nor an eos token to pad batches with",
                    "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token), or use packing")


def pad_batch(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch (module doc); missing ``attention_mask``/``labels`` are
    derived from ``input_ids`` (all ones / equal to the ids)."""
    if not examples:
        raise DataError("cannot collate an empty batch", "check the dataset is not empty")
    keys = list(examples[0])
    if "input_ids" not in keys:
        raise DataError(f"LM examples need 'input_ids', got keys {keys}", "render them with kdforge.data.chat")
    rows = [dict(e) for e in examples]
    for row in rows:
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        row["input_ids"] = ids
        row.setdefault("attention_mask", torch.ones_like(ids))
        row.setdefault("labels", ids.clone())
    max_len = max(int(r["input_ids"].shape[0]) for r in rows)
    if pad_to_multiple_of:
        max_len = -(-max_len // pad_to_multiple_of) * pad_to_multiple_of
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        padded = []
        for r in rows:
            t = torch.as_tensor(r[key])
            extra = max_len - t.shape[0]
            if extra:
                t = torch.cat([t, torch.full((extra, *t.shape[1:]), fills.get(key, 0), dtype=t.dtype)])
            padded.append(t)
        batch[key] = torch.stack(padded)
    return batch


def make_collator(tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` for a ``DataLoader`` over rendered (padded) or packed examples."""
    return functools.partial(pad_batch, pad_token_id=pad_token_id(tokenizer), pad_to_multiple_of=pad_to_multiple_of)


__all__ = ["make_collator", "pack_dataset", "pack_sequences", "pad_batch", "pad_token_id"]
