"""Bring your own teacher, student and data, through the CLI only.

A tiny teacher and a different, smaller *pretrained* student (tiny Llamas sharing a locally trained
word-level tokenizer with a chat template) are saved as HF folders; ``kdforge run`` distils the
teacher into the student on a chat-format jsonl and on a prompt/completion csv, from the top-k
cache and from the online teacher. Checked: only the assistant / completion tokens are trained and
scored, KD moves the student toward the teacher, a model card is written, and the saved student
reloads with plain ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from . import _byo

SRC = Path(__file__).resolve().parents[2] / "src"
TRAIN = {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "log_every": 2, "eval_every": 3, "progress": False}
EVAL = {"batch_size": 4, "during_training_sequences": 4, "speed_batch": 2, "speed_repeats": 1}
METHODS = [{"name": "kd cache", "objective": [{"name": "forward_kl", "weight": 1.0}]},
           {"name": "kd online", "teacher": "online", "objective": [{"name": "forward_kl", "weight": 1.0}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return _byo.teacher_and_student(tmp_path_factory.mktemp("byo"))


def _kdforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kdforge.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _run(tmp_path: Path, teacher: Path, student: Path, data: dict) -> dict:
    config = {"recipe": "llm_kd", "teacher": {"model": str(teacher)},
              "student": {"kind": "pretrained", "model": str(student)}, "data": data,
              "cache": {"k": 8, "batch_size": 8}, "train": TRAIN, "eval": EVAL, "methods": METHODS, "plot": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = _kdforge("run", "run.yaml", "-o", "out", "--no-report", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "out" / "results.json").read_text())


def _check_students(out: Path, results: dict, teacher: Path, student: Path) -> None:
    init_kl = results["student_init"]["kl_to_teacher"]
    base = AutoModelForCausalLM.from_pretrained(student)
    for method in ("kd-cache", "kd-online"):
        row = next(r for r in results["models"] if r["name"] == f"student / {method.replace('-', ' ')}")
        assert row["metrics"]["kl_to_teacher"] < init_kl, (method, row["metrics"], init_kl)
        folder = out / method / "seed-0" / "student"
        card = (folder / "README.md").read_text()
        assert "knowledge-distillation" in card and str(teacher) in card and f"pretrained {student}" in card
        reloaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no kdforge
        assert reloaded.config.num_hidden_layers == 2 and reloaded.config.hidden_size == 16
        moved = [not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), base.state_dict().values())]
        assert any(moved)


def test_chat_jsonl_pretrained_student_cache_and_online(models, tmp_path):
    teacher, student = models
    assistant_tokens = _byo.chat_jsonl(tmp_path / "chats.jsonl")
    results = _run(tmp_path, teacher, student, {"path": "chats.jsonl", "eval_fraction": 0.25, "max_length": 64})
    data = results["data"]
    # response-only: the trained + scored positions are exactly the assistant tokens of the file
    assert data["train_loss_tokens"] + data["eval_loss_tokens"] == assistant_tokens
    assert data["train_tokens"] > data["train_loss_tokens"]  # user turns and template tokens are not trained
    _check_students(tmp_path / "out", results, teacher, student)


@pytest.mark.slow  # a second full CLI run (~30 s); the chat run above covers the same path in CI
def test_prompt_completion_csv_pretrained_student(models, tmp_path):
    teacher, student = models
    completion_tokens = _byo.prompt_completion_csv(tmp_path / "qa.csv")
    results = _run(tmp_path, teacher, student, {"path": "qa.csv", "format": "prompt_completion",
                                                "prompt_field": "question", "completion_field": "answer",
                                                "eval_fraction": 0.25})
    data = results["data"]
    assert data["train_loss_tokens"] + data["eval_loss_tokens"] == completion_tokens
    _check_students(tmp_path / "out", results, teacher, student)


def test_bad_student_fails_before_writing(models, tmp_path):
    teacher, _ = models
    _byo.chat_jsonl(tmp_path / "chats.jsonl", rows=4)
    config = {"recipe": "llm_kd", "teacher": {"model": str(teacher)},
              "student": {"kind": "pretrained", "model": "./no-such-student"},
              "data": {"path": "chats.jsonl", "eval_fraction": 0.25}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = _kdforge("run", "run.yaml", "-o", "out", "--no-report", cwd=tmp_path)
    assert out.returncode != 0
    assert "no such folder" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
