"""OnlineTeacher and load_teacher: frozen, no-grad, correct top-k, local-folder loading."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import AssetError, ConfigError, ShapeError
from kdforge.teachers import OnlineTeacher, load_teacher, topk_logprobs

from .conftest import tiny_llama


def test_online_teacher_is_frozen_and_in_eval_mode(teacher_model):
    model = tiny_llama()
    model.train()
    teacher = OnlineTeacher(model)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    teacher.train()
    assert not model.training


def test_teacher_logits_carry_no_graph_but_work_in_student_loss(teacher_model, sequences):
    teacher = OnlineTeacher(teacher_model)
    logits = teacher.logits(sequences[:2])
    assert logits.shape == (2, 16, 256) and not logits.requires_grad
    student = torch.randn(2, 16, 256, requires_grad=True)
    loss = (logits.softmax(-1) * (logits.log_softmax(-1) - student.log_softmax(-1))).sum()
    loss.backward()  # would fail with inference-mode tensors
    assert student.grad is not None


def test_topk_matches_dense_log_softmax_topk(teacher_model, sequences):
    teacher = OnlineTeacher(teacher_model)
    sparse = teacher.topk(sequences[:3], torch.ones_like(sequences[:3]), k=5)
    ref_lp, ref_ids = teacher.logits(sequences[:3]).float().log_softmax(-1).topk(5, dim=-1)
    assert sparse.ids.shape == (3, 16, 5) and sparse.vocab_size == 256
    assert torch.equal(sparse.ids, ref_ids)
    torch.testing.assert_close(sparse.logprobs, ref_lp, rtol=0, atol=1e-5)


def test_topk_logprobs_chunking_gives_same_result():
    logits = torch.randn(3, 7, 50)
    a = topk_logprobs(logits, 4, chunk_tokens=2)
    b = topk_logprobs(logits, 4, chunk_tokens=1000)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)


def test_teacher_dtype_is_applied_and_logprobs_stay_float32(sequences):
    teacher = OnlineTeacher(tiny_llama(), dtype="bfloat16")
    assert teacher.dtype == torch.bfloat16
    sparse = teacher.topk(sequences[:1], k=3)
    assert sparse.logprobs.dtype == torch.float32
    assert (sparse.logprobs.exp().sum(-1) <= 1.0 + 1e-3).all()


def test_vocab_size_slices_padded_logits(sequences):
    teacher = OnlineTeacher(tiny_llama(vocab_size=320), vocab_size=256)
    assert teacher.logits(sequences[:1]).shape[-1] == 256
    assert teacher.topk(sequences[:1], k=4).vocab_size == 256


def test_weights_hash_changes_with_weights():
    a, b = OnlineTeacher(tiny_llama(seed=0)), OnlineTeacher(tiny_llama(seed=0))
    c = OnlineTeacher(tiny_llama(seed=1))
    assert a.weights_hash() == b.weights_hash() != c.weights_hash()


def test_non_module_teacher_and_bad_dtype_raise_config_error(teacher_model):
    with pytest.raises(ConfigError):
        OnlineTeacher("not a model")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown dtype"):
        OnlineTeacher(teacher_model, dtype="float8")


def test_one_dimensional_input_raises_shape_error(teacher_model):
    with pytest.raises(ShapeError, match="batch"):
        OnlineTeacher(teacher_model).logits(torch.tensor([1, 2, 3]))


def test_load_teacher_from_local_folder(tmp_path, sequences):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher", dtype="float32")
    torch.testing.assert_close(teacher.logits(sequences[:1]), model(sequences[:1]).logits)
    assert str(tmp_path / "teacher") in teacher.name


def test_load_teacher_missing_folder_raises_asset_error(tmp_path):
    # the error of kdforge.models, the same one `kdforge run` gives for teacher.model
    with pytest.raises(AssetError, match="no such folder") as exc:
        load_teacher(tmp_path / "nowhere")
    assert "save_pretrained" in exc.value.fix


@pytest.mark.gpu
def test_cuda_teacher_in_bf16_returns_signal_on_the_callers_device(sequences):
    teacher = OnlineTeacher(tiny_llama(), device="cuda", dtype="bfloat16")
    sparse = teacher.topk(sequences[:2], k=4)  # CPU input, CUDA teacher
    assert sparse.ids.device.type == "cpu" and sparse.logprobs.dtype == torch.float32
    logits = teacher.logits(sequences[:2].cuda())
    assert logits.device.type == "cuda" and logits.dtype == torch.bfloat16


def test_logits_width_is_read_off_the_head_without_a_forward(sequences):
    teacher = OnlineTeacher(tiny_llama(vocab_size=320))
    assert teacher.logits_width() == 320 == teacher.logits(sequences[:1]).shape[-1]
    assert OnlineTeacher(tiny_llama(vocab_size=320), vocab_size=256).logits_width() == 256
    assert OnlineTeacher(tiny_llama(vocab_size=320), vocab_size=400).logits_width() is None  # the forward raises

    class HeadlessLM(torch.nn.Module):  # logits without get_output_embeddings: width unknown before a forward
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(256, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    assert OnlineTeacher(HeadlessLM()).logits_width() is None


def test_topk_logprobs_bf16_and_float32_logits_agree_with_log_softmax():
    logits = torch.randn(5, 9, 300) * 4
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        z = logits.to(dtype)
        sparse = topk_logprobs(z, 7, chunk_tokens=4)
        ref_lp = z.float().log_softmax(-1)
        assert torch.equal(sparse.ids, z.float().topk(7, dim=-1).indices)
        torch.testing.assert_close(sparse.logprobs, ref_lp.gather(-1, sparse.ids), rtol=0, atol=1e-5)
