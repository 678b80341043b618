"""The ``data:`` section of the LM recipes: a corpus of documents, or any dataset of :mod:`kdforge.data`.

Two forms, told apart by their keys:

* **a corpus** (``corpus:``, the quickstart's form, unchanged): ``austen`` or a folder of ``.txt``
  files, split by document, packed into ``seq_len`` blocks (:func:`kdforge.data.text.make_lm_splits`);
  every token is trained;
* **a dataset** (``path:``): everything :class:`kdforge.data.DataSpec` reads (a preset, local
  text/json/jsonl/csv/parquet files, a ``save_to_disk`` folder, a Hub id with ``name``/``split``),
  as plain text, prompt/completion or chat ``messages`` rendered with the tokenizer's chat
  template, with a held-out rule (``eval_split``, ``eval_fraction`` or ``eval_files``). Labels are
  ``-100`` outside the completion / assistant tokens (``train_on: completion``), so the
  cross-entropy, every logit-KD term (from the cache or the online teacher) and the evaluation
  score response tokens only. ``packing: true`` cuts the examples into ``block_size`` blocks;
  otherwise each split is right-padded to its longest example (labels ``-100``, attention 0 on the
  padding; the teacher is causal, so right padding does not change its outputs at real tokens,
  and the teacher cache can be built over the padded rows).

Both become :class:`LMData`: fixed-width ``[N, T]`` tensors of ids (and, for a dataset, labels
and attention masks) for the train and held-out sides.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Discriminator, Field, Tag
from torch.utils.data import Dataset

from kdforge.config import StrictModel
from kdforge.constants import IGNORE_INDEX
from kdforge.data.sources import DataSpec
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class CorpusSpec(StrictModel):
    """Text corpus and its split by document (held-out = other documents)."""

    corpus: str = Field("austen", description="'austen' or a folder of .txt files (document = file stem)")
    train_docs: list[str] = Field(default_factory=lambda: ["prideprejudice"])
    eval_docs: list[str] = Field(default_factory=lambda: ["persuasion"])
    seq_len: int = Field(128, ge=8)
    train_sequences: int | None = Field(256, ge=1, description="blocks drawn from train_docs; null = all")
    eval_sequences: int | None = Field(64, ge=1, description="held-out blocks; null = all")
    unwrap_paragraphs: bool = True
    seed: int = 0


class DatasetSpec(DataSpec):
    """A dataset of :mod:`kdforge.data` (docs/data.md) plus the recipe's held-out cap.

    A held-out rule (``eval_split``, ``eval_fraction`` or ``eval_files``) is required: the recipe
    scores every model on it.
    """

    max_length: int | None = Field(1024, ge=2, description="truncate rendered examples to this many tokens")
    eval_examples: int | None = Field(64, ge=1, description="held-out examples (blocks when packing) scored "
                                                           "at the end; null = all")

    def has_eval_rule(self) -> bool:
        return any(getattr(self, k) is not None for k in ("eval_split", "eval_fraction", "eval_files"))


def _data_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "dataset" if "path" in value else "corpus"
    return "dataset" if isinstance(value, DataSpec) else "corpus"


#: the ``data:`` field of the LM recipes: a corpus (``corpus:``) or a dataset (``path:``)
LMDataSpec = Annotated[
    Annotated[CorpusSpec, Tag("corpus")] | Annotated[DatasetSpec, Tag("dataset")],
    Discriminator(_data_kind),
]


@dataclass(frozen=True)
class LMData:
    """Train and held-out token rows ``[N, T]``; labels/attention masks only for a dataset."""

    train: torch.Tensor
    eval: torch.Tensor
    summary: dict[str, Any]
    train_labels: torch.Tensor | None = None
    train_mask: torch.Tensor | None = None
    eval_labels: torch.Tensor | None = None
    eval_mask: torch.Tensor | None = None
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    train_domains: list[str] | None = None  # each row's domain (``data.domain_field``), else None
    eval_domains: list[str] | None = None

    @property
    def response_only(self) -> bool:
        """Whether some attended token is not trained (prompts/user turns masked out)."""
        if self.train_labels is None:
            return False
        attended = self.train_mask.bool() if self.train_mask is not None else torch.ones_like(self.train, dtype=torch.bool)
        return bool(((self.train_labels == IGNORE_INDEX) & attended).any())

    def train_loss_mask(self) -> torch.Tensor | None:
        """Bool ``[N, T]``, True where a training token is trained (``labels != -100``): the mask
        the teacher cache is built with, so it stores only the positions the loss reads and its
        fingerprint changes with ``train_on``. None when every token is trained (a corpus)."""
        if self.train_labels is None:
            return None
        mask = self.train_labels != IGNORE_INDEX
        return None if bool(mask.all()) else mask

    def train_extras(self) -> dict[str, torch.Tensor]:
        """``labels``/``attention_mask`` to lay over the training rows (empty for a corpus)."""
        return _extras(self.train_labels, self.train_mask)

    def eval_batches(self, batch_size: int) -> list[dict[str, Any]]:
        """Held-out batches ``{input_ids[, attention_mask, labels]}`` for :mod:`kdforge.eval.lm`.

        With domains (``data.domain_field``) each batch holds one domain's rows and carries its name
        under ``"domain"``, so the evaluation adds per-domain breakdowns."""
        extras = _extras(self.eval_labels, self.eval_mask)
        groups: list[tuple[str | None, torch.Tensor]] = [(None, torch.arange(self.eval.shape[0]))]
        if self.eval_domains is not None:
            names = sorted(set(self.eval_domains))
            groups = [(d, torch.tensor([i for i, x in enumerate(self.eval_domains) if x == d])) for d in names]
        out: list[dict[str, Any]] = []
        for domain, rows in groups:
            for i in range(0, rows.numel(), batch_size):
                idx = rows[i: i + batch_size]
                batch: dict[str, Any] = {"input_ids": self.eval[idx], **{k: v[idx] for k, v in extras.items()}}
                if domain is not None:
                    batch["domain"] = domain
                out.append(batch)
        return out


def _extras(labels: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = {}
    if labels is not None:
        out["labels"] = labels
    if mask is not None:
        out["attention_mask"] = mask
    return out


class WithLabels(Dataset):
    """Items of ``base`` (e.g. a :class:`~kdforge.teachers.TeacherCacheDataset`) with keys replaced.

    ``extras`` maps a key to an ``[N, ...]`` tensor; item ``i`` gets ``extras[key][i]``.
    """

    def __init__(self, base: Any, extras: dict[str, torch.Tensor]) -> None:
        for key, value in extras.items():
            if value.shape[0] != len(base):
                raise DataError(f"{key} has {value.shape[0]} rows, the dataset {len(base)}",
                                "build the teacher cache over the same rows as the labels")
        self.base, self.extras = base, extras

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[index])
        for key, value in self.extras.items():
            item[key] = value[index]
        return item


# --------------------------------------------------------------------------------------------- build
def build_lm_data(spec: CorpusSpec | DatasetSpec, tokenizer: Any) -> LMData:
    """The recipe's token rows for ``spec`` (module doc)."""
    if isinstance(spec, CorpusSpec):
        return _corpus(spec, tokenizer)
    return _dataset(spec, tokenizer)


