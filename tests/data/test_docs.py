"""docs/data.md's YAML examples are valid data specs (the docs cannot drift from DataSpec)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kdforge.data import parse_spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_every_yaml_example_in_docs_data_md_is_a_valid_data_spec():
    """Data blocks are valid specs; whole command configs (cache-teacher, generate) are valid configs."""
    from kdforge.config import validate
    from kdforge.elicit.job import GenerateJobConfig
    from kdforge.teachers.cache.config import CacheTeacherConfig

    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 10
    for block in blocks:
        doc = yaml.safe_load(block)
        if "teacher" in doc:
            validate(CacheTeacherConfig, doc, source="docs/data.md")
        elif "task" in doc:
            validate(GenerateJobConfig, doc, source="docs/data.md")
        else:
            parse_spec(doc["data"], source="docs/data.md")
