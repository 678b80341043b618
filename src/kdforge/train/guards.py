"""Guard rails of the training step: no silent no-ops, no non-finite updates.

Two checks, each sharing a host read the step makes anyway (one to learn the step's position
count ``N`` before the forward passes, one to learn whether the loss is finite before the update):

* **Empty micro-batches** (:class:`EmptyBatches`). A micro-batch with no real position (every
  label ``ignore_index``, every mask false) on every process contributes nothing but a zero
  gradient: it is skipped (no forward, no backward) and counted, with a warning. A step whose
  micro-batches are all empty makes no update and is not counted as a step. Training stops with a
  :class:`~kdforge.errors.DataError` when the first ``train.empty_start_batches`` micro-batches,
  or a whole epoch's worth in a row, held no real position: the run would "succeed" without the
  weights ever moving.
* **Non-finite values** (:class:`FiniteGuard`). The loss of every micro-batch, every term and the
  gradient norm are checked once per optimizer step, before the update. ``train.on_nonfinite:
  stop`` (default) raises a :class:`~kdforge.errors.NonFiniteError` naming the term, the step,
  the micro-batch and its data position; ``skip`` drops the update (weights, optimizer moments and
  LR schedule untouched; the step still counts) and stops only after
  ``train.max_nonfinite_skips`` skipped steps in a row. Neither can reach a checkpoint: a
  checkpoint is written only after a finite update. Under fp16 mixed precision the gradient check
  is left to the grad scaler (an overflow there is routine; the scaler skips that update itself).
  The same pass notes a term with a non-zero weight whose value is exactly 0 on every one of the
  first :data:`ZERO_TERM_STEPS` steps (e.g. ``cross_entropy`` on data whose labels are all
  masked) and warns once.

All flags are reduced over processes, so every process takes the same branch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdforge.errors import DataError, NonFiniteError

logger = logging.getLogger(__name__)

__all__ = ["ZERO_TERM_STEPS", "EmptyBatches", "FiniteGuard", "grad_norm_of"]

#: steps over which a weighted term that is exactly 0 on every step is reported
ZERO_TERM_STEPS = 10

_EMPTY_FIX = (
    "check the data's labels and masks: every label is ignore_index (-100) or every attention/loss mask is "
    "false, e.g. a chat template whose assistant mask matches nothing, prompts longer than seq_len so every "
    "answer token is cut off, or labels that were never set"
)


_NONFINITE_FIX = ("train.on_nonfinite: skip drops such updates instead of stopping; checkpoints are written "
                  "only after finite updates, so a run can resume from its last one after the fix")


class EmptyBatches:
    """Counts micro-batches with no real position; raises when training would run on nothing.

    Args:
        start_limit: empty micro-batches in a row, before any real position was trained on, that
            raise (None: only the epoch rule).
        batches_per_epoch: micro-batches in one epoch (per process); that many empty ones in a row
            raise at any time.
        describe: a short name of the data for messages (e.g. the dataset class).
    """

    def __init__(self, start_limit: int | None, batches_per_epoch: int, describe: str = "the training data") -> None:
        self.start_limit = start_limit
        self.batches_per_epoch = max(int(batches_per_epoch), 1)
        self.describe = describe
        self.skipped = 0  # empty micro-batches skipped so far (all processes agree)
        self.in_a_row = 0

    def observe(self, counts: Sequence[int], positions_seen: int, where: Sequence[str] = ()) -> list[bool]:
        """``counts``: the step's global position count per micro-batch (``where[i]`` names its data
        position); returns which micro-batches to keep."""
        keep = [c > 0 for c in counts]
        for i, kept in enumerate(keep):
            if kept:
                self.in_a_row = 0
                continue
            self.skipped += 1
            self.in_a_row += 1
            if (self.skipped & (self.skipped - 1)) == 0:  # the 1st, 2nd, 4th, 8th...: counted, not spammed
                logger.warning("skipped a micro-batch with no real positions (%s); %d skipped so far",
                               where[i] if i < len(where) else f"micro-batch {i}", self.skipped)
            self._check(positions_seen + sum(counts[:i]))
        return keep

    def _check(self, positions_seen: int) -> None:
        if self.in_a_row >= self.batches_per_epoch:
            raise DataError(
                f"{self.batches_per_epoch} micro-batches in a row, a whole epoch of {self.describe}, hold no "
                "real position to train on: the loss would be 0 and the weights would never move",
                _EMPTY_FIX,
            )
        if self.start_limit is not None and positions_seen == 0 and self.in_a_row >= self.start_limit:
            raise DataError(
                f"the first {self.in_a_row} micro-batches of {self.describe} hold no real position to train on "
                "(zero tokens/samples count toward the loss)",
                _EMPTY_FIX + "; if the data is only sparsely labelled on purpose, raise train.empty_start_batches "
                "(or set it to null)",
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


def grad_norm_of(params: Sequence[torch.nn.Parameter]) -> torch.Tensor | None:
    """This process's gradient norm (no host read, grads unchanged), or None without gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: DTensor shards -> the global norm


