"""KDTrainer under transformers.Trainer: the num_items_in_batch contract (gradient accumulation
4 x 2 == 1 x 8 with uneven token counts), the loss going down, chunked == dense, evaluation
metrics for the teacher-hacking callback. Tiny Llama models built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from kdforge.errors import DataError
from kdforge.integrations import KDCollator, KDTrainer, TeacherHackingCallback

from ._tiny import ListDataset, tiny_llama, uneven_examples


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "out"), "report_to": [], "save_strategy": "no", "use_cpu": True,
            "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
            "logging_steps": 1, "seed": 0, "data_seed": 0, "dataloader_num_workers": 0,
            "disable_tqdm": True}
    base.update(kw)
    return TrainingArguments(**base)


def _train_one_step(tmp_path, *, batch_size, accumulation, teacher, k=0, **kd):
    student = tiny_llama(1)
    trainer = KDTrainer(model=student, args=_args(tmp_path, per_device_train_batch_size=batch_size,
                                                  gradient_accumulation_steps=accumulation, max_steps=1),
                        train_dataset=ListDataset(uneven_examples(8, k=k)), data_collator=KDCollator(0),
                        teacher=teacher, **kd)
    trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("source", ["module", "cache"])
def test_gradient_accumulation_4x2_equals_one_batch_of_8_with_uneven_token_counts(tmp_path, source):
    teacher = tiny_llama(7) if source == "module" else None
    k = 0 if source == "module" else 8
    kd = {"loss": "forward_kl", "ce_weight": 0.5, "temperature": 2.0}
    big = _train_one_step(tmp_path, batch_size=8, accumulation=1, teacher=teacher, k=k, **kd)
    acc = _train_one_step(tmp_path, batch_size=2, accumulation=4, teacher=teacher, k=k, **kd)
    start = dict(tiny_llama(1).named_parameters())
    moved = max(float((big[n] - start[n].detach()).abs().max()) for n in big)
    assert moved > 1e-3  # one SGD step at lr 1 changed the student: the comparison is not vacuous
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=2e-6, msg=name)


def test_chunked_loss_step_equals_the_dense_logits_step(tmp_path):
    kd = {"loss": "reverse_kl", "ce_weight": 0.2}
    dense = _train_one_step(tmp_path, batch_size=4, accumulation=2, teacher=None, k=8, **kd)
    chunked = _train_one_step(tmp_path, batch_size=4, accumulation=2, teacher=None, k=8, chunk_size=16, **kd)
    for name in dense:
        torch.testing.assert_close(chunked[name], dense[name], rtol=1e-4, atol=2e-6, msg=name)


def test_distillation_loss_decreases_over_a_few_steps_and_logs_kd_and_ce(tmp_path):
    teacher = tiny_llama(7)
    with torch.no_grad():  # a confident teacher (random init is near uniform: nothing to learn)
        teacher.lm_head.weight.mul_(40.0)
    trainer = KDTrainer(model=tiny_llama(1), args=_args(tmp_path, per_device_train_batch_size=4, max_steps=12,
                                                        optim="adamw_torch", learning_rate=1e-2),
                        train_dataset=ListDataset(uneven_examples(4)), data_collator=KDCollator(0),
                        teacher=teacher, loss="forward_kl", ce_weight=0.1)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    kds = [r["kd"] for r in trainer.state.log_history if "kd" in r]
    assert len(losses) == 12 and len(kds) == 12
    assert losses[-1] < 0.7 * losses[0]
    assert kds[-1] < kds[0]
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_evaluate_reports_kl_to_teacher_and_nll_which_the_callback_reads(tmp_path):
    callback = TeacherHackingCallback(window=1)
    trainer = KDTrainer(model=tiny_llama(1), args=_args(tmp_path, per_device_eval_batch_size=4),
                        eval_dataset=ListDataset(uneven_examples(8, k=8)), data_collator=KDCollator(0),
                        callbacks=[callback], teacher=None, loss="jsd", temperature=1.0)
    metrics = trainer.evaluate()
    assert {"eval_kd", "eval_kl_to_teacher", "eval_nll", "eval_loss"} <= set(metrics)
    assert metrics["eval_nll"] > 0 and metrics["eval_kl_to_teacher"] > 0
    assert callback.monitor.teacher_key == "eval/kl_to_teacher" and callback.monitor.oracle_key == "eval/nll"
    assert metrics["eval_teacher_hacking"] == 0.0


def test_cache_keys_survive_the_trainer_column_filter_of_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{k: v.tolist() for k, v in item.items()} for item in uneven_examples(4, k=4)]
    ds = datasets.Dataset.from_list(rows)
    trainer = KDTrainer(model=tiny_llama(1), args=_args(tmp_path, per_device_train_batch_size=2, max_steps=1),
                        train_dataset=ds, data_collator=KDCollator(0), teacher=None)
    trainer.train()
    assert trainer.state.global_step == 1


def test_cache_trainer_without_cache_keys_says_what_is_missing(tmp_path):
    trainer = KDTrainer(model=tiny_llama(1), args=_args(tmp_path, per_device_train_batch_size=2, max_steps=1),
                        train_dataset=ListDataset(uneven_examples(4)), data_collator=KDCollator(0), teacher=None)
    with pytest.raises(DataError, match="teacher_ids"):
        trainer.train()