def _corpus(d: CorpusSpec, tokenizer: Any) -> LMData:
    from kdforge.data.text import make_lm_splits

    docs = load_corpus_documents(d.corpus)
    splits = make_lm_splits(docs, tokenizer, d.seq_len, train_docs=d.train_docs, eval_docs=d.eval_docs,
                            max_train_blocks=d.train_sequences, max_eval_blocks=d.eval_sequences, seed=d.seed,
                            unwrap=d.unwrap_paragraphs)
    return LMData(splits.train, splits.eval, splits.summary(), description=f"{d.corpus} ({', '.join(d.train_docs)})")


def load_corpus_documents(corpus: str) -> dict[str, str]:
    """``{document name: text}``: the Austen asset, or every ``*.txt`` in a folder."""
    from pathlib import Path

    if corpus == "austen":
        from kdforge.assets.austen import load_books

        return load_books()
    folder = Path(corpus)
    if not folder.is_dir():
        raise DataError(f"corpus {corpus!r} is neither 'austen' nor a folder",
                        "set data.corpus to 'austen' or to a folder of .txt files (or use data.path: for "
                        "any dataset: docs/data.md)")
    if not any(folder.glob("*.txt")):
        raise DataError(f"no .txt files in {folder}", "put one UTF-8 text file per document there")
    import glob

    from kdforge.data.text import load_documents

    # the data layer's .txt rule, as every other command reads it; a glob (not the folder) keeps every
    # *.txt a corpus document, whatever its name (a folder's files are split by name: test.txt, ...)
    return load_documents(str(Path(glob.escape(str(folder))) / "*.txt"))


