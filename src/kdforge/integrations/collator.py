"""A collator that pads causal-LM examples *and* their cached teacher top-k.

Hugging Face's collators drop or refuse keys they do not know; a teacher cache adds
``teacher_ids`` / ``teacher_logprobs`` ``[T, k]`` per example. :class:`KDCollator` pads

* ``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with ``-100``
  (missing labels are made from ``input_ids``, padding ignored),
* the teacher keys by repeating each example's last row (finite, valid values at positions the
  loss never reads, since their labels are ``-100``),

on the right, to the longest example of the batch; every other key is stacked as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import DataError

__all__ = ["KDCollator"]


def _tensor(x: Any) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(x)


@dataclass
class KDCollator:
    """Right-pad a list of examples into ``[B, T]`` / ``[B, T, k]`` tensors.

    Args:
        pad_token_id: id written into padded ``input_ids``.
        teacher_keys: per-position keys padded by edge repetition.
    """

    pad_token_id: int = 0
    teacher_keys: tuple[str, ...] = ("teacher_ids", "teacher_logprobs")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features or "input_ids" not in features[0]:
            raise DataError("KDCollator needs examples with 'input_ids'",
                            "tokenize the dataset first (input_ids, optional labels/attention_mask)")
        ids = [_tensor(f["input_ids"]).long() for f in features]
        length = max(int(x.shape[0]) for x in ids)
        out: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f, x in zip(features, ids):
            pad = length - int(x.shape[0])
            attn = _tensor(f.get("attention_mask", torch.ones_like(x))).long()
            labels = _tensor(f["labels"]).long() if "labels" in f else x.masked_fill(attn == 0, IGNORE_INDEX)
            out["input_ids"].append(torch.nn.functional.pad(x, (0, pad), value=self.pad_token_id))
            out["attention_mask"].append(torch.nn.functional.pad(attn, (0, pad), value=0))
            out["labels"].append(torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX))
            for key in self.teacher_keys:
                if key in f:
                    t = _tensor(f[key])
                    if t.shape[0] != x.shape[0]:
                        raise DataError(
                            f"{key} covers {t.shape[0]} positions, input_ids {x.shape[0]}",
                            "keep the cached teacher keys aligned with the tokens they were computed on",
                        )
                    tail = t[-1:].expand(pad, *t.shape[1:])
                    out.setdefault(key, []).append(torch.cat([t, tail], dim=0))
        for key in features[0]:
            if key not in out:
                out[key] = [_tensor(f[key]) for f in features]
        return {key: torch.stack(values) for key, values in out.items()}
