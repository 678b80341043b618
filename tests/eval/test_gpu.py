"""CUDA / bf16 paths of the evaluation metrics (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from kdforge.eval.fidelity import fidelity
from kdforge.eval.lm import LMAccumulator, batches_from_blocks, evaluate_language_models
from kdforge.losses.signal import SparseTeacher

from ._tiny import tiny_llama


@pytest.mark.gpu
def test_fidelity_on_cuda_bf16_matches_cpu_fp32():
    torch.manual_seed(0)
    s, t = torch.randn(2, 64, 4096), torch.randn(2, 64, 4096)
    cpu = fidelity(s, t)
    gpu = fidelity(s.cuda().bfloat16(), t.cuda().bfloat16(), chunk_size=32)
    assert gpu["kl_to_teacher"] == pytest.approx(cpu["kl_to_teacher"], rel=0.05)
    sparse = fidelity(s.cuda(), SparseTeacher.from_logits(t.cuda(), 4096))
    assert sparse["kl_to_teacher"] == pytest.approx(cpu["kl_to_teacher"], rel=1e-4)


@pytest.mark.gpu
def test_lm_evaluator_runs_models_on_cuda():
    teacher, student = tiny_llama(256, seed=0).cuda(), tiny_llama(256, seed=1).cuda().bfloat16()
    blocks = torch.randint(0, 256, (4, 16))
    out = evaluate_language_models({"t": teacher, "s": student}, batches_from_blocks(blocks), teacher="t")
    ref = LMAccumulator()
    with torch.no_grad():
        logits = student.float()(input_ids=blocks.cuda()).logits
    ref.update(logits[:, :-1], blocks[:, 1:].cuda())
    assert out["s"]["metrics"]["perplexity"] == pytest.approx(ref.compute()["perplexity"], rel=0.05)
