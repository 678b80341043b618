"""layer_similarity: per-layer linear CKA between a student and its teacher."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import DataError
from kdforge.features import layer_similarity, linear_cka

from .test_taps import tiny_llama


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (4, 8), generator=g)
    am = torch.ones_like(ids)
    am[1, 5:] = 0  # padding is left out of the pooled tokens
    return [{"input_ids": ids[:2], "attention_mask": am[:2]}, {"input_ids": ids[2:], "attention_mask": am[2:]}]


def test_a_student_built_from_teacher_layers_matches_its_first_kept_layer_exactly():
    from kdforge.students import student_from_teacher

    teacher = tiny_llama(layers=4)
    student = student_from_teacher(teacher, [0, 3])
    rows = layer_similarity(student, teacher, _batches())
    assert [(r.student_layer, r.teacher_layer) for r in rows] == [(1, 1), (2, 4)]
    assert rows[0].cka == pytest.approx(1.0, abs=1e-6)  # block 0 is the same block on the same input
    assert rows[0].tokens == 29


def test_layer_similarity_equals_linear_cka_of_the_pooled_real_tokens():
    student, teacher = tiny_llama(layers=2, hidden=16, heads=2, kv=2, seed=1), tiny_llama(layers=2, seed=2)
    batches = _batches()
    (row,) = layer_similarity(student, teacher, batches, layers="last", max_tokens=10)
    with torch.no_grad():
        hs = torch.cat([student(**b, output_hidden_states=True).hidden_states[2][b["attention_mask"].bool()]
                        for b in batches])[:10]
        ht = torch.cat([teacher(**b, output_hidden_states=True).hidden_states[2][b["attention_mask"].bool()]
                        for b in batches])[:10]
    assert row.tokens == 10 and row.cka == pytest.approx(linear_cka(hs.double(), ht.double()).item(), rel=1e-5)
    with pytest.raises(DataError, match="2 real tokens"):
        layer_similarity(student, teacher, [{"input_ids": torch.tensor([[5]])}])
