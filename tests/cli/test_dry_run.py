"""``kdforge run CONFIG --dry-run``: every problem knowable without training, listed at once (exit 2),
nothing written; a clean config prints a re-runnable resolved config and the estimate."""

from __future__ import annotations

import socket

import pytest
import yaml
from tests.recipes._tiny import seeded_teacher_and_corpus

from kdforge.cli.main import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return seeded_teacher_and_corpus(tmp_path_factory.mktemp("tiny"))


def _config(assets, out, **changes):
    cfg = {
        "recipe": "llm_kd",
        "output_dir": str(out),
        "teacher": {"model": str(assets / "teacher")},
        "student": {"layers": "first_last", "freeze_embeddings": False, "freeze_head": False},
        "data": {"corpus": str(assets / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1},
        "eval": {"batch_size": 2, "during_training_sequences": 0, "speed_batch": 2, "speed_repeats": 1},
        "plot": False,
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def _write(tmp_path, cfg, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_every_problem_is_listed_at_once_and_nothing_is_written(assets, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _config(assets, out, **{
        "data.train_docs": ["book_a", "book_x"],  # no such document
        "data.eval_sequences": 10_000,  # far more blocks than book_b holds
        "cache.tail_samples": 4,
        "methods": [
            {"name": "ce", "role": "baseline", "objective": [{"name": "cross_entropy", "weight": 1.0}]},
            {"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0, "params": {"temperature": -2.0}}]},
            {"name": "rkl", "objective": [{"name": "reverse_kl", "weight": 1.0}]},  # cannot read a sampled tail
            {"name": "dkd", "objective": [{"name": "dkd", "weight": 1.0}]},  # needs dense teacher logits
        ],
    })
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "5 problems found before training" in err, err
    for needle in ("methods.1.objective.0: loss 'forward_kl'", "temperature",
                   "methods.2.objective.0: loss 'reverse_kl' on the top-8 teacher cache with 4 sampled tail entries",
                   "methods.3.objective.0: loss 'dkd' on the top-8 teacher cache",
                   "data.train_docs.1: unknown document 'book_x'",
                   "data.eval_sequences: 10000 blocks of 16 tokens asked"):
        assert needle in err, (needle, err)
    assert not out.exists()


def test_a_real_run_checks_first_and_writes_nothing_on_a_problem(assets, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _config(assets, out, **{"data.eval_docs": ["book_a"]})  # held-out = training document
    assert main(["run", str(_write(tmp_path, cfg)), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "data.eval_docs: documents ['book_a'] are in both the train and held-out splits" in err, err
    assert not out.exists()


def test_a_clean_dry_run_prints_a_rerunnable_config_and_the_estimate(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, _config(assets, out))), "--dry-run", "--set", "seeds=[0, 1]"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)  # the estimate lines are YAML comments
    assert resolved["recipe"] == "llm_kd" and resolved["seeds"] == [0, 1]
    assert resolved["train"]["max_steps"] == 2 and resolved["cache"]["encoding"] == "compact-u8-zlib"
    assert "# pre-flight estimate" in printed and "teacher weights" in printed
    assert "# pre-flight: no problems found" in printed
    again = _write(tmp_path, resolved, "resolved.yaml")
    assert main(["run", str(again), "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == resolved
    assert not out.exists()


def test_output_dir_from_the_command_line_is_in_the_printed_config(assets, tmp_path, capsys):
    assert main(["run", str(_write(tmp_path, _config(assets, tmp_path / "a"))), "--dry-run",
                 "-o", str(tmp_path / "b")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(tmp_path / "b")


def test_a_folder_holding_a_run_is_one_of_the_problems(assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    cfg = _config(assets, out, **{"data.train_docs": ["nope"]})
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "already holds a run" in err and "unknown document 'nope'" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hub_id_while_offline_is_reported_at_once(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _config(assets, tmp_path / "run", **{"teacher.model": "kdforge-test/no-such-model"})
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert ("teacher.model: 'kdforge-test/no-such-model' is a Hub id that is not in the local Hub cache, and the "
            "Hub cannot be reached: HF_HUB_OFFLINE=1 is set") in err, err


def test_an_unreachable_hub_is_reported_without_retries(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    cfg = _config(assets, tmp_path / "run", **{"teacher.model": "kdforge-test/no-such-model"})
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the Hub cannot be reached: http://127.0.0.1:" in err and "is unreachable" in err, err


def test_a_missing_tracker_and_a_model_path_that_is_a_file(assets, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    (tmp_path / "weights.bin").write_bytes(b"x")
    cfg = _config(assets, tmp_path / "run", **{"train.log_with": ["mlflow"],
                                                "teacher.model": str(tmp_path / "weights.bin")})
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.log_with: tracker 'mlflow' is not installed" in err and "pip install mlflow" in err
    assert "teacher.model:" in err and "is a file, not a model folder" in err


def test_memory_that_does_not_fit_is_refused_unless_forced(assets, tmp_path, capsys, monkeypatch):
    import kdforge.preflight.fits as fits

    monkeypatch.setattr(fits, "available_memory", lambda device="cpu": 1024)
    path = _write(tmp_path, _config(assets, tmp_path / "run"))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "memory: the run needs about" in err and "1.0 KiB is available" in err and "--force" in err
    assert main(["run", str(path), "--dry-run", "--force"]) == 0


def test_fashion_mnist_checks_its_models_and_terms(tmp_path, capsys):
    cfg = {"recipe": "fashion_mnist_kd", "output_dir": str(tmp_path / "fm"), "data": {"root": str(tmp_path)},
           "student": {"arch": "mlp", "kwargs": {"no_such_arg": 3}},
           "methods": [{"name": "kd", "terms": [{"name": "jsd", "weight": 1.0, "params": {"beta": 1.5}}]}]}
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.root:" in err and "student.kwargs: vision model 'mlp'" in err and "methods.0.terms.0: loss 'jsd'" in err, err


def test_run_help_lists_the_recipes_and_where_configs_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for needle in ("llm_kd", "fashion_mnist_kd", "pgkd", "kdforge init NAME DIR", "kdforge recipes list",
                   "docs/config-reference.md", "--dry-run", "--force", "--probe"):
        assert needle in text, needle


def test_bring_your_own_models_and_data_are_checked_too(tmp_path, capsys):
    import torch
    from tests.recipes._byo import chat_jsonl, teacher_and_student

    teacher, _ = teacher_and_student(tmp_path / "models")
    chat_jsonl(tmp_path / "chat.jsonl")
    cfg = {"recipe": "llm_kd", "output_dir": str(tmp_path / "run"),
           "teacher": {"model": str(teacher), **({} if torch.cuda.is_available() else {"device": "cuda"})},
           "student": {"kind": "pretrained", "model": str(tmp_path / "no-such-student")},
           "data": {"path": str(tmp_path / "chat.jsonl"), "format": "chat", "messages_field": "turns",
                    "eval_fraction": 0.25, "max_length": 64},
           "train": {"max_steps": 2, "batch_size": 2}}
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "student.model:" in err and "no-such-student" in err, err
    assert "data:" in err and "turns" in err, err  # the field the rows lack, found by building the data
    if not torch.cuda.is_available():
        assert "teacher.device: device 'cuda' asked, but this machine has no CUDA GPU" in err, err


def test_probe_adds_the_measured_time_per_step(assets, tmp_path, capsys):
    path = _write(tmp_path, _config(assets, tmp_path / "run"))
    assert main(["run", str(path), "--dry-run", "--probe"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "two-step probe" in x)
    seconds = float(line.split("probe)")[1].split()[0])
    assert seconds > 0 and "x 4 steps" in line  # 2 steps x the 2 default methods x 1 seed


def test_pgkd_checks_its_teacher_backend_and_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDFORGE_TEST_NO_KEY", raising=False)
    cfg = {"recipe": "pgkd", "output_dir": str(tmp_path / "pg"),
           "teacher": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                       "api_key_env": "KDFORGE_TEST_NO_KEY"},
           "data": {"asset": None, "train_path": str(tmp_path / "train.csv"),
                    "validation_path": str(tmp_path / "val.csv"), "test_path": str(tmp_path / "test.csv")},
           "generation": {"filters": []}}
    (tmp_path / "val.csv").write_text("text,label\na,fresh\n")
    assert main(["run", str(_write(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "teacher.api_key_env: the environment variable KDFORGE_TEST_NO_KEY" in err, err
    assert "data.train_path: no file" in err and "data.test_path: no file" in err and "val.csv" not in err


def test_a_real_run_logs_the_estimate_and_every_sub_run_to_train_log(assets, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = _config(assets, out, **{"train.log_with": "tensorboard", "save_students": False,
                                  "methods": [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}]})
    assert main(["run", str(_write(tmp_path, cfg)), "--no-report"]) == 0, capsys.readouterr().err
    top = (out / "train.log").read_text()
    assert "pre-flight estimate" in top and "teacher weights" in top and "training 'kd', seed 0" in top
    sub = (out / "kd" / "seed-0" / "train.log").read_text()
    assert "step 1/2 loss=" in sub and "step 2/2 loss=" in sub
    assert list((out / "kd" / "seed-0" / "tensorboard" / "kdforge").glob("events.out.tfevents.*"))
