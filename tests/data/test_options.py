"""The ``--data SPEC`` options every data-reading command shares (kdforge.data.options)."""

from __future__ import annotations

import argparse

import pytest

from kdforge.data.options import add_data_options, spec_from_args
from kdforge.errors import ConfigError


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_data_options(p)
    return p.parse_args(argv)


def test_flags_set_their_spec_keys_and_data_set_any_other():
    args = _parse(["--format", "prompt_completion", "--prompt-field", "q", "--completion-field", "a",
                   "--split", "dev", "--txt-unit", "line", "--data-set", "train_on=all", "--data-set", "max_length=64"])
    spec = spec_from_args("qa.csv", args, max_length=512)
    assert (spec.path, spec.format, spec.prompt_field, spec.completion_field, spec.split, spec.txt_unit) == \
        ("qa.csv", "prompt_completion", "q", "a", "dev", "line")
    assert spec.train_on == "all" and spec.max_length == 64  # --data-set beats the command's default


def test_a_yaml_file_holds_the_whole_mapping_and_flags_override_it(tmp_path):
    (tmp_path / "d.yaml").write_text("data:\n  path: chats.jsonl\n  format: chat\n  max_length: 128\n")
    spec = spec_from_args(str(tmp_path / "d.yaml"), _parse(["--messages-field", "conv"]), max_length=512)
    assert (spec.path, spec.format, spec.messages_field, spec.max_length) == ("chats.jsonl", "chat", "conv", 128)
    (tmp_path / "bare.yml").write_text("path: x.jsonl\n")
    assert spec_from_args(str(tmp_path / "bare.yml")).path == "x.jsonl"


def test_a_misspelt_key_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'train_on'"):
        spec_from_args("x.jsonl", _parse(["--data-set", "train_onn=all"]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        spec_from_args("x.jsonl", _parse(["--data-set", "train_on"]))
