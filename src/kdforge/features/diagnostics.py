"""CKA as a diagnostic: how similar are a student's layers to the teacher layers they should match?

:func:`layer_similarity` runs both models on a few batches, pools the hidden states of the real
tokens (up to ``max_tokens``) and reports linear CKA (Kornblith et al. 2019) for each layer pair of a
layer map. Typical uses: check that a student built from teacher layers starts close to them, see
which layers a hint loss moved, or compare two students. CKA is invariant to rotations and isotropic
scaling, so models of different widths are compared without a projector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kdforge.errors import DataError
from kdforge.features.losses import linear_cka
from kdforge.features.taps import (
    FeatureRequest,
    LayerSpec,
    capture,
    layer_map,
    num_layers,
    source_layers,
)

__all__ = ["LayerSimilarity", "layer_similarity"]


@dataclass(frozen=True)
class LayerSimilarity:
    """Linear CKA between student hidden state ``student_layer`` and teacher ``teacher_layer``
    (hidden-state indices: 0 = embeddings) over ``tokens`` real tokens."""

    student_layer: int
    teacher_layer: int
    cka: float
    tokens: int


@torch.no_grad()
def layer_similarity(student: nn.Module, teacher: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                     layers: LayerSpec = "auto", max_tokens: int = 4096) -> list[LayerSimilarity]:
    """Linear CKA of matched hidden states of two Hugging Face models on the same inputs.

    Args:
        student, teacher: models accepting ``input_ids``/``attention_mask`` and
            ``output_hidden_states=True``.
        batches: dicts with ``input_ids [B, T]`` and optional ``attention_mask [B, T]``.
        layers: a layer map (:func:`~kdforge.features.layer_map`; ``"auto"`` = the kept teacher
            layers of a ``student_from_teacher`` student, else uniform).
        max_tokens: tokens pooled per layer (the first real tokens of the batches, in order).

    Returns:
        One :class:`LayerSimilarity` per layer pair, in student-layer order.
    """
    pairs = layer_map(layers, num_layers(student), num_layers(teacher), kept=source_layers(student))
    request = FeatureRequest(hidden_states=True)
    pooled_s: dict[int, list[torch.Tensor]] = {s: [] for s, _ in pairs}
    pooled_t: dict[int, list[torch.Tensor]] = {t: [] for _, t in pairs}
    taken = 0
    for batch in batches:
        if taken >= max_tokens:
            break
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        mask = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
        _, fs = capture(student, request, input_ids=ids, attention_mask=am)
        _, ft = capture(teacher, request, input_ids=ids.to(_device(teacher)),
                        attention_mask=am.to(_device(teacher)) if am is not None else None)
        keep = min(int(mask.sum()), max_tokens - taken)
        for s in pooled_s:
            pooled_s[s].append(fs.hidden_states[s][mask.to(fs.hidden_states[s].device)][:keep].float().cpu())
        for t in pooled_t:  # a teacher layer matched by several student layers is pooled once
            pooled_t[t].append(ft.hidden_states[t][mask.to(ft.hidden_states[t].device)][:keep].float().cpu())
        taken += keep
    if taken < 2:
        raise DataError(f"layer_similarity needs at least 2 real tokens, got {taken}",
                        "pass batches with real (attention_mask = 1) tokens")
    out = []
    for s, t in pairs:
        cka = linear_cka(torch.cat(pooled_s[s]).double(), torch.cat(pooled_t[t]).double())
        out.append(LayerSimilarity(s, t, float(cka), taken))
    return out


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
