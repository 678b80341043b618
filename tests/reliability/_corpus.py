"""What the bad-input corpus is built from: tiny models and data, the :class:`Case` row, the
:class:`World` a row's setup gets, and helpers that provoke faults (a full disk, an OS that refuses).

The rows live in ``test_bad_inputs.py`` and the ``_cases_*.py`` modules beside it.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdforge.io as kio
from kdforge.cli.main import main
from kdforge.errors import (
    KdforgeError,
)

VOCAB = 256
SEQ = 16


# --------------------------------------------------------------------------------------------
# tiny models, tokenizers, data (built from configs, seconds)
# --------------------------------------------------------------------------------------------
def tiny_llama(vocab: int = VOCAB, seed: int = 0, max_positions: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer(extra: str = ""):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(["It is a truth universally acknowledged." + extra, "Emma Woodhouse, handsome."] * 10,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


class MLP(nn.Module):
    def __init__(self, d_in: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 8), nn.ReLU(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, d_in: int = 4, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n: int = 4, length: int = SEQ, vocab: int = VOCAB) -> None:
        self.ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


@dataclass
class Shared:
    """Objects built once per module: a teacher, its tokenizer, token data, a complete cache."""

    root: Path
    _memo: dict[str, Any] = field(default_factory=dict)

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def teacher(self):
        from kdforge.teachers import OnlineTeacher

        return self._get("teacher", lambda: OnlineTeacher(tiny_llama()))

    @property
    def tokenizer(self):
        return self._get("tokenizer", tiny_tokenizer)

    @property
    def sequences(self) -> torch.Tensor:
        return self._get("seqs", lambda: torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(1)))

    @property
    def model_dir(self) -> Path:
        """The teacher and its tokenizer saved as a Hugging Face folder."""

        def save() -> Path:
            path = self.root / "model"
            self.teacher.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            return path

        return self._get("model_dir", save)

    @property
    def cache(self) -> Path:
        """A complete 2-shard cache (template: cases copy it before touching it)."""
        from kdforge.teachers import build_teacher_cache

        return self._get("cache", lambda: build_teacher_cache(
            self.teacher, self.sequences, self.root / "cache", k=4, shard_size=4, batch_size=4,
            tokenizer=self.tokenizer))


@dataclass
class World:
    """What a case's setup gets: a private folder, monkeypatch, the shared objects."""

    tmp: Path
    mp: pytest.MonkeyPatch
    shared: Shared
    argv: list[str] = field(default_factory=list)  # set by CLI cases

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def cache_copy(self, name: str = "cache") -> Path:
        return Path(shutil.copytree(self.shared.cache, self.tmp / name))


Action = Callable[[], Any]
Setup = Callable[[World], tuple[Action, list[Path]]]


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    error: type[KdforgeError]
    problem: tuple[str, ...]  # words (lower case) the problem must contain
    fix: tuple[str, ...]  # words (lower case) the fix must contain
    setup: Setup
    cli: tuple[str, ...] | None = None  # set by cli(): argv run without --debug as well


# --------------------------------------------------------------------------------------------
# helpers to provoke errors
# --------------------------------------------------------------------------------------------
def cli_case(id: str, area: str, error: type[KdforgeError], problem: tuple[str, ...], fix: tuple[str, ...],
             argv: Callable[[World], tuple[list[str], list[Path]]]) -> Case:
    """A case run through ``kdforge`` (with ``--debug`` to see the class; without to see exit 2)."""

    def setup(w: World) -> tuple[Action, list[Path]]:
        w.argv, keep = argv(w)
        return (lambda: main(["--debug", *w.argv])), keep

    return Case(id, area, error, problem, fix, setup, cli=("yes",))


LLM_KD_OK = "recipe: llm_kd\noutput_dir: out\n"


def run_yaml(text: str, *extra: str) -> Callable[[World], tuple[list[str], list[Path]]]:
    def argv(w: World) -> tuple[list[str], list[Path]]:
        return ["run", str(w.write("recipe.yaml", text)), "--dry-run", *extra], []

    return argv


class _FullDisk:
    """A file object whose write puts half the bytes on disk, then fails with ENOSPC."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def write(self, data: Any) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._fh.__exit__(*exc)


class _OsWithFullDisk:
    """The ``os`` module as kdforge.io sees it, with a full disk behind ``fdopen``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fdopen(fd: int, *args: Any, **kwargs: Any) -> _FullDisk:
        return _FullDisk(os.fdopen(fd, *args, **kwargs))


def fill_disk(w: World, *, everywhere: bool = False) -> None:
    """From now on every kdforge.io.atomic_write (or, ``everywhere``, every os.fdopen) hits a full disk."""
    if everywhere:
        real = os.fdopen
        w.mp.setattr(os, "fdopen", lambda fd, *a, **kw: _FullDisk(real(fd, *a, **kw)))
    else:
        w.mp.setattr(kio, "os", _OsWithFullDisk())


def distiller(w: World, *, student: nn.Module | None = None, teacher: Any = None, data: Any = None,
              objective: Any = None, out: Path | None = None, max_steps: int = 2, callbacks: Any = (), **cfg: Any):
    from kdforge.train import ClassificationTask, Distiller, TrainConfig

    torch.manual_seed(0)
    cfg.setdefault("save_every", max_steps)
    config = TrainConfig(max_steps=max_steps, batch_size=4, progress=False, output_dir=str(out) if out else None,
                         **cfg)
    return Distiller(student if student is not None else MLP(), teacher, task=ClassificationTask(),
                     objective=objective or [{"name": "cross_entropy", "weight": 1.0}], config=config,
                     train_data=Rows() if data is None else data, callbacks=callbacks)


def lm_distiller(w: World, student: nn.Module, teacher: Any, data: Any, objective: list[dict]) -> Any:
    from kdforge.train import CausalLMTask, Distiller, TrainConfig

    return Distiller(student, teacher, task=CausalLMTask(), objective=objective,
                     config=TrainConfig(max_steps=1, batch_size=2, progress=False), train_data=data)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
