"""``kdforge generate``: validation, dry run, and a labeling job end to end on a local model."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.data._cmd import private_datasets_cache  # noqa: F401  (autouse: datasets cache in tmp)

from kdforge.cli.main import main


def _write(tmp_path, cfg):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_unknown_keys_and_missing_sections_are_reported_without_traceback(tmp_path, capsys):
    bad = _write(tmp_path, {"task": "label", "backend": {"type": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                         "model": "m", "concurency": 2},
                            "data": {"path": "x.jsonl"}})
    assert main(["generate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "concurency: unknown key" in err and "Traceback" not in err
    nolab = _write(tmp_path, {"task": "label", "backend": {"type": "openai", "base_url": "u", "model": "m"},
                              "data": {"path": "x.jsonl"}})
    assert main(["generate", str(nolab)]) == 2
    assert "labeling" in capsys.readouterr().err


def test_dry_run_prints_the_validated_config_with_overrides(tmp_path, capsys):
    p = _write(tmp_path, {"backend": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                          "data": {"path": "x.jsonl"}})
    assert main(["generate", str(p), "--dry-run", "--set", "sampling.n=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["sampling"]["n"] == 3 and cfg["task"] == "generate" and cfg["backend"]["concurrency"] == 8


@pytest.mark.parametrize("task", ["label", "rationales"])
def test_local_model_job_runs_end_to_end_and_resumes(tmp_path, tiny_model_dir, capsys, task):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t, "question": t, "label": lab}) + "\n"
                            for t, lab in [("great fun", "fresh"), ("boring", "rotten"), ("ok", "fresh")]))
    cfg = {"task": task, "output_dir": str(tmp_path / "out"), "progress": False,
           "backend": {"type": "transformers", "model": str(tiny_model_dir), "device": "cpu", "batch_size": 4},
           "data": {"path": str(data)}, "sampling": {"n": 2, "temperature": 0.9, "max_tokens": 4, "seed": 0}}
    if task == "label":
        cfg["labeling"] = {"labels": ["fresh", "rotten"], "gold_field": "label", "score_loglik": True}
    else:
        cfg["rationales"] = {"choices": ["fresh", "rotten"], "gold_field": "label"}
    p = _write(tmp_path, cfg)
    assert main(["generate", str(p)]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["rows"] == 3 and res["generation"]["generated"] == 6 and 0 <= res["accuracy"] <= 1
    out_file = {"label": "labels.jsonl", "rationales": "rationales.jsonl"}[task]
    assert len((tmp_path / "out" / out_file).read_text().splitlines()) == 3
    assert (tmp_path / "out" / "config.yaml").exists()
    assert main(["generate", str(p)]) == 0
    res2 = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res2["generation"]["generated"] == 0 and res2["generation"]["skipped"] == 6


def test_a_failed_request_prints_one_problem_and_one_fix_not_nested_ones(tmp_path, capsys, monkeypatch, scripted):
    from kdforge.elicit import job
    from kdforge.errors import GenerationError

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "hello"}) + "\n")
    teacher = scripted(lambda r: GenerationError("request was rejected by the server (HTTP 401)",
                                                 "check the API key in $TEACHER_KEY"))
    monkeypatch.setattr(job, "build_backend", lambda cfg: teacher)
    p = _write(tmp_path, {"output_dir": str(tmp_path / "out"), "progress": False, "data": {"path": str(data)},
                          "backend": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}})
    assert main(["generate", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("Fix:") == 1 and "Traceback" not in err
    problem, fix = err.split("Fix:")
    assert "1 request(s) failed for good (request was rejected by the server (HTTP 401))" in problem
    assert fix.strip().startswith("check the API key in $TEACHER_KEY; then rerun the same command")


# ---- data of the data layer: chat messages, prompt/completion ------------------------------------
@pytest.mark.parametrize("kind", ["chat", "prompt_completion"])
def test_generate_reads_chat_jsonl_and_prompt_completion_csv(tmp_path, tiny_model_dir, kind):
    from tests.data._cmd import CHATS, PAIRS, write_chat_jsonl, write_pc_csv

    from kdforge.elicit.store import read_records

    if kind == "chat":
        data, prompt = write_chat_jsonl(tmp_path / "chats.jsonl"), {}
        want = sorted(json.dumps(c[:-1]) for c in CHATS)  # the last assistant turn is for the teacher to write
    else:
        data, prompt = write_pc_csv(tmp_path / "qa.csv"), {"template": "{question}"}
        want = sorted(json.dumps([{"role": "user", "content": q}]) for q, _ in PAIRS)
    p = _write(tmp_path, {"task": "generate", "output_dir": str(tmp_path / "out"), "progress": False,
                          "backend": {"type": "transformers", "model": str(tiny_model_dir), "device": "cpu"},
                          "data": {"path": str(data)}, "prompt": prompt,
                          "sampling": {"n": 1, "temperature": 0.0, "max_tokens": 3, "seed": 0}})
    assert main(["generate", str(p)]) == 0
    records = read_records(tmp_path / "out" / "generations")
    assert sorted(json.dumps(r["prompt"]) for r in records) == want


@pytest.mark.parametrize("case", ["missing_field", "missing_file", "hub_offline", "no_template"])
def test_generate_bad_data_is_a_clear_error_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys, case):
    """(A chat without an assistant turn is a prompt here, not an error: the teacher writes the reply.)"""
    from tests.data._cmd import write_chat_jsonl, write_models
    from tests.data.conftest import make_tokenizer

    prompt: dict = {}
    if case == "no_template":
        tiny_model_dir = write_models(tmp_path, names=(("plain", 1, 32),))["plain"]
        for f in tiny_model_dir.glob("chat_template*"):
            f.unlink()
        make_tokenizer(chat_template=None).save_pretrained(tiny_model_dir)
        data, want = str(write_chat_jsonl(tmp_path / "c.jsonl")), "no chat template"
    elif case == "missing_field":
        data, prompt, want = str(write_chat_jsonl(tmp_path / "c.jsonl")), {"template": "{question}"}, "'question'"
    elif case == "missing_file":
        data, want = str(tmp_path / "nope.jsonl"), "does not exist"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        data, want = "someone/some-dataset", "HF_HUB_OFFLINE"
    p = _write(tmp_path, {"task": "generate", "output_dir": str(tmp_path / "out"), "progress": False,
                          "backend": {"type": "transformers", "model": str(tiny_model_dir), "device": "cpu"},
                          "data": {"path": data}, "prompt": prompt})
    assert main(["generate", str(p)]) == 2
    err = capsys.readouterr().err
    assert want in err and "Fix:" in err
    assert not (tmp_path / "out").exists()
