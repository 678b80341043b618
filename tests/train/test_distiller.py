import copy
import json

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses.signal import SparseTeacher
from kdforge.train import (
    CausalLMTask,
    ClassificationTask,
    Distiller,
    EarlyStopping,
    LossTerm,
    TrainConfig,
)

from ._tiny import MLP, ClassDataset, TokenDataset, pad_collate, tiny_llama


def _cfg(**kw):
    base = dict(max_steps=20, batch_size=8, lr=1e-2, progress=False, log_every=1, scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


def test_classifier_loss_falls_and_kl_to_teacher_decreases():
    torch.manual_seed(0)
    teacher, student = MLP(scale=3.0), MLP()
    data = ClassDataset()
    d = Distiller(student, teacher, task=ClassificationTask(),
                  objective=[LossTerm("forward_kl", 1.0, {"temperature": 1.0})],
                  config=_cfg(max_steps=40), train_data=data, eval_data=data)
    before = d.evaluate()
    state = d.train()
    after = d.evaluate()
    assert after["eval/kl_to_teacher"] < 0.5 * before["eval/kl_to_teacher"]
    assert after["eval/agreement"] > before["eval/agreement"]
    assert after["eval/loss"] < before["eval/loss"]
    assert state.step == 40


def test_causal_lm_loss_falls_and_kl_to_teacher_decreases_with_online_teacher():
    teacher = tiny_llama(1, head_scale=8.0)
    student = tiny_llama(2)
    data = TokenDataset()
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=15, lr=1e-2), train_data=data, eval_data=data)
    before = d.evaluate()
    d.train()
    after = d.evaluate()
    assert after["eval/kl_to_teacher"] < 0.7 * before["eval/kl_to_teacher"]
    assert "eval/perplexity" in after and after["eval/perplexity"] > 1.0


def test_teacher_stays_frozen_unchanged_and_out_of_the_optimizer():
    torch.manual_seed(0)
    teacher, student = MLP(dropout=0.5), MLP()
    teacher.train()
    snapshot = copy.deepcopy(teacher.state_dict())
    d = Distiller(student, teacher, task=ClassificationTask(),
                  objective=[LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.5)],
                  config=_cfg(max_steps=5), train_data=ClassDataset())
    d.train()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, snapshot[k])
    opt_ids = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    assert opt_ids == {id(p) for p in student.parameters()}


def test_precomputed_teacher_logits_in_the_batch_replace_the_teacher_module():
    torch.manual_seed(0)
    teacher, student = MLP(scale=3.0), MLP()
    base = ClassDataset()
    with torch.no_grad():
        t_logits = teacher(base.x)

    class WithTeacher(torch.utils.data.Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            return {**base[i], "teacher_logits": t_logits[i]}

    task = ClassificationTask()
    batch = next(iter(torch.utils.data.DataLoader(WithTeacher(), batch_size=4)))
    out = task.forward(student, None, batch)
    torch.testing.assert_close(out.teacher, t_logits[:4])
    d = Distiller(student, None, task=task, objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=30), train_data=WithTeacher(), eval_data=WithTeacher())
    before = d.evaluate()["eval/kl_to_teacher"]
    d.train()
    assert d.evaluate()["eval/kl_to_teacher"] < 0.5 * before


def test_sparse_cached_teacher_batch_becomes_shifted_sparse_teacher_and_trains():
    teacher = tiny_llama(1, head_scale=8.0)
    student = tiny_llama(2)
    rows = TokenDataset(n=16)
    collate = pad_collate()
    k = 8

    def cached_collate(items):
        batch = collate(items)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sig = SparseTeacher.from_logits(logits, k)  # [B, T, k], position t = token t+1
        return {**batch, "teacher_ids": sig.ids, "teacher_logprobs": sig.logprobs}

    batch = cached_collate([rows[0], rows[1]])
    out = CausalLMTask().forward(student, None, batch)
    assert isinstance(out.teacher, SparseTeacher)
    assert out.teacher.shape == out.student_logits.shape[:-1] == batch["input_ids"][:, 1:].shape
    assert torch.equal(out.teacher.ids, batch["teacher_ids"][:, :-1])
    assert torch.equal(out.labels, batch["labels"][:, 1:])

    d = Distiller(student, None, task=CausalLMTask(), collate_fn=cached_collate,
                  objective=[LossTerm("forward_kl", 1.0)], config=_cfg(max_steps=15), train_data=rows,
                  eval_data=rows)
    before = d.evaluate()
    d.train()
    after = d.evaluate()
    assert after["eval/kl_to_teacher"] < 0.7 * before["eval/kl_to_teacher"]
    assert after["eval/loss/forward_kl"] < before["eval/loss/forward_kl"]


def test_kd_objective_without_any_teacher_signal_is_a_config_error():
    d = Distiller(MLP(), None, task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=2), train_data=ClassDataset())
    with pytest.raises(ConfigError, match="needs a teacher signal"):
        d.train()


def test_labels_only_objective_needs_no_teacher():
    d = Distiller(MLP(), None, task=ClassificationTask(), objective=[LossTerm("cross_entropy", 1.0)],
                  config=_cfg(max_steps=30), train_data=ClassDataset(), eval_data=ClassDataset())
    before = d.evaluate()["eval/loss"]
    d.train()
    assert d.evaluate()["eval/loss"] < before


