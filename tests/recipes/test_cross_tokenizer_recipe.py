"""The cross_tokenizer_kd recipe from YAML through the CLI, on a tiny teacher with its own
tokenizer and a two-document corpus (the student's BPE is trained in the run)."""

from __future__ import annotations

import json

import yaml

from kdforge.cli.main import main

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n\n")


def _teacher(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([TEXT] * 5, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]", "[PAD]"],
                                                                   show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def test_cross_tokenizer_recipe_runs_from_yaml(tmp_path):
    _teacher(tmp_path / "teacher")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 12)
    (corpus / "b.txt").write_text(TEXT.replace("man", "woman") * 4)
    config = {
        "recipe": "cross_tokenizer_kd",
        "teacher": {"model": str(tmp_path / "teacher")},
        "student": {"tokenizer": "bpe", "vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                    "intermediate_size": 64},
        "data": {"corpus": str(corpus), "train_docs": ["a"], "eval_docs": ["b"], "chars": 120, "seq_len": 48,
                 "train_examples": 16, "eval_examples": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False},
        "seeds": [0],
    }
    path = tmp_path / "xtok.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", str(path), "-o", str(out), "--no-report"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"labels only", "ULD", "GOLD hybrid"}
    for m in results["methods"].values():
        assert m["ppl"] > 1 and 0 <= m["agreement"] <= 1
    assert results["student_vocab"] == 300 and results["teacher_vocab"] == 150
    assert "top-1 agreement" in (out / "results.md").read_text()
    assert (out / "student_tokenizer" / "tokenizer.json").is_file()


def test_cross_tokenizer_recipe_from_a_cache_matches_the_live_teacher(tmp_path):
    """teacher_source: cache with k = the teacher's vocabulary and lossless log-probs trains the same
    student as the live teacher (same aligned signal up to float rounding)."""
    _teacher(tmp_path / "teacher")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 12)
    (corpus / "b.txt").write_text(TEXT.replace("man", "woman") * 4)
    base = {
        "recipe": "cross_tokenizer_kd",
        "teacher": {"model": str(tmp_path / "teacher")},
        "student": {"tokenizer": "bpe", "vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                    "intermediate_size": 64},
        "data": {"corpus": str(corpus), "train_docs": ["a"], "eval_docs": ["b"], "chars": 120, "seq_len": 24,
                 "train_examples": 8, "eval_examples": 4},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False},
        "methods": [{"name": "GOLD", "objective": [{"name": "cross_entropy", "weight": 1.0},
                                                   {"name": "gold", "weight": 1.0}]}],
        "seeds": [0],
    }
    results = {}
    for source in ("live", "cache"):
        config = dict(base, teacher_source=source, cache={"k": 150, "encoding": "raw-fp32"})
        path = tmp_path / f"{source}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["run", str(path), "-o", str(tmp_path / source), "--no-report"]) == 0
        results[source] = json.loads((tmp_path / source / "results.json").read_text())
    live, cached = results["live"]["methods"]["GOLD"], results["cache"]["methods"]["GOLD"]
    assert abs(cached["ppl"] - live["ppl"]) <= 1e-4 * live["ppl"]
    info = results["cache"]["cache"]
    assert (tmp_path / "cache" / "teacher_cache" / "token_offsets.bin").is_file()
    assert 0 < info["offsets_bytes_per_token"] < info["bytes_per_token"]
    assert "token offsets" in (tmp_path / "cache" / "results.md").read_text()


def test_a_missing_student_tokenizer_folder_is_the_error_of_kdforge_models(tmp_path, capsys):
    _teacher(tmp_path / "teacher")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 4)
    config = {"recipe": "cross_tokenizer_kd", "teacher": {"model": str(tmp_path / "teacher")},
              "student": {"tokenizer": str(tmp_path / "no-such-tokenizer")},
              "data": {"corpus": str(corpus), "train_docs": ["a"], "eval_docs": ["a"], "chars": 120, "seq_len": 48,
                       "train_examples": 4, "eval_examples": 4}, "seeds": [0]}
    path = tmp_path / "xtok.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "-o", str(tmp_path / "run"), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "no-such-tokenizer': no such folder" in err and "save_pretrained" in err
