"""distillation_loss: the causal shift, the num_items_in_batch contract, dense == sparse == chunked
paths against the registered losses called directly."""

from __future__ import annotations

import pytest
import torch

from kdforge.constants import IGNORE_INDEX
from kdforge.errors import DataError, VocabMismatchError
from kdforge.integrations import (
    KDCollator,
    distillation_loss,
    distillation_loss_from_hidden,
    sparse_teacher_from_batch,
)
from kdforge.losses import ForwardKL, SparseTeacher, cross_entropy, reverse_kl

from ._tiny import VOCAB, uneven_examples


def _batch(n=8, k=0):
    return KDCollator(pad_token_id=0)(uneven_examples(n, k=k))


def test_dense_loss_is_the_registered_loss_on_shifted_positions_over_real_targets():
    batch = _batch()
    s, t = torch.randn(8, batch["input_ids"].shape[1], VOCAB), torch.randn(8, batch["input_ids"].shape[1], VOCAB)
    out = distillation_loss(s, t, batch["labels"], loss="reverse_kl", temperature=2.0)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    expected = reverse_kl(s[:, :-1], t[:, :-1], mask=mask, temperature=2.0, reduction="sum") / mask.sum()
    torch.testing.assert_close(out.loss, expected)
    assert int(out.num_positions) == int(mask.sum())


def test_teacher_already_at_loss_positions_gives_the_same_loss():
    batch = _batch()
    s, t = torch.randn(8, batch["input_ids"].shape[1], VOCAB), torch.randn(8, batch["input_ids"].shape[1], VOCAB)
    full = distillation_loss(s, t, batch["labels"]).loss
    shifted = distillation_loss(s, t[:, :-1], batch["labels"]).loss
    torch.testing.assert_close(full, shifted)


def test_sparse_path_equals_the_loss_module_called_directly():
    batch = _batch(k=8)
    s = torch.randn(8, batch["input_ids"].shape[1], VOCAB)
    sparse = sparse_teacher_from_batch(batch, VOCAB)
    out = distillation_loss(s, sparse, batch["labels"], loss="forward_kl", temperature=1.5,
                            sparse_policy="renormalize")
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    direct = ForwardKL(temperature=1.5, sparse_policy="renormalize", reduction="sum")(
        s[:, :-1], sparse[:, :-1], mask=mask) / mask.sum()
    torch.testing.assert_close(out.loss, direct)


def test_num_items_in_batch_makes_micro_batch_sums_equal_the_full_batch_loss_and_gradient():
    batch = _batch(k=8)
    s = torch.randn(8, batch["input_ids"].shape[1], VOCAB, requires_grad=True)
    sparse = sparse_teacher_from_batch(batch, VOCAB)
    kw = {"ce_weight": 0.5, "kd_weight": 1.0}
    full = distillation_loss(s, sparse, batch["labels"], **kw).loss
    (g_full,) = torch.autograd.grad(full, s)
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    parts = [distillation_loss(s[i:i + 2], sparse[i:i + 2], batch["labels"][i:i + 2], num_items_in_batch=n, **kw).loss
             for i in range(0, 8, 2)]
    accumulated = sum(parts)
    (g_acc,) = torch.autograd.grad(accumulated, s)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(g_acc, g_full)
    # the uneven token counts matter: a mean of per-micro-batch means is another number
    naive = sum(distillation_loss(s[i:i + 2], sparse[i:i + 2], batch["labels"][i:i + 2], **kw).loss
                for i in range(0, 8, 2)) / 4
    assert abs(float(naive.detach()) - float(full.detach())) > 1e-3


def test_ce_term_is_cross_entropy_on_shifted_labels_and_kd_weight_zero_needs_no_teacher():
    batch = _batch()
    s = torch.randn(8, batch["input_ids"].shape[1], VOCAB)
    out = distillation_loss(s, None, batch["labels"], kd_weight=0.0, ce_weight=1.0)
    labels = batch["labels"][:, 1:]
    torch.testing.assert_close(out.loss, cross_entropy(s[:, :-1], labels=labels, reduction="mean"))
    assert float(out.kd) == 0.0


@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_path_from_hidden_states_equals_the_dense_path(sparse):
    batch = _batch(k=8)
    h = torch.randn(8, batch["input_ids"].shape[1], 16, dtype=torch.float64)
    w = torch.randn(VOCAB, 16, dtype=torch.float64, requires_grad=True)
    teacher = sparse_teacher_from_batch(batch) if sparse else torch.randn(8, h.shape[1], VOCAB, dtype=torch.float64)
    kw = {"loss": "forward_kl", "ce_weight": 0.3, "temperature": 2.0, "num_items_in_batch": 50}
    dense = distillation_loss(h @ w.T, teacher, batch["labels"], **kw)
    chunked = distillation_loss_from_hidden(h, w, teacher, batch["labels"], chunk_size=7, **kw)
    torch.testing.assert_close(chunked.loss, dense.loss)
    torch.testing.assert_close(chunked.ce, dense.ce)
    (g_dense,) = torch.autograd.grad(dense.loss, w)
    (g_chunk,) = torch.autograd.grad(chunked.loss, w)
    torch.testing.assert_close(g_chunk, g_dense)


def test_vocabulary_mismatch_is_a_clear_error_and_shared_prefix_slices_both_sides():
    batch = _batch()
    s = torch.randn(8, batch["input_ids"].shape[1], VOCAB)
    t = torch.randn(8, batch["input_ids"].shape[1], VOCAB + 8)
    with pytest.raises(VocabMismatchError, match="shared_prefix"):
        distillation_loss(s, t, batch["labels"])
    sliced = distillation_loss(s, t, batch["labels"], vocab_policy="shared_prefix").loss
    torch.testing.assert_close(sliced, distillation_loss(s, t[..., :VOCAB], batch["labels"]).loss)
    bad = SparseTeacher(torch.zeros(8, s.shape[1], 2, dtype=torch.long), torch.zeros(8, s.shape[1], 2), VOCAB * 2)
    with pytest.raises(VocabMismatchError):
        distillation_loss(s, bad, batch["labels"])


def test_missing_cache_keys_and_missing_teacher_are_data_errors():
    batch = _batch()
    with pytest.raises(DataError, match="teacher_ids"):
        sparse_teacher_from_batch(batch)
    with pytest.raises(DataError, match="kd_weight"):
        distillation_loss(torch.randn(8, batch["input_ids"].shape[1], VOCAB), None, batch["labels"])


def test_collator_pads_tokens_labels_and_teacher_keys_to_the_longest_example():
    items = uneven_examples(4, k=4)
    batch = KDCollator(pad_token_id=0)(items)
    length = max(len(x["input_ids"]) for x in items)
    assert batch["input_ids"].shape == (4, length) and batch["teacher_ids"].shape == (4, length, 4)
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, n:] == 0).all()
        torch.testing.assert_close(batch["teacher_logprobs"][i, :n], item["teacher_logprobs"])
        assert torch.isfinite(batch["teacher_logprobs"][i]).all()
