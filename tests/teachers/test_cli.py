"""`kdforge cache-teacher` on a tiny local teacher, tokenizer and text corpus."""

from __future__ import annotations

import pytest
import yaml

from kdforge.cli.main import main
from kdforge.teachers import TeacherCacheDataset, tokenizer_fingerprint

from .conftest import tiny_llama, train_tiny_tokenizer


@pytest.fixture
def setup(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher_dir)
    tok = train_tiny_tokenizer()
    tok.save_pretrained(teacher_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(["It is a truth universally acknowledged, that a single man in possession."] * 30)
    )
    config = {
        "teacher": {"name_or_path": str(teacher_dir), "dtype": "float32"},
        "corpus": {"path": str(corpus), "seq_len": 16, "max_sequences": 12},
        "output_dir": str(tmp_path / "cache"),
        "k": 4,
        "encoding": "compact-u8-zlib",
        "batch_size": 4,
        "shard_size": 5,
    }
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "cache", tok


def test_cli_builds_a_cache_readable_by_the_dataset(setup, capsys):
    config, out, tok = setup
    assert main(["cache-teacher", str(config)]) == 0
    assert "bytes/token" in capsys.readouterr().out
    ds = TeacherCacheDataset(out, tokenizer=tok)
    assert len(ds) == 12 and ds.k == 4
    m = ds.cache.manifest
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok) and len(m["shards"]) == 3


def test_cli_set_override_conflicting_with_existing_cache_exits_2(setup, capsys):
    config, out, _ = setup
    assert main(["cache-teacher", str(config)]) == 0
    assert main(["cache-teacher", str(config), "--set", "k=8"]) == 2
    assert "differs in: k" in capsys.readouterr().err
    assert main(["cache-teacher", str(config), "--set", "k=8", "--overwrite"]) == 0
    assert TeacherCacheDataset(out).k == 8


def test_cli_unknown_config_key_exits_2_with_suggestion(setup, capsys):
    config, _, _ = setup
    data = yaml.safe_load(config.read_text())
    data["encodng"] = "raw-fp32"
    config.write_text(yaml.safe_dump(data))
    assert main(["cache-teacher", str(config)]) == 2
    assert "did you mean 'encoding'" in capsys.readouterr().err


def test_cli_missing_tokenizer_folder_exits_2_naming_it(setup, tmp_path, capsys):
    config, _, _ = setup
    data = yaml.safe_load(config.read_text())
    data["corpus"]["tokenizer"] = str(tmp_path / "missing-tokenizer")
    config.write_text(yaml.safe_dump(data))
    assert main(["cache-teacher", str(config)]) == 2
    err = capsys.readouterr().err
    assert "missing-tokenizer" in err and "no such folder" in err  # kdforge.models: the error of `kdforge run`


def test_cli_inspect_verifies_and_summarises_a_cache(setup, capsys):
    config, out, _ = setup
    assert main(["cache-teacher", str(config)]) == 0
    capsys.readouterr()
    assert main(["cache-teacher", "--inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OK (3 shards verified)" in text and "top-4 of 256" in text and "12 x 16 = 192 tokens" in text
    shard = out / "shard-00001.kdc"
    shard.write_bytes(shard.read_bytes()[::-1])
    assert main(["cache-teacher", "--inspect", str(out)]) == 2
    assert "shard-00001.kdc is corrupted" in capsys.readouterr().err


def test_asset_prefix_resolves_through_kdforge_assets(monkeypatch, tmp_path):
    import kdforge.assets
    from kdforge.teachers.cache.config import resolve_path

    monkeypatch.setattr(kdforge.assets, "ensure", lambda name: tmp_path / f"installed-{name}")
    assert resolve_path("asset:austen") == str(tmp_path / "installed-austen")
    assert resolve_path("/data/corpus.txt") == "/data/corpus.txt"
