"""Causal-LM text data: tokenise, pack into fixed-length blocks, split, batch.

The unit of LM distillation data in kdforge is a ``LongTensor [N, T]`` of token blocks: every
row is ``T`` consecutive tokens of the concatenated corpus (documents joined by the EOS token),
so there is no padding and every position is a training target. This is the format the teacher
cache (:mod:`kdforge.teachers`) consumes, and what :class:`LMBlockDataset` serves as
``{"input_ids", "attention_mask", "labels"}`` dicts (Hugging Face convention: ``labels`` equal
``input_ids`` with ``-100`` on padding; the model shifts them internally).

Example::

    from kdforge.data.text import make_lm_splits, LMBlockDataset, lm_collate
    splits = make_lm_splits({"pp": pp_text, "persuasion": p_text}, tokenizer, seq_len=128,
                            train_docs=["pp"], eval_docs=["persuasion"], max_train_blocks=256)
    loader = DataLoader(LMBlockDataset(splits.train), batch_size=8, shuffle=True,
                        collate_fn=lm_collate)

Text files are read by the data layer (:mod:`kdforge.data.sources`, :func:`load_documents`):
a ``.txt`` file is one document named by its stem. Chat and prompt/completion data with
response-only labels go through :mod:`kdforge.data.chat` instead.

Held-out data is a *different document* (e.g. another novel), never other blocks of the same
one, so held-out perplexity measures generalisation rather than memorisation of neighbouring
text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from kdforge.constants import IGNORE_INDEX  # noqa: F401  (re-exported: tests and callers import it here)
from kdforge.data.paragraphs import unwrap_paragraphs  # noqa: F401  (public here; defined below both layers)
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


_BLANK_LINES = re.compile(r"\n\s*\n")


def tokenize_texts(texts: Iterable[str], tokenizer: Any, *, add_eos: bool = True) -> list[int]:
    """Token ids of the texts concatenated, each followed by ``tokenizer.eos_token_id``.

    Each text is rendered by :func:`kdforge.data.chat.render_text` (the data layer's ``text``
    format): special tokens (BOS) are not added per text; EOS marks document boundaries as in
    GPT-style pretraining. Raises :class:`DataError` when ``add_eos`` is set but the tokenizer
    has no EOS.
    """
    from kdforge.data.chat import render_text

    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise DataError(
            "the tokenizer has no eos_token_id to separate documents",
            "set tokenizer.eos_token, or pass add_eos=False",
        )
    ids: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"expected text strings, got {type(text).__name__}", "pass a list of str")
        ids.extend(render_text(text, tokenizer, add_eos=add_eos).input_ids)
    return ids


def load_documents(source: str | Mapping[str, Any], *, unwrap: bool = False) -> dict[str, str]:
    """``{document name: text}`` of a text source, read by the data layer's ``.txt`` rule.

    ``source`` is a data path or spec (:class:`kdforge.data.sources.DataSpec`): a preset such as
    ``austen``, a ``.txt`` file, a glob or a folder of ``.txt`` files; each file is one document
    named by its stem. Texts are returned as written (``unwrap=False``), since
    :func:`make_lm_splits` rejoins wrapped lines itself.

    Raises:
        DataError: the source holds no ``.txt`` documents, or two files share a stem.
    """
    from kdforge.data.sources import load, parse_spec

    spec = parse_spec(source).model_copy(update={"txt_unit": "document", "unwrap": unwrap})
    ds = load(spec)["train"]
    if "document" not in ds.column_names:
        raise DataError(f"{spec.path} holds no .txt documents (columns: {ds.column_names})",
                        "point it at .txt files, one document per file")
    docs: dict[str, str] = {}
    for name, text in zip(ds["document"], ds["text"]):
        if name in docs:
            raise DataError(f"two .txt files of {spec.path} are both named {name!r}",
                            "give every document file a distinct name")
        docs[name] = text
    return docs


def pack_tokens(
    texts: Iterable[str] | str,
    tokenizer: Any,
    seq_len: int,
    *,
    add_eos: bool = True,
    max_blocks: int | None = None,
) -> torch.Tensor:
    """Tokenise ``texts`` and pack the token stream into full blocks of ``seq_len`` tokens.

    Args:
        texts: one text or several (documents, joined by EOS).
        tokenizer: any Hugging Face tokenizer.
        seq_len: block length ``T``.
        add_eos: append EOS after every document.
        max_blocks: keep only the first ``max_blocks`` blocks (None: all).

    Returns:
        ``LongTensor [N, T]`` with ``N = floor(total_tokens / T)`` (or ``max_blocks``); the
        incomplete tail is dropped (logged).

    Raises:
        ConfigError: ``seq_len < 2``.
        DataError: the texts hold fewer than ``seq_len`` tokens.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}", "use e.g. seq_len=128")
    if isinstance(texts, str):
        texts = [texts]
    ids = tokenize_texts(texts, tokenizer, add_eos=add_eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"the texts hold {len(ids)} tokens, fewer than one block of seq_len={seq_len}",
            "use more text or a smaller seq_len",
        )
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    dropped = len(ids) - n_blocks * seq_len
    if dropped:
        log.debug("pack_tokens: %d trailing tokens not packed", dropped)
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def select_blocks(blocks: torch.Tensor, n: int | None, *, seed: int = 0) -> torch.Tensor:
    """A deterministic random subset of ``n`` rows of ``blocks`` (all rows, shuffled, if None).

    The same ``(blocks, n, seed)`` always gives the same rows in the same order.
    """
    if blocks.ndim != 2:
        raise DataError(f"blocks must be [N, T], got shape {tuple(blocks.shape)}", "use pack_tokens")
    total = blocks.shape[0]
    n = total if n is None else n
    if n > total:
        raise DataError(
            f"asked for {n} blocks but only {total} are available",
            "lower the number of blocks, use more text, or a shorter seq_len",
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)[:n]
    return blocks[order]


