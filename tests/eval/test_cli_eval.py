"""``kdforge eval`` end to end on tiny saved models, a local tokenizer and a text file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.data._cmd import private_datasets_cache  # noqa: F401  (autouse: datasets cache in tmp)

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
    assert "nope': no such folder" in err and "Fix:" in err  # kdforge.models: the error of `kdforge run`
    assert "Generating" not in err  # the models are checked before any data is read
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


# ----------------------------------------------------------------------------- chat / prompt-completion data
@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    from tests.data._cmd import write_chat_jsonl, write_models, write_pc_csv

    root = tmp_path_factory.mktemp("chat-eval")
    models = write_models(root)
    return root, models, write_chat_jsonl(root / "chats.jsonl"), write_pc_csv(root / "qa.csv")


def _hand_assistant_nll(model_dir) -> tuple[float, int]:
    """Sum of -log q over the assistant tokens of CHATS, scored turn by turn from the rendered
    prefix (independent of the data layer's span finding), and their count."""
    import torch
    from tests.data._cmd import CHATS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    for chat in CHATS:
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            prefix = tok(tok.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
            turn = tok(m["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prefix + turn])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for j, t in enumerate(turn):
                total -= float(lp[len(prefix) + j - 1, t])
            n += len(turn)
    return total, n


def test_cli_eval_on_chat_counts_only_assistant_tokens(chat_setup, tmp_path):
    from tests.data._cmd import assistant_token_count
    from tests.data.conftest import make_tokenizer

    root, models, chats, _ = chat_setup
    out = tmp_path / "eval"
    assert main(["eval", "--teacher", str(models["teacher"]), "--student", str(models["student"]),
                 "--data", str(chats), "--no-cost", "-o", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    hand = assistant_token_count(make_tokenizer())
    assert res["n_tokens"] == hand
    student = next(m for m in res["models"] if m["role"] == "student")
    assert sum(student["reliability"]["bin_count"]) == hand  # ECE over the same tokens
    nll, n = _hand_assistant_nll(models["student"])
    assert n == hand
    assert student["metrics"]["nll"] == pytest.approx(nll / n, rel=1e-4)
    # the same data as a .yaml spec with train_on: all scores every token but the first of each chat
    (tmp_path / "all.yaml").write_text(f"data:\n  path: {chats}\n  train_on: all\n")
    assert main(["eval", "--student", str(models["student"]), "--data", str(tmp_path / "all.yaml"),
                 "--no-cost", "-o", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all" / "results.json").read_text())["n_tokens"] > hand


def test_cli_eval_on_prompt_completion_csv_counts_only_completion_tokens(chat_setup, tmp_path):
    from tests.data._cmd import completion_token_count
    from tests.data.conftest import make_tokenizer

    root, models, _, qa = chat_setup
    out = tmp_path / "eval"
    assert main(["eval", "--student", str(models["student"]), "--data", str(qa), "--prompt-field", "question",
                 "--completion-field", "answer", "--no-cost", "-o", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["n_tokens"] == completion_token_count(make_tokenizer())


@pytest.mark.parametrize("case", ["missing_field", "no_assistant", "no_template", "missing_file", "hub_offline"])
def test_cli_eval_bad_data_is_a_clear_error_and_writes_nothing(chat_setup, tmp_path, monkeypatch, capsys, case):
    root, models, chats, qa = chat_setup
    student = str(models["student"])
    extra: list[str] = []
    if case == "missing_field":
        data, extra, want = str(qa), ["--format", "prompt_completion"], "prompt_field"
    elif case == "no_assistant":
        (tmp_path / "u.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        data, want = str(tmp_path / "u.jsonl"), "no assistant turn"
    elif case == "no_template":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(student)
        tok.chat_template = None
        tok.save_pretrained(tmp_path / "plain")
        data, extra, want = str(chats), ["--tokenizer", str(tmp_path / "plain")], "no chat template"
    elif case == "missing_file":
        data, want = str(tmp_path / "nope.jsonl"), "does not exist"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        data, want = "someone/some-dataset", "HF_HUB_OFFLINE"
    out = tmp_path / "eval"
    assert main(["eval", "--student", student, "--data", data, *extra, "--no-cost", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert want in err and "Fix:" in err
    assert not out.exists()


def test_cli_eval_reads_the_held_out_part_of_a_spec_with_a_held_out_rule(chat_setup, tmp_path):
    """--data-set eval_files=[...] evaluates those files only, the rows a training run holds out."""
    from kdforge.data import load

    root, models, chats, _ = chat_setup
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello there, how are you today? " * 6)
    (docs / "b.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3)
    base = ["eval", "--student", str(models["student"]), "--no-cost", "--block-size", "8"]
    assert main([*base, "--data", str(docs), "--data-set", "eval_files=[b.txt]", "-o", str(tmp_path / "held")]) == 0
    assert main([*base, "--data", str(docs / "b.txt"), "-o", str(tmp_path / "b")]) == 0
    held = json.loads((tmp_path / "held" / "results.json").read_text())
    alone = json.loads((tmp_path / "b" / "results.json").read_text())
    assert held["n_tokens"] == alone["n_tokens"]
    assert held["models"][0]["metrics"]["nll"] == pytest.approx(alone["models"][0]["metrics"]["nll"])
    assert load({"path": str(docs), "eval_files": ["b.txt"]})["eval"]["document"] == ["b"]
