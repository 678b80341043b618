"""The README's "thirty-second tour", run on a tiny Llama so the snippet cannot rot."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdforge.losses import SparseTeacher, forward_kl, generalized_jsd
from kdforge.students import student_from_teacher
from kdforge.teachers import (
    OnlineTeacher,
    TeacherCacheDataset,
    build_teacher_cache,
    collate_teacher_cache,
)
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig


def _tiny_teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen it so there is something to learn
        model.lm_head.weight.mul_(30.0)
    return model


def test_readme_tour_runs_and_kd_from_the_cache_moves_the_student_toward_the_teacher(tmp_path):
    teacher = _tiny_teacher()
    train_blocks = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_logits = teacher(train_blocks).logits
    student_logits = teacher_logits + torch.randn_like(teacher_logits)
    labels = train_blocks.clone()

    # 1. losses
    loss = forward_kl(student_logits, teacher_logits, mask=labels != -100, temperature=2.0)
    jsd = generalized_jsd(student_logits, SparseTeacher.from_logits(teacher_logits, k=16), beta=0.5)
    assert loss > 0 and jsd > 0

    # 2. student from the teacher
    student = student_from_teacher(teacher, layers="every_k", num_layers=2, freeze_embeddings=True)
    assert student.config.num_hidden_layers == 2

    # 3. cache the teacher once
    cache = build_teacher_cache(OnlineTeacher(teacher), train_blocks, tmp_path / "cache", k=16)

    # 4. train from the cache
    data = TeacherCacheDataset(cache, train_blocks)
    distiller = Distiller(
        student, None, task=CausalLMTask(),
        objective=[LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.1)],
        config=TrainConfig(max_steps=30, batch_size=8, lr=3e-3, output_dir=str(tmp_path / "runs/kd"),
                           progress=False),
        train_data=data, collate_fn=collate_teacher_cache, eval_data=data,
    )
    before = distiller.evaluate()["eval/kl_to_teacher"]
    distiller.train(resume=True)
    after = distiller.evaluate()["eval/kl_to_teacher"]
    assert after < 0.8 * before