@dataclass(frozen=True)
class TextSplits:
    """Packed train and held-out blocks, each ``LongTensor [N, T]``."""

    train: torch.Tensor
    eval: torch.Tensor
    train_docs: tuple[str, ...]
    eval_docs: tuple[str, ...]

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def summary(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "train_docs": list(self.train_docs),
            "eval_docs": list(self.eval_docs),
            "train_blocks": int(self.train.shape[0]),
            "eval_blocks": int(self.eval.shape[0]),
            "train_tokens": int(self.train.numel()),
            "eval_tokens": int(self.eval.numel()),
        }


def make_lm_splits(
    documents: Mapping[str, str],
    tokenizer: Any,
    seq_len: int,
    *,
    train_docs: Sequence[str],
    eval_docs: Sequence[str],
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    seed: int = 0,
    unwrap: bool = True,
) -> TextSplits:
    """Train/held-out blocks split *by document* (e.g. held-out = another book).

    Each side is packed separately, then ``max_*_blocks`` rows are drawn with
    :func:`select_blocks` (deterministic in ``seed``; the held-out draw uses ``seed + 1``).

    Raises:
        ConfigError: a document name is unknown, or appears on both sides.
    """
    for name in (*train_docs, *eval_docs):
        if name not in documents:
            raise ConfigError(f"unknown document {name!r}", f"choose from: {', '.join(documents)}")
    overlap = set(train_docs) & set(eval_docs)
    if overlap:
        raise ConfigError(
            f"documents {sorted(overlap)} are in both the train and held-out splits",
            "hold out different documents than you train on",
        )
    if not train_docs or not eval_docs:
        raise ConfigError("both train_docs and eval_docs must name at least one document",
                          "e.g. train_docs=['prideprejudice'], eval_docs=['persuasion']")

    def _prep(names: Sequence[str]) -> list[str]:
        return [unwrap_paragraphs(documents[n]) if unwrap else documents[n] for n in names]

    train = select_blocks(pack_tokens(_prep(train_docs), tokenizer, seq_len), max_train_blocks, seed=seed)
    held = select_blocks(pack_tokens(_prep(eval_docs), tokenizer, seq_len), max_eval_blocks, seed=seed + 1)
    return TextSplits(train, held, tuple(train_docs), tuple(eval_docs))


class LMBlockDataset(Dataset):
    """Serves rows of a ``[N, T]`` block tensor as causal-LM examples.

    Item ``i`` is ``{"input_ids": [T], "attention_mask": [T] (ones), "labels": [T]}`` with
    ``labels == input_ids`` (the model shifts). Optional ``extras`` (each ``[N, ...]``, e.g.
    cached ``teacher_ids``/``teacher_logprobs`` ``[N, T, k]``) are sliced alongside.
    """

    def __init__(self, blocks: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None) -> None:
        if blocks.ndim != 2 or blocks.dtype != torch.long:
            raise DataError(
                f"blocks must be a LongTensor [N, T], got {blocks.dtype} {tuple(blocks.shape)}",
                "build them with kdforge.data.text.pack_tokens",
            )
        self.blocks = blocks
        self.extras = dict(extras or {})
        for key, value in self.extras.items():
            if value.shape[0] != blocks.shape[0]:
                raise DataError(
                    f"extra {key!r} has {value.shape[0]} rows, blocks have {blocks.shape[0]}",
                    "build extras from the same blocks",
                )

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for key, value in self.extras.items():
            item[key] = value[index]
        return item


def lm_collate(
    examples: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Batch LM examples, right-padding variable-length ones (:func:`kdforge.data.collate.pad_batch`).

    ``input_ids`` pad with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with
    ``-100`` (ignored by the loss). Any other key is padded along its first dim with zeros
    (e.g. ``teacher_ids``/``teacher_logprobs`` ``[T, k]``, which are ignored where labels are
    ``-100``). Missing ``attention_mask``/``labels`` are derived from ``input_ids``.
    """
    from kdforge.data.collate import pad_batch

    return pad_batch(examples, pad_token_id=pad_token_id)


def blocks_to_dataset(blocks: torch.Tensor):
    """A ``datasets.Dataset`` with one ``input_ids`` list per block (for HF/TRL trainers)."""
    from datasets import Dataset as HFDataset

    return HFDataset.from_dict({"input_ids": blocks.tolist()})