class FiniteGuard:
    """One host read per optimizer step: finite losses and gradient, and weighted terms stuck at 0.

    Args:
        on_nonfinite: ``"stop"`` or ``"skip"``.
        max_skips: skipped steps in a row that stop training anyway (``skip``).
    """

    def __init__(self, on_nonfinite: str = "stop", max_skips: int = 8) -> None:
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_skips
        self.skips_in_a_row = 0
        self.skipped = 0
        self._nonzero: set[str] = set()
        self._seen: set[str] = set()
        self._zero_steps = 0
        self._reported = False

    def check(self, acc: Any, *, micro_totals: Sequence[torch.Tensor], terms: Mapping[str, torch.Tensor],
              weights: Mapping[str, float], grad_norm: torch.Tensor | None, step: int,
              positions: Sequence[str]) -> bool:
        """True: apply the update. False: skip it (``skip`` mode). Raises NonFiniteError (``stop``,
        or too many skips in a row). ``step`` is the 1-based step being taken; ``positions[i]``
        names micro-batch ``i``'s data position."""
        keys = list(terms)
        device = acc.device
        values = [*micro_totals, *(terms[k] for k in keys)]
        if grad_norm is not None:
            values.append(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])
        flags = torch.cat([(~torch.isfinite(stacked)).float(), (stacked == 0).float()])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, "sum")
        read = flags.tolist()  # the step's one blocking read for finiteness
        n = len(values)
        bad, zero = read[:n], read[n:]
        m = len(micro_totals)
        self._note_zero_terms(keys, [zero[m + i] >= acc.num_processes for i in range(len(keys))], weights, step)
        if not any(bad):
            self.skips_in_a_row = 0
            return True
        micro = next((i for i in range(m) if bad[i]), None)
        term = next((k for i, k in enumerate(keys) if bad[m + i]), None)
        grad_bad = grad_norm is not None and bool(bad[-1]) and term is None and micro is None
        problem = self._describe(term, terms, micro, positions, grad_bad, step)
        if self.on_nonfinite == "skip":
            self.skips_in_a_row += 1
            self.skipped += 1
            if self.skips_in_a_row <= self.max_skips:
                logger.warning("%s: update skipped (train.on_nonfinite=skip; %d in a row, at most %d)",
                               problem, self.skips_in_a_row, self.max_skips)
                return False
            problem += f"; {self.skips_in_a_row} steps in a row were not finite (train.max_nonfinite_skips={self.max_skips})"
        raise NonFiniteError(
            problem,
            "lower the learning rate, enable max_grad_norm, check the data for empty targets, or use bf16 "
            f"instead of fp16; {_NONFINITE_FIX}",
        )

    def raised(self, exc: NonFiniteError, *, step: int, micro: int, position: str, processes: int = 1) -> None:
        """A loss found non-finite inputs itself (e.g. NaN student logits): returns to skip the
        update (``skip``, one process), else raises ``exc`` with the step and micro-batch named."""
        where = f"step {step}, micro-batch {micro}" + (f" ({position})" if position else "")
        problem = f"{exc.problem} at {where}"
        if self.on_nonfinite == "skip" and processes == 1:
            self.skips_in_a_row += 1
            self.skipped += 1
            if self.skips_in_a_row <= self.max_skips:
                logger.warning("%s: update skipped (train.on_nonfinite=skip; %d in a row, at most %d)",
                               problem, self.skips_in_a_row, self.max_skips)
                return
            problem += f"; {self.skips_in_a_row} steps in a row were not finite (train.max_nonfinite_skips={self.max_skips})"
        elif self.on_nonfinite == "skip":
            problem += " (on_nonfinite: skip cannot skip a loss's own check under several processes)"
        raise NonFiniteError(problem, f"{exc.fix or ''}; {_NONFINITE_FIX}".lstrip("; ")) from None

    @staticmethod
    def _describe(term: str | None, terms: Mapping[str, torch.Tensor], micro: int | None,
                  positions: Sequence[str], grad_bad: bool, step: int) -> str:
        if grad_bad:
            return (f"the gradient is not finite at step {step} (every loss term was finite: the backward pass "
                    "overflowed)")
        what = f"loss term {term!r} is {float(terms[term])}" if term is not None else "the loss is"
        where = f"step {step}"
        if micro is not None:
            where += f", micro-batch {micro} ({positions[micro]})" if micro < len(positions) else f", micro-batch {micro}"
        return f"{what} (not finite) at {where}"

    def _note_zero_terms(self, keys: Sequence[str], zero: Sequence[bool], weights: Mapping[str, float],
                         step: int) -> None:
        if self._reported:
            return
        self._seen.update(keys)
        for key, is_zero in zip(keys, zero):
            if not is_zero or not weights.get(key, 0.0):
                self._nonzero.add(key)
        self._zero_steps += 1
        if self._zero_steps >= ZERO_TERM_STEPS:
            self.report_zero_terms(keys)

    def report_zero_terms(self, keys: Sequence[str] | None = None) -> None:
        """Warn (once) about weighted terms that were exactly 0 on every step checked so far; the
        trainer calls this at the end of a run shorter than :data:`ZERO_TERM_STEPS` steps."""
        if self._reported or self._zero_steps < 2:  # one step says little (an EMA teacher starts equal)
            return
        keys = list(keys) if keys is not None else sorted(self._seen)
        self._reported = True
        stuck = [k for k in keys if k not in self._nonzero]
        if stuck:
            logger.warning(
                "loss term(s) %s have a non-zero weight but were exactly 0 on each of the first %d steps: their "
                "positions are probably all masked (labels all ignore_index, or an empty mask), so they train "
                "nothing; check the data's labels/masks or drop the term(s)", ", ".join(stuck), self._zero_steps)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "skips_in_a_row": self.skips_in_a_row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.skips_in_a_row = int(state.get("skips_in_a_row", 0))
        self._reported = True  # the first steps were checked by the run that wrote the checkpoint
