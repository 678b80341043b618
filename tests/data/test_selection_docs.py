"""docs/data-selection.md's YAML examples validate against the models they document."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kdforge.config import validate
from kdforge.data.select import SelectConfig
from kdforge.train.ddk import DDKConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "data-selection.md"


def test_yaml_examples_validate():
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)]
    kinds = set()
    for block in blocks:
        if block.get("recipe") == "llm_kd":  # an llm_kd method with a ddk: block (data.domain_field)
            from kdforge.recipes.llm_kd import LLMKDConfig

            block = {k: v for k, v in block.items() if k != "recipe"}
            validate(LLMKDConfig, block, source="docs/data-selection.md")
            kinds.add("llm_kd")
        elif "ddk" in block:
            validate(DDKConfig, block["ddk"], source="docs/data-selection.md")
            kinds.add("ddk")
        else:
            validate(SelectConfig, block, source="docs/data-selection.md")
            kinds.add("select")
    assert kinds == {"ddk", "select", "llm_kd"}
