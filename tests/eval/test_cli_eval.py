"""``kdforge eval`` end to end on tiny saved models, a local tokenizer and a text file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdforge.cli.main import main
from kdforge.eval.lm import batches_from_blocks, evaluate_language_models
from kdforge.eval.report.runs import load_run
from kdforge.eval.report.summary import headline

from ._tiny import CORPUS, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer(root / "teacher")
    for name, seed, hidden in (("teacher", 0, 48), ("student", 1, 32), ("baseline", 2, 32)):
        model = tiny_llama(len(tok), seed=seed, hidden=hidden)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "heldout.txt").write_text("\n\n".join(CORPUS * 3))
    (root / "animals.txt").write_text("\n\n".join(CORPUS[:3] * 3))
    (root / "qa.jsonl").write_text(
        json.dumps({"prompt": "the capital of france is", "answer": "paris"}) + "\n"
        + json.dumps({"prompt": "the cat sat on the", "choices": [" mat", " log"], "gold": 0}) + "\n"
    )
    return root


def test_cli_eval_writes_results_json_with_all_roles_and_metrics(saved, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--teacher", str(saved / "teacher"), "--baseline", f"ce={saved / 'baseline'}",
               "--student", f"kd={saved / 'student'}", "--data", str(saved / "heldout.txt"),
               "--data", f"zoo={saved / 'animals.txt'}",
               "--qa", str(saved / "qa.jsonl"), "--block-size", "8", "--batch-size", "4",
               "--max-new-tokens", "3", "--latency-repeats", "2", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kdforge eval" in printed and "Perplexity" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["primary_metric"] == "perplexity" and res["higher_is_better"] is False
    by_name = {m["name"]: m for m in res["models"]}
    assert [m["role"] for m in res["models"]] == ["teacher", "baseline", "student"]
    kd = by_name["kd"]["metrics"]
    for key in ("perplexity", "nll", "ece", "token_accuracy", "agreement", "kl_to_teacher",
                "kl_from_teacher", "js_to_teacher", "exact_match", "rouge_l", "answer_accuracy",
                "answer_ece", "params", "size_mb", "latency_ms", "speedup_vs_teacher",
                "compression_vs_teacher"):
        assert key in kd, key
    assert "agreement" not in by_name["teacher"]["metrics"]
    assert kd["compression_vs_teacher"] == pytest.approx(
        by_name["teacher"]["params"] / by_name["kd"]["params"])
    assert 0 <= kd["agreement"] <= 1 and kd["kl_to_teacher"] >= 0
    assert sum(by_name["kd"]["reliability"]["bin_count"]) == res["n_tokens"]
    assert set(by_name["kd"]["breakdowns"]["perplexity by domain"]) == {"heldout", "zoo"}
    assert "| kd | student |" in (out / "results.md").read_text()
    # the report reads what eval wrote: lowest perplexity among students, compared with "ce"
    run = load_run(out)
    assert [m.role for m in run.models] == ["teacher", "baseline", "student"]
    h = headline(run)
    assert h is not None and h.best.name == "kd" and "perplexity than ce" in h.text


def test_cli_eval_on_raw_token_ids_matches_the_python_api(saved, tmp_path):
    ids = np.arange(40) % 20
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "eval"
    rc = main(["eval", "--student", str(saved / "student"), "--data", str(tmp_path / "ids.npy"),
               "--block-size", "10", "--no-cost", "-o", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_tokens"] == 4 * 9
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved / "student").eval()
    direct = evaluate_language_models(
        {"s": model}, batches_from_blocks(torch.from_numpy(ids).long().reshape(4, 10), batch_size=8))
    assert res["models"][0]["metrics"]["perplexity"] == pytest.approx(
        direct["s"]["metrics"]["perplexity"], rel=1e-4)


def test_cli_eval_errors_are_short_and_actionable(saved, tmp_path, capsys):
    assert main(["eval", "--student", str(tmp_path / "nope"), "--data", str(saved / "heldout.txt"),
                 "--tokenizer", str(saved / "teacher")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "Fix:" in err
    assert main(["eval", "--data", str(saved / "heldout.txt")]) == 2
    assert "no --student" in capsys.readouterr().err
    assert main(["eval", "--student", str(saved / "student"), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_eval_classification_task_reuses_classification_metrics(tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = tiny_tokenizer()
    rows = [("the cat sat on the mat", "animal"), ("paris is the capital of france", "place"),
            ("a dog met a cat", "animal"), ("rome is the capital of italy", "place")] * 3
    (tmp_path / "sent.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    for name, seed, hidden in (("teacher", 0, 48), ("student", 1, 32)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                          num_labels=2, id2label={0: "animal", 1: "place"}, label2id={"animal": 0, "place": 1},
                          pad_token_id=tok.pad_token_id)
        LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "eval"
    rc = main(["eval", "--task", "classification", "--teacher", str(tmp_path / "teacher"),
               "--student", str(tmp_path / "student"), "--data", str(tmp_path / "sent.jsonl"),
               "--latency-repeats", "1", "-o", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["primary_metric"] == "accuracy" and res["classes"] == ["animal", "place"]
    assert res["n_samples"] == 12
    student = res["models"][1]["metrics"]
    for key in ("accuracy", "ece", "nll", "agreement", "kl_to_teacher", "kl_from_teacher",
                "js_to_teacher", "latency_ms", "params"):
        assert key in student, key
    assert len(res["models"][1]["per_class_accuracy"]) == 2
    assert "12 samples" in capsys.readouterr().out
    run = load_run(out)
    assert "per class accuracy" in run.models[1].breakdowns
