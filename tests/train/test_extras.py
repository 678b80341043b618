"""Extra learnable modules of a method (a FitNets-style projector) and task-computed loss terms."""

import pytest
import torch
from safetensors.torch import load_file

from kdforge.errors import ConfigError
from kdforge.train import ClassificationTask, Distiller, LossTerm, TaskOutput, TrainConfig
from kdforge.train.tasks import run_teacher

from ._tiny import MLP, ClassDataset


class HintTask(ClassificationTask):
    """Logit KD plus a hint term: ||proj(h_student) - h_teacher||^2 on the first hidden layer."""

    term_names = ("hint",)

    def forward(self, student, teacher, batch, *, extras=None, chunked=False) -> TaskOutput:
        out = super().forward(student, teacher, batch, extras=extras)
        x = batch["inputs"]
        h_s = student.net[1](student.net[0](x))  # student hidden [B, 16]
        with torch.no_grad():
            h_t = teacher.net[1](teacher.net[0](x.to(next(teacher.parameters()).device)))  # teacher hidden [B, 32]
        out.extra_terms["hint"] = ((extras["proj"](h_s) - h_t) ** 2).sum()
        return out


def _make(out_dir=None, max_steps=6, callbacks=()):
    torch.manual_seed(5)
    student, teacher, proj = MLP(hidden=16), MLP(hidden=32, scale=2.0), torch.nn.Linear(16, 32)
    d = Distiller(student, teacher, task=HintTask(),
                  objective=[LossTerm("forward_kl", 1.0), LossTerm("hint", 0.5, source="task")],
                  config=TrainConfig(max_steps=max_steps, batch_size=8, lr=1e-2, progress=False, log_every=1,
                                     save_every=3, output_dir=str(out_dir) if out_dir else None),
                  train_data=ClassDataset(), eval_data=ClassDataset(n=16), extra_modules={"proj": proj},
                  callbacks=callbacks)
    return d, student, teacher, proj


def test_projector_is_trained_logged_and_saved_apart_from_the_student(tmp_path):
    d, student, teacher, proj = _make(tmp_path)
    w0 = proj.weight.detach().clone()
    opt_ids = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in proj.parameters()} <= opt_ids
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    before = d.evaluate()["eval/loss/hint"]
    state = d.train()
    assert not torch.equal(proj.weight, w0)
    assert "loss/hint" in state.last_logs and d.evaluate()["eval/loss/hint"] < before
    ckpt = tmp_path / "checkpoints" / "step-6"
    assert set(load_file(ckpt / "extras.safetensors")) == {"proj.weight", "proj.bias"}
    assert not any(k.startswith("proj") for k in load_file(ckpt / "student.safetensors"))
    assert set(load_file(ckpt / "student.safetensors")) == set(student.state_dict())


def test_resume_restores_the_projector_exactly(tmp_path):
    from kdforge.train import Callback

    class Crash(Callback):
        def on_step_end(self, state, logs):
            if state.step == 4:
                raise KeyboardInterrupt

    ref, _, _, ref_proj = _make(tmp_path / "ref")
    ref.train()
    crashed, *_ = _make(tmp_path / "run", callbacks=[Crash()])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed, student, _, proj = _make(tmp_path / "run")
    resumed.train(resume=True)
    assert torch.equal(proj.weight, ref_proj.weight)
    for a, b in zip(student.parameters(), ref.unwrapped_student.parameters()):
        assert torch.equal(a, b)


def test_task_term_the_task_does_not_compute_is_a_config_error():
    with pytest.raises(ConfigError, match="source 'task'"):
        Distiller(MLP(), MLP(), task=ClassificationTask(),
                  objective=[LossTerm("hint", 1.0, source="task")],
                  config=TrainConfig(max_steps=1), train_data=ClassDataset())


def test_run_teacher_keeps_the_teacher_in_eval_mode_without_grad():
    t = MLP(dropout=0.5)
    t.train()
    out = run_teacher(t, torch.randn(3, 8))
    assert not t.training and not out.requires_grad
