"""The trainer's batch stream: a map-style dataset read in a (seed, epoch)-determined order.

kdforge owns the sampler so that the order depends only on ``(seed, epoch)`` and a run resumes
mid-epoch exactly (:class:`~kdforge.train.sampler.EpochSampler`). A custom sampler (DDK's domain
reweighting, active selection) plugs in as ``Distiller(..., sampler=...)``: it implements
``set_epoch``, ``set_start``, ``per_rank``, ``__iter__``/``__len__`` and, when it has state that
must survive a resume, ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdforge.errors import DataError
from kdforge.train.callbacks import TrainerState

__all__ = ["BatchStream", "dataset_of"]


def dataset_of(data: Any, collate_fn: Any, what: str) -> tuple[Any, Any]:
    """``(dataset, collate_fn)`` of a map-style dataset or a DataLoader (whose collate is reused)."""
    if isinstance(data, DataLoader):
        return data.dataset, collate_fn or data.collate_fn
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise DataError(f"{what} must be a map-style dataset (with __len__ and __getitem__) or a DataLoader, "
                        f"got {type(data).__name__}", "wrap an iterable in a list or a datasets.Dataset")
    return data, collate_fn


class BatchStream:
    """Endless micro-batches of ``dataset``; the position lives in ``state`` (epoch, batch_in_epoch)."""

    def __init__(self, dataset: Any, collate_fn: Callable | None, sampler: Any, *, batch_size: int, seed: int,
                 num_workers: int, device: torch.device, state: TrainerState) -> None:
        self.dataset, self.collate_fn, self.sampler = dataset, collate_fn, sampler
        self.batch_size, self.seed, self.num_workers, self.device = batch_size, seed, num_workers, device
        self.state = state
        self.batches_per_epoch = -(-sampler.per_rank // batch_size)
        if self.batches_per_epoch == 0:
            raise DataError("the training dataset is empty", "pass a dataset with at least one example")
        self._iter: Iterator[Any] | None = None

    def loader(self, dataset: Any, sampler: Any, collate_fn: Any) -> DataLoader:
        # A private generator keeps the loader from drawing from the global torch RNG (exact resume).
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=self.num_workers, generator=gen)

    def reset(self) -> None:
        """Forget the open iterator (after a resume moved the position)."""
        self._iter = None

    def next(self) -> Any:
        from accelerate.utils import send_to_device

        state = self.state
        while True:
            if self._iter is None:
                self.sampler.set_epoch(state.epoch)
                self.sampler.set_start(state.batch_in_epoch * self.batch_size)
                self._iter = iter(self.loader(self.dataset, self.sampler, self.collate_fn))
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                state.epoch += 1
                state.batch_in_epoch = 0
                continue
            state.batch_in_epoch += 1
            if state.batch_in_epoch >= self.batches_per_epoch:  # epoch done: position = next epoch
                self._iter = None
                state.epoch += 1
                state.batch_in_epoch = 0
            return send_to_device(batch, self.device)
