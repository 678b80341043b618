""":class:`PSKDTeacher`: progressive self-knowledge distillation (PS-KD) — the model's own
predictions from the previous epoch are its teacher.

Kim et al., *Self-Knowledge Distillation with Progressive Refinement of Targets* (ICCV 2021): the
target of example ``i`` at epoch ``t`` is

    ``y_i^(t) = (1 - a_t) * onehot(y_i) + a_t * p_i^(t-1)``,

``p_i^(t-1)`` the model's softmax on ``i`` when it last saw ``i`` (the previous epoch's training
forward), ``a_t`` growing over training (paper: ``a_t = a_T * t / T``). The cross-entropy against
that soft target splits into

    ``CE(y^(t), q) = (1 - a_t) * CE(y, q) + a_t * KL(p^(t-1) || q) + a_t * H(p^(t-1))``,

the last term a constant of the student. So PS-KD is this source plus two terms whose weights
follow one schedule: ``cross_entropy`` weighted ``1 - a_t`` and ``forward_kl`` (``T = 1``) weighted
``a_t`` (``configs/fashion_mnist_regimes.yaml``); at ``a_t = 0`` the objective *is* cross-entropy.

How the predictions are obtained, at no extra forward pass: the source registers a forward hook on
the student; a forward in training mode with gradients on (the trainer's step) leaves its logits
in the source, and :meth:`signal` (which the trainer calls after running the student on the same
micro-batch) first **reads** the stored predictions of the batch's examples — the previous time
each was seen — and then **writes** the new ones. Evaluation forwards (eval mode or ``no_grad``)
record nothing. The batch must carry each example's dataset index (``batch["index"]``;
:class:`IndexedDataset` adds it).

**Compact storage.** Per example, the log-probabilities at the task's loss positions: dense
(``k=None`` or ``k >= C``: ``[N, *P, C]``) or the top-``k`` ids and log-probabilities
(``[N, *P, k]`` int32 + float), returned as a :class:`~kdforge.losses.signal.SparseTeacher`
(the losses' top-k path: tail bucket etc.). With ``path=`` the arrays are ``.npy`` memory maps on
disk (only the batch's rows are ever in memory), so a language model's ``[N, T-1, k]`` store does
not have to fit in RAM; ``P`` (positions per example) must then be the same for every example
(fixed-length sequences). An example not seen yet has the one-hot of its label as ``p`` (the
target is then the label itself), or the uniform distribution when it has no label.

Limits: one process (each rank of a data-parallel launch would keep only the examples it saw);
the chunked LM-head path is not used with this source (it provides a sparse signal).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import CheckpointError, ConfigError, DataError, ShapeError
from kdforge.losses.signal import SparseTeacher
from kdforge.teachers.forward import extract_logits
from kdforge.teachers.signal import TeacherSignal
from kdforge.teachers.sources.base import TeacherSource

__all__ = ["IndexedDataset", "PSKDTeacher", "PredictionStore"]

_ABSENT = -1.0e4  # log-probability of a class with no mass in a one-hot target (exp() is exactly 0 in float32)


class IndexedDataset(Dataset):
    """``dataset`` whose dict items also carry their position: ``item[key] = index`` (int64)."""

    def __init__(self, dataset: Dataset, key: str = "index") -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise DataError(f"IndexedDataset needs dict items, got {type(item).__name__}",
                            "wrap a dataset whose items are dicts (e.g. ImageClassificationDataset)")
        return {**item, self.key: torch.tensor(index, dtype=torch.long)}


class PredictionStore:
    """Per-example log-probabilities, dense or top-k, in memory or as ``.npy`` memory maps.

    Allocated at the first :meth:`write` (when the per-example positions ``P`` and the class count
    ``C`` are known). Rows not written yet are reported by :meth:`seen`.

    Args:
        num_examples: ``N``, the dataset size (indices ``0..N-1``).
        k: keep the top-``k`` classes per position (None: all, dense).
        path: a folder for the memory-mapped arrays (None: in memory).
        dtype: storage dtype of the log-probabilities (``torch.float32`` or ``torch.float16``).
    """

    def __init__(self, num_examples: int, k: int | None = None, path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if num_examples < 1:
            raise ConfigError(f"a prediction store needs at least one example, got num_examples={num_examples}",
                              "pass the training set's length")
        if k is not None and k < 1:
            raise ConfigError(f"top-k of a prediction store must be >= 1, got k={k}", "use k=None (dense) or k>=1")
        if dtype not in (torch.float32, torch.float16):
            raise ConfigError(f"prediction store dtype must be float32 or float16, got {dtype}", "use torch.float16")
        self.num_examples, self.k, self.dtype = int(num_examples), k, dtype
        self.path = Path(path) if path is not None else None
        self.num_classes: int | None = None
        self.positions: tuple[int, ...] | None = None
        self._logprobs: Any = None
        self._ids: Any = None
        self._seen: Any = None

    @property
    def dense(self) -> bool:
        return self.k is None or (self.num_classes is not None and self.k >= self.num_classes)

    @property
    def allocated(self) -> bool:
        return self._seen is not None

    def _alloc(self, positions: tuple[int, ...], num_classes: int) -> None:
        self.positions, self.num_classes = positions, num_classes
        width = num_classes if self.dense else int(self.k)  # type: ignore[arg-type]
        shape = (self.num_examples, *positions, width)
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float16
        if self.path is None:
            self._logprobs = torch.zeros(shape, dtype=self.dtype)
            self._ids = None if self.dense else torch.zeros(shape, dtype=torch.int32)
            self._seen = torch.zeros(self.num_examples, dtype=torch.bool)
            return
        from numpy.lib.format import open_memmap

        self.path.mkdir(parents=True, exist_ok=True)
        self._logprobs = open_memmap(self.path / "logprobs.npy", mode="w+", dtype=np_dtype, shape=shape)
        self._ids = None if self.dense else open_memmap(self.path / "ids.npy", mode="w+", dtype=np.int32, shape=shape)
        self._seen = open_memmap(self.path / "seen.npy", mode="w+", dtype=np.bool_, shape=(self.num_examples,))

    def write(self, index: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Store ``logprobs [B, *P, C]`` (log-softmax) as the rows ``index [B]``."""
        positions, num_classes = tuple(logprobs.shape[1:-1]), int(logprobs.shape[-1])
        if not self.allocated:
            self._alloc(positions, num_classes)
        elif (positions, num_classes) != (self.positions, self.num_classes):
            raise ShapeError(
                f"predictions of shape {tuple(logprobs.shape[1:])} per example, but the store holds "
                f"{(*self.positions, self.num_classes)}",  # type: ignore[misc]
                "a PS-KD store needs the same positions per example (fixed-length sequences, same classes)",
            )
        logprobs = logprobs.detach().float().cpu()
        if self.dense:
            values, ids = logprobs, None
        else:
            values, ids = torch.topk(logprobs, int(self.k), dim=-1)  # type: ignore[arg-type]
        rows = index.detach().cpu().long()
        if self.path is None:
            self._logprobs[rows] = values.to(self.dtype)
            if ids is not None:
                self._ids[rows] = ids.to(torch.int32)
            self._seen[rows] = True
            return
        r = rows.numpy()
        self._logprobs[r] = values.numpy().astype(self._logprobs.dtype)
        if ids is not None:
            self._ids[r] = ids.numpy().astype(np.int32)
        self._seen[r] = True

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(logprobs float32 [B, *P, w], ids int64 [B, *P, w] or None, seen bool [B])`` of rows ``index``."""
        rows = index.detach().cpu().long()
        if self.path is None:
            lp = self._logprobs[rows].float()
            ids = None if self._ids is None else self._ids[rows].long()
            return lp, ids, self._seen[rows].clone()
        r = rows.numpy()
        lp = torch.from_numpy(np.asarray(self._logprobs[r], dtype=np.float32))
        ids = None if self._ids is None else torch.from_numpy(np.asarray(self._ids[r], dtype=np.int64))
        return lp, ids, torch.from_numpy(np.asarray(self._seen[r], dtype=np.bool_))

    def state_dict(self) -> dict[str, Any]:
        """Flat: settings (JSON) and, for an in-memory store, its arrays (tensors)."""
        state: dict[str, Any] = {"num_examples": self.num_examples, "k": self.k,
                                 "positions": list(self.positions) if self.positions is not None else None,
                                 "num_classes": self.num_classes, "path": str(self.path) if self.path else None}
        if self.allocated and self.path is None:
            state["store.logprobs"] = self._logprobs.clone()
            state["store.seen"] = self._seen.clone()
            if self._ids is not None:
                state["store.ids"] = self._ids.clone()
        elif self.allocated:
            for arr in (self._logprobs, self._ids, self._seen):
                if arr is not None:
                    arr.flush()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("num_examples") != self.num_examples or state.get("k") != self.k:
            raise CheckpointError(
                f"the checkpoint's PS-KD store has num_examples={state.get('num_examples')}, k={state.get('k')}; "
                f"this one {self.num_examples}, {self.k}",
                "resume with the same dataset and PS-KD settings the run was started with")
        if state.get("num_classes") is None:
            return
        positions, classes = tuple(state["positions"]), int(state["num_classes"])
        if self.path is None:
            self._alloc(positions, classes)
            self._logprobs.copy_(state["store.logprobs"])
            self._seen.copy_(state["store.seen"])
            if self._ids is not None:
                self._ids.copy_(state["store.ids"])
            return
        from numpy.lib.format import open_memmap  # the arrays on disk are reopened as they are

        self.positions, self.num_classes = positions, classes
        self._logprobs = open_memmap(self.path / "logprobs.npy", mode="r+")
        self._ids = None if self.dense else open_memmap(self.path / "ids.npy", mode="r+")
        self._seen = open_memmap(self.path / "seen.npy", mode="r+")


class PSKDTeacher(TeacherSource):
    """The student's previous-epoch predictions as its teacher (PS-KD; see the module docstring).

    Args:
        student: the (unwrapped) student model; a forward hook records its training logits.
        num_examples: the training set's size (``batch[index_key]`` indexes it).
        k: store the top-``k`` classes per position (None: dense; right for 10 classes).
        index_key: batch key with each example's dataset index (:class:`IndexedDataset`).
        label_key: batch key of the labels (the target of examples not seen yet).
        path: folder for on-disk (memory-mapped) storage; None keeps the store in memory.
        dtype: storage dtype, ``torch.float32`` (default) or ``torch.float16``.

    Example::

        teacher = PSKDTeacher(student, len(train_set))
        objective = [{"name": "cross_entropy", "weight": {"schedule": "linear", "start": 1.0, "end": 0.2}},
                     {"name": "forward_kl", "weight": {"schedule": "linear", "start": 0.0, "end": 0.8},
                      "params": {"temperature": 1.0}}]
        Distiller(student, teacher, task=ClassificationTask(), objective=objective, config=cfg,
                  train_data=IndexedDataset(train_set)).train()
    """

    provides = frozenset({"dense", "sparse"})
    scores_new_samples = False

    def __init__(self, student: nn.Module, num_examples: int, *, k: int | None = None, index_key: str = "index",
                 label_key: str = "labels", path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(student, nn.Module):
            raise ConfigError(f"PSKDTeacher needs the student nn.Module, got {type(student).__name__}",
                              "pass the (unwrapped) student model")
        self.store = PredictionStore(num_examples, k=k, path=path, dtype=dtype)
        self.index_key, self.label_key = index_key, label_key
        self._captured: torch.Tensor | None = None
        self.recorded = 0  # micro-batches whose predictions were stored
        self._hook = student.register_forward_hook(self._capture)

    def __repr__(self) -> str:
        return f"PSKDTeacher(num_examples={self.store.num_examples}, k={self.store.k}, recorded={self.recorded})"

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._captured = extract_logits(output).detach()

    def remove(self) -> None:
        """Remove the forward hook from the student (the source records nothing afterwards)."""
        self._hook.remove()

    # -- TeacherSource -----------------------------------------------------------------------------
    def signal(self, batch: Mapping[str, Any], task: Any, *, features: Any = None) -> TeacherSignal:
        """The stored previous predictions of the batch's examples; then the current ones are stored."""
        if features is not None:
            raise ConfigError("feature terms need a teacher model's features; PS-KD's teacher is stored predictions",
                              "remove the feature terms, or use SelfTeacher (an EMA copy of the student)")
        if self.index_key not in batch:
            raise DataError(
                f"PS-KD needs each example's dataset index in the batch ({self.index_key!r}); keys: {sorted(batch)}",
                "wrap the training set: kdforge.teachers.sources.pskd.IndexedDataset(train_set)")
        index = batch[self.index_key].reshape(-1)
        captured, self._captured = self._captured, None
        current = None
        if captured is not None:
            current = torch.log_softmax(task.to_loss_positions(captured, batch, what="student logits").float(), -1)
            if current.shape[0] != index.shape[0]:
                raise ShapeError(f"the student's last training forward had {current.shape[0]} rows, the batch "
                                 f"{index.shape[0]}", "call the source right after the student's forward on this batch")
        if not self.store.allocated:
            if current is None:
                raise ConfigError("PS-KD has no prediction yet: the student has not run a training forward",
                                  "train with the Distiller (it runs the student before asking the source)")
            self.store._alloc(tuple(current.shape[1:-1]), int(current.shape[-1]))
        signal = self._previous(batch, task, index)
        if current is not None:
            self.store.write(index, current)
            self.recorded += 1
        return signal

    def _previous(self, batch: Mapping[str, Any], task: Any, index: torch.Tensor) -> TeacherSignal:
        lp, ids, seen = self.store.read(index)
        classes = int(self.store.num_classes)  # type: ignore[arg-type]
        labels = batch.get(self.label_key)
        fallback = None
        if not bool(seen.all()):  # never seen: the label's one-hot (uniform without a label)
            fallback = _label_logprobs(labels, tuple(lp.shape[:-1]), classes, task, batch)
        device = labels.device if torch.is_tensor(labels) else torch.device("cpu")
        if self.store.dense:
            if fallback is not None:
                lp = torch.where(_expand(seen, lp), lp, fallback)
            return TeacherSignal(logits=lp.to(device))
        assert ids is not None
        if fallback is not None:
            fb_ids, fb_lp = _sparse_fallback(fallback, lp.shape[-1])
            ids = torch.where(_expand(seen, ids), ids, fb_ids)
            lp = torch.where(_expand(seen, lp), lp, fb_lp)
        return TeacherSignal(sparse=SparseTeacher(ids.to(device), lp.to(device), classes))

    def state_dict(self) -> dict[str, Any]:
        return {"recorded": self.recorded, **self.store.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.store.load_state_dict(state)
        self.recorded = int(state.get("recorded", 0))


def _expand(seen: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return seen.reshape(seen.shape[0], *([1] * (like.ndim - 1)))


def _label_logprobs(labels: Any, lead: tuple[int, ...], classes: int, task: Any,
                    batch: Mapping[str, Any]) -> torch.Tensor:
    """``[*lead, C]`` log-probabilities: one-hot of the label where there is one, uniform elsewhere."""
    out = torch.full((*lead, classes), -float(np.log(classes)), dtype=torch.float32)
    if not torch.is_tensor(labels):
        return out
    y = labels.detach().cpu().long()
    if y.ndim == len(lead) and tuple(y.shape) != lead:  # an LM's labels [B, T]: the task aligns them
        y = task.to_loss_positions(y, batch, what="labels")
    if tuple(y.shape) != lead:
        return out
    has = y != IGNORE_INDEX
    onehot = torch.full((*lead, classes), _ABSENT, dtype=torch.float32)
    onehot.scatter_(-1, y.clamp(0, classes - 1).unsqueeze(-1), 0.0)
    return torch.where(has.unsqueeze(-1), onehot, out)


def _sparse_fallback(fallback: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` of a one-hot/uniform fallback as (ids, log-probs); zero-mass entries padded
    as repeats of the first id with log-prob ``-inf`` (no mass on either side)."""
    lp, ids = torch.topk(fallback, k, dim=-1)
    zero = lp <= _ABSENT
    ids = torch.where(zero, ids[..., :1].expand_as(ids), ids)
    lp = lp.masked_fill(zero, -float("inf"))
    return ids.long(), lp
