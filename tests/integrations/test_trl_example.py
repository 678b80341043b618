"""examples/trl_sft_with_kdforge.py: TRL's SFTTrainer trains 2 steps from cached top-k with the
chunked kdforge loss, and its first loss equals the loss called directly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kdforge.integrations import KDCollator, distillation_loss, sparse_teacher_from_batch

from ._tiny import tiny_llama, tiny_tokenizer, uneven_examples

pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[bench]')")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_sft_with_kdforge.py"


def _example():
    spec = importlib.util.spec_from_file_location("trl_sft_with_kdforge", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_trainer_trains_two_steps_from_cached_topk_with_the_chunked_loss(tmp_path):
    example = _example()
    items = uneven_examples(8, k=8)
    dataset = example.cache_as_dataset(items)
    student = tiny_llama(1)
    with torch.no_grad():  # the loss the first step should log: the whole dataset is one batch, dense loss
        batch = KDCollator(0)([dict(r) for r in dataset.with_format("torch")])
        expected = distillation_loss(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                     sparse_teacher_from_batch(batch), batch["labels"]).loss
    trainer = example.build_trainer(student, dataset, tiny_tokenizer(), output_dir=str(tmp_path / "out"), max_steps=2, batch_size=8,
                                    chunk_size=16, learning_rate=1e-3, logging_steps=1, use_cpu=True,
                                    save_strategy="no", seed=0, disable_tqdm=True, shuffle_dataset=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    assert losses[0] == pytest.approx(float(expected), rel=1e-3)
