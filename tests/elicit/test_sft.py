"""Sequence-level KD (`kdforge sft`): prompt masking, chat rendering, and a real training run."""

from __future__ import annotations

import json

import pytest
from tests.data._cmd import private_datasets_cache  # noqa: F401  (autouse: datasets cache in tmp)

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
    assert load_sft_records(cur) == [{"prompt": "p", "text": "t", "weight": 0.5}]
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


# ---- per-sample weights ----------------------------------------------------------------------
def _write(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def test_weights_come_from_curated_items_or_a_row_field_and_bad_ones_are_refused(tmp_path):
    cur = _write(tmp_path / "curated.jsonl", [{"row": {"prompt": "p", "text": "t"}, "weight": 0.5},
                                              {"row": {"prompt": "q", "text": "u"}, "weight": 2}])
    assert [r["weight"] for r in load_sft_records(cur)] == [0.5, 2.0]
    assert all("weight" not in r for r in load_sft_records(cur, weight_field=None))
    col = _write(tmp_path / "col.jsonl", [{"prompt": "p", "text": "t", "score": 3}])
    assert load_sft_records(col, weight_field="score")[0]["weight"] == 3.0
    assert "weight" not in load_sft_records(col)[0]  # no 'weight' anywhere: unweighted
    for rows, msg in [([{"prompt": "p", "text": "t", "weight": 1}, {"prompt": "q", "text": "u"}], "1 of 2 records"),
                      ([{"prompt": "p", "text": "t", "weight": -1}], "finite numbers >= 0"),
                      ([{"prompt": "p", "text": "t", "weight": "high"}], "non-numeric"),
                      ([{"prompt": "p", "text": "t", "weight": 0}], "every 'weight' is 0")]:
        with pytest.raises(DataError, match=msg):
            load_sft_records(_write(tmp_path / "bad.jsonl", rows))


def _loss_and_grads(model, tok, records):
    """One trainer-style step on a single batch: the task's weighted term divided by the
    task's count, as the Distiller does; returns (loss, flat gradient)."""
    import torch

    from kdforge.elicit.sft import WeightedCausalLMTask, weighted_collate
    from kdforge.train import Objective

    task = WeightedCausalLMTask()
    batch = weighted_collate(build_sft_examples(records, tok, 64), pad_token_id=tok.pad_token_id)
    objective = Objective([{"name": "weighted_cross_entropy", "source": "task", "weight": 1.0}])
    model.zero_grad(set_to_none=True)
    value = objective(task.forward(model, None, batch), task.count(batch))
    value.total.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(value.total.detach()), grads


@pytest.fixture
def tiny_lm(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


A = {"prompt": "the movie", "text": " was fresh and great fun"}
B = {"prompt": "a dull", "text": " rotten"}


def test_weight_two_equals_the_sample_twice(tiny_lm, tok):
    import torch

    loss_w, g_w = _loss_and_grads(tiny_lm, tok, [{**A, "weight": 2.0}, {**B, "weight": 1.0}])
    loss_d, g_d = _loss_and_grads(tiny_lm, tok, [{**A, "weight": 1.0}, {**A, "weight": 1.0}, {**B, "weight": 1.0}])
    assert loss_w == pytest.approx(loss_d, rel=1e-6)
    assert torch.allclose(g_w, g_d, rtol=1e-5, atol=1e-7)
    loss_1, _ = _loss_and_grads(tiny_lm, tok, [{**A, "weight": 1.0}, {**B, "weight": 1.0}])
    assert abs(loss_1 - loss_w) > 1e-4  # the weight does change the loss


def test_a_zero_weight_sample_leaves_no_gradient(tiny_lm, tok):
    import torch

    loss_a, g_a = _loss_and_grads(tiny_lm, tok, [{**A, "weight": 1.0}])
    loss_ab, g_ab = _loss_and_grads(tiny_lm, tok, [{**A, "weight": 1.0}, {**B, "weight": 0.0}])
    assert loss_ab == pytest.approx(loss_a, rel=1e-6)  # not diluted by B's tokens either
    assert torch.allclose(g_a, g_ab, rtol=1e-5, atol=1e-7)
    _, g_b = _loss_and_grads(tiny_lm, tok, [{**B, "weight": 0.0}])
    assert float(g_b.abs().max()) == 0.0


def test_fractional_weights_normalise_by_weighted_tokens(tiny_lm, tok):
    import torch
    import torch.nn.functional as F

    recs = [{**A, "weight": 0.3}, {**B, "weight": 1.7}]
    loss, _ = _loss_and_grads(tiny_lm, tok, recs)
    num = den = 0.0
    for r in recs:  # hand-computed: sum_b w_b sum_t l_bt / sum_b w_b n_b
        (ex,) = build_sft_examples([r], tok, 64)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"][1:])
        with torch.no_grad():
            logits = tiny_lm(ids).logits[0, :-1]
        nll = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        num += r["weight"] * float(nll)
        den += r["weight"] * int((labels != -100).sum())
    assert loss == pytest.approx(num / den, rel=1e-4)


def test_sft_cli_trains_with_curation_weights(tmp_path, tiny_model_dir):
    items = [{"row": {"prompt": f"review {i}", "text": " fresh fresh"}, "weight": 1.0 + i % 2} for i in range(8)]
    _write(tmp_path / "curated.jsonl", items)
    rc = main(["sft", str(tmp_path / "curated.jsonl"), "--student", str(tiny_model_dir), "-o", str(tmp_path / "run"),
               "--max-steps", "3", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "sft_summary.json").read_text())
    assert summary["weighted"] is True and summary["weight_field"] == "weight"
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/weighted_cross_entropy" in x for x in logs)
    rc = main(["sft", str(tmp_path / "curated.jsonl"), "--student", str(tiny_model_dir), "-o", str(tmp_path / "run2"),
               "--max-steps", "1", "--batch-size", "4", "--no-progress", "--weight-field", "none"])
    assert rc == 0 and json.loads((tmp_path / "run2" / "sft_summary.json").read_text())["weighted"] is False


# ---- any data of the data layer: chat messages, prompt/completion --------------------------------
def _response_nll(model_dir, examples) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor([ex["labels"]])
            k = int((labels[:, 1:] != -100).sum())
            total += float(m(torch.tensor([ex["input_ids"]]), labels=labels).loss) * k
            n += k
    return total / n


@pytest.mark.parametrize("kind", ["chat", "prompt_completion"])
def test_sft_cli_trains_on_chat_jsonl_and_prompt_completion_csv_response_tokens_only(tmp_path, kind):
    from tests.data._cmd import (
        assistant_token_count,
        completion_token_count,
        write_chat_jsonl,
        write_models,
        write_pc_csv,
    )
    from tests.data.conftest import make_tokenizer

    from kdforge.elicit.sft import sft_examples

    student = write_models(tmp_path, names=(("student", 1, 32),))["student"]
    tok = make_tokenizer()
    if kind == "chat":
        data, flags = write_chat_jsonl(tmp_path / "chats.jsonl"), []
        spec, hand = {"path": str(data)}, assistant_token_count(tok)
    else:
        data, flags = write_pc_csv(tmp_path / "qa.csv"), ["--prompt-field", "question", "--completion-field", "answer"]
        spec = {"path": str(data), "prompt_field": "question", "completion_field": "answer"}
        hand = completion_token_count(tok)
    examples = sft_examples(spec, tok)
    assert sum(t != -100 for ex in examples for t in ex["labels"]) == hand
    before = _response_nll(student, examples)
    rc = main(["sft", str(data), *flags, "--student", str(student), "-o", str(tmp_path / "run"),
               "--max-steps", "25", "--batch-size", "4", "--lr", "3e-3", "--no-progress"])
    assert rc == 0
    after = _response_nll(tmp_path / "run" / "student", examples)
    assert after < before - 1.0
    summary = json.loads((tmp_path / "run" / "sft_summary.json").read_text())
    assert summary["examples"] == len(examples)


@pytest.mark.parametrize("case", ["missing_field", "no_assistant", "no_template", "missing_file", "hub_offline"])
def test_sft_bad_data_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    from tests.data._cmd import write_chat_jsonl, write_models, write_pc_csv
    from tests.data.conftest import make_tokenizer

    student = str(write_models(tmp_path, names=(("student", 1, 32),))["student"])
    extra: list[str] = []
    if case == "missing_field":
        data, extra, want = str(write_pc_csv(tmp_path / "qa.csv")), ["--format", "prompt_completion"], "prompt_field"
    elif case == "no_assistant":
        (tmp_path / "u.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        data, want = str(tmp_path / "u.jsonl"), "no assistant turn"
    elif case == "no_template":
        make_tokenizer(chat_template=None).save_pretrained(tmp_path / "plain")
        data, extra, want = str(write_chat_jsonl(tmp_path / "c.jsonl")), ["--tokenizer", str(tmp_path / "plain")], \
            "no chat template"
    elif case == "missing_file":
        data, want = str(tmp_path / "nope.jsonl"), "not found"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        data, want = "someone/some-dataset", "HF_HUB_OFFLINE"
    out = tmp_path / "run"
    assert main(["sft", data, *extra, "--student", student, "-o", str(out), "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert want in err and "Fix:" in err
    assert not out.exists()


def test_sft_packs_examples_by_choice_keeping_response_only_labels(tmp_path):
    from tests.data._cmd import write_chat_jsonl, write_models
    from tests.data.conftest import make_tokenizer

    from kdforge.elicit.sft import pack_examples, sft_examples

    tok = make_tokenizer()
    chats = write_chat_jsonl(tmp_path / "chats.jsonl")
    examples = sft_examples({"path": str(chats)}, tok)
    packed = pack_examples(examples, 16)
    stream = [t for ex in examples for t in ex["labels"]]
    assert [t for ex in packed for t in ex["labels"]] == stream[: len(packed) * 16]
    assert all(len(ex["input_ids"]) == 16 for ex in packed)
    with pytest.raises(Exception, match="cannot be packed"):
        pack_examples([{**examples[0], "weight": 1.0}], 16)
    student = write_models(tmp_path, names=(("student", 1, 32),))["student"]
    assert main(["sft", str(chats), "--data-set", "packing=true", "--data-set", "block_size=16", "--student",
                 str(student), "-o", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "sft_summary.json").read_text())["examples"] == len(packed)