def test_metrics_jsonl_has_per_term_keys_and_eval_records_and_config_yaml_is_written(tmp_path):
    torch.manual_seed(0)
    d = Distiller(MLP(), MLP(scale=3.0), task=ClassificationTask(),
                  objective=[LossTerm("forward_kl", 0.9, {"temperature": 2.0}), LossTerm("cross_entropy", 0.1)],
                  config=_cfg(max_steps=4, log_every=2, eval_every=2, output_dir=str(tmp_path)),
                  train_data=ClassDataset(), eval_data=ClassDataset(n=16), run_config={"recipe": "x", "lr": 0.01})
    d.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for key in ("loss", "loss/forward_kl", "loss/cross_entropy", "lr", "samples_per_s", "epoch", "time", "grad_norm"):
        assert key in train[0], key
    r = train[0]
    assert r["loss"] == pytest.approx(0.9 * r["loss/forward_kl"] + 0.1 * r["loss/cross_entropy"], rel=1e-5)
    for key in ("eval/loss", "eval/loss/forward_kl", "eval/agreement", "eval/kl_to_teacher", "eval/accuracy"):
        assert key in evals[0], key
    assert "recipe: x" in (tmp_path / "config.yaml").read_text()


def test_early_stopping_stops_when_eval_metric_stalls():
    torch.manual_seed(0)
    # lr=0 (via weight 0 on the only term): nothing improves, so it stops after patience evals
    d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 0.0)],
                  config=_cfg(max_steps=50, eval_every=1), train_data=ClassDataset(), eval_data=ClassDataset(n=8),
                  callbacks=[EarlyStopping("eval/kl_to_teacher", patience=2)])
    state = d.train()
    assert state.step == 3 and state.should_stop


def test_eval_fn_metrics_are_reported_with_eval_prefix():
    d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=1), train_data=ClassDataset(), eval_data=ClassDataset(n=8),
                  eval_fn=lambda m: {"n_params": sum(p.numel() for p in m.parameters())})
    assert d.evaluate()["eval/n_params"] == sum(p.numel() for p in MLP().parameters())


def test_online_teacher_wrapper_is_accepted_and_frozen():
    from kdforge.teachers.online import OnlineTeacher

    model = tiny_llama(1, head_scale=8.0)
    model.train()
    model.requires_grad_(True)
    d = Distiller(tiny_llama(2), OnlineTeacher(model), task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 1.0)], config=_cfg(max_steps=3), train_data=TokenDataset(n=8),
                  eval_data=TokenDataset(n=8))
    before = d.evaluate()["eval/kl_to_teacher"]
    d.train()
    assert d.evaluate()["eval/kl_to_teacher"] < before
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_tensorboard_tracker_writes_event_files_under_run_dir(tmp_path):
    pytest.importorskip("tensorboard")
    d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=2, output_dir=str(tmp_path), log_with=["tensorboard"]),
                  train_data=ClassDataset())
    d.train()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents*"))


def test_bf16_mixed_precision_runs_where_supported_and_epochs_set_the_length():
    data = ClassDataset(n=20)
    d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=TrainConfig(epochs=2, batch_size=8, grad_accum_steps=1, progress=True,
                                     mixed_precision="bf16"),
                  train_data=data)
    state = d.train()
    assert state.step == 6 and state.epoch == 2  # ceil(20 / 8) = 3 micro-batches per epoch
    assert all(torch.isfinite(p).all() for p in d.unwrapped_student.parameters())


def test_optimizer_factory_replaces_adamw_and_gets_decay_groups():
    seen = {}

    def sgd(groups):
        seen["decay"] = [g["weight_decay"] for g in groups]
        return torch.optim.SGD(groups, lr=0.1)

    d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=_cfg(max_steps=2, weight_decay=0.01), train_data=ClassDataset(), optimizer_factory=sgd)
    d.train()
    assert isinstance(d.optimizer.optimizer, torch.optim.SGD)
    assert seen["decay"] == [0.01, 0.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp16_without_cuda_falls_back_to_full_precision_with_a_notice(caplog):
    with caplog.at_level("WARNING", logger="kdforge.train.distiller"):
        d = Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                      config=_cfg(max_steps=1, mixed_precision="fp16"), train_data=ClassDataset())
    assert d.accelerator.mixed_precision == "no"
    assert "fp16" in caplog.text and "full precision" in caplog.text


def test_save_student_writes_a_reloadable_hf_folder_or_safetensors(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    student = tiny_llama(2)
    d = Distiller(student, tiny_llama(1), task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 1.0)], config=_cfg(max_steps=2), train_data=TokenDataset(n=8))
    d.train()
    reloaded = AutoModelForCausalLM.from_pretrained(d.save_student(tmp_path / "hf"))
    for (name, a), b in zip(student.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name

    mlp = MLP()
    d2 = Distiller(mlp, MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                   config=_cfg(max_steps=1), train_data=ClassDataset())
    d2.train()
    saved = load_file(d2.save_student(tmp_path / "plain") / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in mlp.state_dict().items())


def test_metrics_added_by_a_user_callback_on_evaluate_reach_metrics_jsonl(tmp_path):
    from kdforge.train import Callback

    class Flagger(Callback):
        def on_evaluate(self, state, metrics):
            metrics["eval/flag"] = 1.0

    d = Distiller(MLP(), MLP(scale=3.0), task=ClassificationTask(),
                  objective=[LossTerm("forward_kl", 1.0)], callbacks=[Flagger()],
                  config=_cfg(max_steps=2, eval_every=2, output_dir=str(tmp_path)),
                  train_data=ClassDataset(), eval_data=ClassDataset(n=16))
    d.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and all(r.get("eval/flag") == 1.0 for r in evals)
