"""Sequence-level KD (`kdforge sft`): prompt masking, chat rendering, and a real training run."""

from __future__ import annotations

import json

import pytest

from kdforge.cli.main import main
from kdforge.elicit import SamplingParams, generate
from kdforge.elicit.sft import build_sft_examples, load_sft_records
from kdforge.errors import DataError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_only_response_tokens_are_trained_and_end_with_eos(tok):
    (ex,) = build_sft_examples([{"prompt": "the movie", "text": " was fresh"}], tok, 64)
    p = tok("the movie", add_special_tokens=False)["input_ids"]
    r = tok(" was fresh" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == p + r
    assert ex["labels"] == [-100] * len(p) + r and r[-1] == tok.eos_token_id


def test_chat_prompts_are_rendered_with_the_template_and_long_prompts_dropped(tok):
    recs = [{"prompt": [{"role": "user", "content": "hi"}], "text": "fresh"},
            {"prompt": "x " * 200, "text": "y"}]
    (ex,) = build_sft_examples(recs, tok, 32)
    prompt_ids = tok("<s>user: hi</s><s>assistant: ", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids


def test_records_come_from_generation_folders_and_curated_files(tmp_path, scripted):
    generate(["a", "b"], scripted(lambda r: "resp " + r.prompt), tmp_path / "gen", SamplingParams(), progress=False)
    assert sorted(r["text"] for r in load_sft_records(tmp_path / "gen")) == ["resp a", "resp b"]
    cur = tmp_path / "curated.jsonl"
    cur.write_text(json.dumps({"row": {"prompt": "p", "text": "t"}, "weight": 0.5}) + "\n")
    assert load_sft_records(cur) == [{"prompt": "p", "text": "t"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="'prompt' and 'text'"):
        load_sft_records(bad)


def test_sft_cli_trains_the_student_towards_the_teacher_outputs(tmp_path, tiny_model_dir, scripted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    generate([f"review {i}" for i in range(8)], scripted(lambda r: " fresh fresh"), tmp_path / "gen",
             SamplingParams(), progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def nll(model_dir):
        m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        (ex,) = build_sft_examples([{"prompt": "review 0", "text": " fresh fresh"}], tok, 64)
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            return float(m(ids, labels=torch.tensor([ex["labels"]])).loss)

    before = nll(tiny_model_dir)
    rc = main(["sft", str(tmp_path / "gen"), "--student", str(tiny_model_dir), "-o", str(tmp_path / "run"),
               "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3", "--no-progress"])
    assert rc == 0
    after = nll(tmp_path / "run" / "student")
    assert after < before - 1.0
    assert (tmp_path / "run" / "metrics.jsonl").exists()
