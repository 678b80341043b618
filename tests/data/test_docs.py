"""docs/data.md's YAML examples are valid data specs (the docs cannot drift from DataSpec)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kdforge.data import parse_spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_every_yaml_example_in_docs_data_md_is_a_valid_data_spec():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 7
    for block in blocks:
        parse_spec(yaml.safe_load(block)["data"], source="docs/data.md")
