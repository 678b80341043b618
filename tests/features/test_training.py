"""Feature terms in real training: hints pull the student toward the teacher, projectors are
optimised, checkpointed apart from the student and restored on resume; module taps on a CNN-style
classifier; the llm_kd recipe through ``kdforge run``."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from kdforge.features import linear_cka
from kdforge.train import CausalLMTask, ClassificationTask, Distiller, Objective, TrainConfig

from .test_taps import _hooks, tiny_llama


class Tokens(Dataset):
    def __init__(self, n: int = 32, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i])}


def _hint_run(out_dir=None, max_steps=25, save_every=None):
    teacher = tiny_llama(layers=4, hidden=32, seed=0)
    student = tiny_llama(layers=2, hidden=16, heads=2, kv=2, seed=1)
    objective = Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"layers": "uniform"}}])
    distiller = Distiller(
        student, teacher, task=CausalLMTask(), objective=objective,
        extra_modules=objective.bind(student, teacher),
        config=TrainConfig(max_steps=max_steps, batch_size=8, lr=3e-3, scheduler="constant", progress=False,
                           log_every=1, save_every=save_every, output_dir=str(out_dir) if out_dir else None),
        train_data=Tokens(), eval_data=Tokens(n=8, seed=1),
    )
    return distiller, student, teacher


@torch.no_grad()
def _last_layer_cka(student, teacher, rows) -> float:
    hs = student(input_ids=rows, output_hidden_states=True).hidden_states[-1]
    ht = teacher(input_ids=rows, output_hidden_states=True).hidden_states[-1]
    return linear_cka(hs.flatten(0, 1), ht.flatten(0, 1)).item()


def test_hidden_mse_training_pulls_the_student_hidden_states_toward_the_teacher():
    distiller, student, teacher = _hint_run()
    held_out = Tokens(n=8, seed=1).rows
    before_loss = distiller.evaluate()["eval/loss/hidden_mse"]
    before_cka = _last_layer_cka(student, teacher, held_out)
    projector = distiller.extras["features"].projectors["hidden_mse_1"]
    w0 = projector.weight.detach().clone()
    distiller.train()
    after_loss = distiller.evaluate()["eval/loss/hidden_mse"]
    after_cka = _last_layer_cka(distiller.unwrapped_student, teacher, held_out)
    assert after_loss < 0.75 * before_loss, (before_loss, after_loss)
    assert after_cka > before_cka + 0.02, (before_cka, after_cka)
    assert not torch.equal(projector.weight, w0)  # the projector is optimised with the student
    assert _hooks(student) == 0 and _hooks(teacher) == 0


def test_projectors_are_checkpointed_apart_from_the_student_and_restored_on_resume(tmp_path):
    straight, _, _ = _hint_run(tmp_path / "a", max_steps=4)
    straight.train()
    first, _, _ = _hint_run(tmp_path / "b", max_steps=2, save_every=2)
    first.train()
    ckpt = tmp_path / "b" / "checkpoints" / "step-2"
    extras = load_file(ckpt / "extras.safetensors")
    assert set(extras) == {f"features.projectors.hidden_mse_{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert not any("projector" in k for k in load_file(ckpt / "student.safetensors"))

    resumed, _, _ = _hint_run(tmp_path / "b", max_steps=4)
    resumed._resume(ckpt)  # load only: the projector must be the saved one
    assert torch.equal(resumed.extras["features"].projectors["hidden_mse_0"].weight,
                       extras["features.projectors.hidden_mse_0.weight"])
    resumed, _, _ = _hint_run(tmp_path / "b", max_steps=4)
    resumed.train(resume=True)
    for name in ("hidden_mse_0", "hidden_mse_1"):
        assert torch.allclose(resumed.extras["features"].projectors[name].weight,
                              straight.extras["features"].projectors[name].weight, atol=1e-6)
    for a, b in zip(resumed.unwrapped_student.parameters(), straight.unwrapped_student.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Images(Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


def test_conv_hints_by_module_path_train_a_1x1_projector_on_a_classifier():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    objective = Objective([
        {"name": "forward_kl", "weight": 1.0},
        {"name": "hidden_mse", "weight": 1.0,
         "params": {"student_modules": ["body.0"], "teacher_modules": ["body.0"]}},
    ])
    extras = objective.bind(student, teacher)
    assert extras["features"].projectors["hidden_mse_0"].weight.shape == (8, 4)  # widths from Conv2d
    distiller = Distiller(student, teacher, task=ClassificationTask(), objective=objective, extra_modules=extras,
                          config=TrainConfig(max_steps=15, batch_size=8, lr=1e-2, progress=False, log_every=1),
                          train_data=Images(), eval_data=Images(8))
    before = distiller.evaluate()["eval/loss/hidden_mse"]
    distiller.train()
    assert distiller.evaluate()["eval/loss/hidden_mse"] < before
    assert _hooks(student) == 0 and _hooks(teacher) == 0


def test_llm_kd_recipe_trains_a_feature_term_with_the_online_teacher_and_saves_its_projector(tmp_path, capsys):
    """The teacher cache carries no hidden states, so a method with a feature term trains with the
    live teacher; the term is bound by the Distiller (projectors optimised and checkpointed)."""
    import json

    from safetensors.torch import load_file

    from kdforge.cli.main import main

    cfg = tiny_llm_kd_config(tmp_path, [{"name": "kd+hint", "objective": [
        {"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 1.0, "params": {"projector": "linear"}}]}])
    path = tmp_path / "hint.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--dry-run"]) == 0  # the term validates as part of the recipe config
    capsys.readouterr()
    assert main(["run", str(path), "--no-report"]) == 0, capsys.readouterr().err
    run = tmp_path / "run" / "kd-hint" / "seed-0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    hint = [r["loss/hidden_mse"] for r in rows if r.get("split") == "train" and "loss/hidden_mse" in r]
    assert len(hint) == 3 and all(v > 0 for v in hint)
    extras = load_file(str(next((run / "checkpoints").glob("step-*")) / "extras.safetensors"))
    assert any(name.startswith("features.projectors.") for name in extras)


def tiny_llm_kd_config(tmp_path, methods: list[dict]) -> dict:
    """An ``llm_kd`` config (as YAML data) on the tiny teacher/corpus: 3 steps, a checkpoint at the end."""
    root = _tiny_llm_assets(tmp_path)
    return {
        "recipe": "llm_kd",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(root / "teacher")},
        "student": {"layers": "first_last"},
        "data": {"corpus": str(root / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False,
                  "save_every": 3},
        "eval": {"batch_size": 2, "during_training_sequences": 0, "speed_batch": 2, "speed_repeats": 1},
        "methods": methods,
        "plot": False, "save_students": False,
    }


def _tiny_llm_assets(root):
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for name in ("book_a", "book_b"):
        paragraphs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(30)]
        (root / "corpus" / f"{name}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return root


def test_copy_of_teacher_starts_at_zero_hint_loss_in_the_distiller():
    teacher = tiny_llama(layers=2)
    student = copy.deepcopy(teacher)
    objective = Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"projector": "linear"}}])
    distiller = Distiller(student, teacher, task=CausalLMTask(), objective=objective,
                          extra_modules=objective.bind(student, teacher),
                          config=TrainConfig(max_steps=1, batch_size=4, progress=False), train_data=Tokens(8),
                          eval_data=Tokens(4))
    assert distiller.evaluate()["eval/loss/hidden_mse"] == pytest.approx(0.0, abs=1e-8)
