"""The teacher-hacking callback inside the real trainer (tiny MLPs, a few steps)."""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdforge.eval.monitor import FLAG_KEY, TeacherHackingCallback, TeacherHackingMonitor
from kdforge.eval.report.runs import load_run
from kdforge.eval.report.summary import hacking_onsets
from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig


class _Rows(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"inputs": x, "labels": y}


def test_callback_sees_the_trainers_eval_metrics_and_its_state_is_checkpointed(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    data = _Rows(x, y)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cb = TeacherHackingCallback(TeacherHackingMonitor(window=2))
    cfg = TrainConfig(max_steps=12, batch_size=8, lr=1e-2, progress=False, log_every=4, eval_every=4,
                      scheduler="constant", save_every=12, output_dir=str(tmp_path / "run"))
    d = Distiller(student, teacher, task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=cfg, train_data=data, eval_data=data, callbacks=[cb])
    d.train()
    mon = cb.monitor
    # the trainer's metric names are the ones the monitor looks for by default
    assert mon.teacher_key == "eval/kl_to_teacher" and mon.oracle_key == "eval/nll"
    assert mon.steps and mon.steps[-1] == 12
    assert FLAG_KEY in d.state.last_eval
    # the run folder is readable by the report, curves and all
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "eval" and "eval/kl_to_teacher" in r for r in records)
    run = load_run(tmp_path / "run")
    assert run.models and run.models[0].histories
    assert isinstance(hacking_onsets(run), dict)
    saved = json.loads(next((tmp_path / "run").rglob("trainer_state.json")).read_text())
    assert any("TeacherHackingCallback" in k for k in saved["callbacks"])