def _dataset(d: DatasetSpec, tokenizer: Any) -> LMData:
    from kdforge.data.collate import pad_token_id
    from kdforge.data.pipeline import prepare

    if not d.has_eval_rule():
        raise ConfigError(f"data.path {d.path!r} has no held-out rule, and the recipe scores every model on "
                          "held-out data",
                          "set one of data.eval_fraction (e.g. 0.1), data.eval_split (e.g. validation) or "
                          "data.eval_files")
    dd = prepare(d, tokenizer)
    if "eval" not in dd or len(dd["eval"]) == 0:
        raise DataError(f"the held-out split of {d.path!r} is empty after rendering",
                        "hold out more rows (a larger eval_fraction) or check the held-out files")
    pad = pad_token_id(tokenizer)
    train = _rows(dd["train"], pad)
    held_ds = dd["eval"]
    if d.eval_examples is not None and len(held_ds) > d.eval_examples:
        held_ds = held_ds.select(range(d.eval_examples))
    held = _rows(held_ds, pad)
    n_trained = int((train[1][:, 1:] != IGNORE_INDEX).sum())
    summary = {
        "path": d.path, "format": d.format, "packing": d.packing, "seq_len": int(train[0].shape[1]),
        "train_examples": int(train[0].shape[0]), "eval_examples": int(held[0].shape[0]),
        "train_tokens": int(train[2].sum()), "train_loss_tokens": n_trained,
        "eval_tokens": int(held[2].sum()), "eval_loss_tokens": int((held[1][:, 1:] != IGNORE_INDEX).sum()),
        # the keys the corpus form also has (results.md, plots)
        "train_docs": [d.path], "eval_docs": [_held_out_name(d)], "train_blocks": int(train[0].shape[0]),
    }
    domains: dict[str, list[str] | None] = {"train": None, "eval": None}
    if d.domain_field is not None:
        domains = {"train": [str(x) for x in dd["train"][d.domain_field]],
                   "eval": [str(x) for x in held_ds[d.domain_field]]}
        summary["domains"] = {side: dict(sorted(Counter(v).items())) for side, v in domains.items()}
    log.info("data %s: %d train rows x %d tokens (%d trained), %d held-out rows", d.path, train[0].shape[0],
             train[0].shape[1], n_trained, held[0].shape[0])
    return LMData(train[0], held[0], summary, train_labels=train[1], train_mask=train[2], eval_labels=held[1],
                  eval_mask=held[2], description=d.path, train_domains=domains["train"],
                  eval_domains=domains["eval"])


def _held_out_name(d: DatasetSpec) -> str:
    if d.eval_split is not None:
        return f"{d.path} [{d.eval_split}]"
    if d.eval_files is not None:
        return ", ".join(d.eval_files)
    return f"{d.path} [{d.eval_fraction:g} held out]"


def _rows(ds: Any, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, labels, attention_mask)`` ``[N, T]``: rows right-padded to the longest (packed rows are equal)."""
    ids, labels = ds["input_ids"], ds["labels"]
    width = max(len(x) for x in ids)
    n = len(ids)
    out_ids = torch.full((n, width), pad_id, dtype=torch.long)
    out_lab = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    out_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        out_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        out_lab[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        out_mask[i, : len(x)] = 1
    return out_ids, out_lab, out_mask


__all__ = ["CorpusSpec", "DatasetSpec", "LMData", "LMDataSpec", "WithLabels", "build_lm_data",
           "load_corpus_documents"]
