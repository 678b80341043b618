"""Pre-flight estimate: the memory and disk a run will need, and its time per step.

Every size here is computed from shapes, never measured by running the job:

* **weights** — ``sum(numel x element_size)`` over a model's parameters (exact; models are built
  on the ``meta`` device from their config, so a 7B teacher costs nothing to size);
* **gradients** — one tensor per trainable parameter, same dtype: ``trainable x itemsize``;
* **AdamW state** — ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, in the parameter's
  dtype (float32 for a float32 student): ``2 x trainable x itemsize``;
* **logits** — the largest ``[rows, vocab]`` float32 array of a step (the student's logits and
  their gradient: ``2 x rows x vocab x 4``), or one chunk of it on the chunked LM-head path;
* **teacher cache** — ``sequences x record_bytes`` with the encoding's uncompressed record
  (:func:`kdforge.teachers.cache.codec.record_dtype`); compressed encodings write less.

Whether an estimate fits the machine is :mod:`kdforge.preflight.fits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Estimate", "Item", "adamw_state_bytes", "cache_bytes", "fmt_bytes", "grad_bytes", "logits_bytes",
           "param_bytes", "trainable_numel"]


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def fmt_seconds(s: float) -> str:
    """``42 -> '42 s'``, ``300 -> '5.0 min'``, ``7200 -> '2.0 h'``."""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def param_bytes(model: Any) -> int:
    """Bytes of the model's parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def trainable_numel(model: Any) -> int:
    """Elements of the trainable parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _itemsize(model: Any) -> int:
    return next(iter(model.parameters())).element_size()


def grad_bytes(model: Any) -> int:
    """Bytes of the gradients of the trainable parameters."""
    return trainable_numel(model) * _itemsize(model)


def adamw_state_bytes(model: Any) -> int:
    """Bytes of AdamW's ``exp_avg`` + ``exp_avg_sq`` (2 x trainable params, parameter dtype)."""
    return 2 * trainable_numel(model) * _itemsize(model)


def logits_bytes(rows: int, vocab_size: int, *, itemsize: int = 4, with_grad: bool = True) -> int:
    """Bytes of a ``[rows, vocab]`` logits array (and its gradient when ``with_grad``)."""
    return rows * vocab_size * itemsize * (2 if with_grad else 1)


def cache_bytes(sequences: int, seq_len: int, k: int, vocab_size: int, encoding: str = "compact-u8",
                tail_samples: int = 0) -> tuple[int, float]:
    """``(total bytes, bytes per token)`` of a teacher cache of ``sequences`` blocks of ``seq_len``
    tokens, from the encoding's uncompressed record (compressed encodings write less)."""
    from kdforge.teachers.cache.codec import get_encoding, record_dtype

    record = record_dtype(get_encoding(encoding), seq_len, k, vocab_size, tail_samples).itemsize
    return sequences * record, record / seq_len


@dataclass(frozen=True)
class Item:
    """One line of an estimate: what, how many bytes, memory or disk, and how it was computed."""

    name: str
    bytes: int
    kind: Literal["memory", "disk"] = "memory"
    note: str = ""


@dataclass
class Estimate:
    """What a run will need (:mod:`kdforge.preflight.estimate`).

    Attributes:
        items: the memory and disk lines; the memory lines add up to the peak (they are alive at
            the same time), the disk lines to what the run writes.
        device: where the memory lines live (``cpu``, ``cuda``...).
        step_seconds: time per optimizer step from a probe (None: no probe was run).
        steps: optimizer steps of the whole run (all methods and seeds), when known.
        notes: free-text remarks (what could not be estimated and why).
    """

    items: list[Item] = field(default_factory=list)
    device: str = "cpu"
    step_seconds: float | None = None
    steps: int | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, nbytes: int, kind: Literal["memory", "disk"] = "memory", note: str = "") -> None:
        self.items.append(Item(name, int(nbytes), kind, note))

    def total(self, kind: Literal["memory", "disk"]) -> int:
        return sum(i.bytes for i in self.items if i.kind == kind)

    @property
    def memory_bytes(self) -> int:
        return self.total("memory")

    @property
    def disk_bytes(self) -> int:
        return self.total("disk")

    def lines(self) -> list[str]:
        """A readable table (for the console and the log)."""
        out = [f"pre-flight estimate (memory on {self.device}):"]
        for kind in ("memory", "disk"):
            rows = [i for i in self.items if i.kind == kind]
            for i in rows:
                out.append(f"  {kind:<6}  {i.name:<44} {fmt_bytes(i.bytes):>10}" + (f"  ({i.note})" if i.note else ""))
            if rows:
                out.append(f"  {kind:<6}  {'total':<44} {fmt_bytes(self.total(kind)):>10}")
        if self.step_seconds is not None:
            line = f"  time    {'per optimizer step (two-step probe)':<44} {self.step_seconds:>8.3f} s"
            if self.steps:
                line += f"  (x {self.steps} steps = ~{fmt_seconds(self.step_seconds * self.steps)} of training)"
            out.append(line)
        elif self.steps:
            out.append(f"  time    {self.steps} optimizer steps in all (pass --probe to time one)")
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes,
                "items": [vars(i) for i in self.items], "step_seconds": self.step_seconds, "steps": self.steps,
                "notes": list(self.notes)}
