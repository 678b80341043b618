"""The data flags every data-reading command shares (``kdforge eval``, ``kdforge sft``).

One shape everywhere: ``--data SPEC`` names the source, and a few options say how to read it.
``SPEC`` is anything :class:`~kdforge.data.sources.DataSpec` accepts as ``path`` (a preset such as
``austen``, a local file/glob/folder, a ``save_to_disk`` folder, a Hub id), or a ``.yaml`` file
holding a whole ``data:`` mapping (the block YAML-driven commands take). The options override the
spec's keys:

=========================  =====================================================================
flag                       DataSpec key
=========================  =====================================================================
``--format``               ``format`` (text | prompt_completion | chat; default: from the columns)
``--text-field``           ``text_field``
``--prompt-field``         ``prompt_field``
``--completion-field``     ``completion_field``
``--messages-field``       ``messages_field``
``--split``                ``split``
``--chat-template``        ``chat_template`` (a Jinja string or a ``.jinja`` file)
``--txt-unit``             ``txt_unit`` (document | paragraph | line; the ``.txt`` rule)
``--data-set KEY=VALUE``   any other key, e.g. ``--data-set train_on=all``
=========================  =====================================================================

Example::

    kdforge eval --student runs/kd/final --data chats.jsonl --format chat
    kdforge sft qa.csv --prompt-field question --completion-field answer --student s -o out
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdforge.data.sources import FORMATS, DataSpec, parse_spec

#: argparse dest -> DataSpec key, for the shared flags
FLAG_KEYS: dict[str, str] = {
    "data_format": "format", "text_field": "text_field", "prompt_field": "prompt_field",
    "completion_field": "completion_field", "messages_field": "messages_field", "split": "split",
    "chat_template": "chat_template", "txt_unit": "txt_unit",
}


def add_data_options(parser: argparse.ArgumentParser, *, split_help: str | None = None) -> None:
    """Add the shared reading options (not ``--data`` itself: commands differ in how many they take)."""
    g = parser.add_argument_group("reading the data (docs/data.md)")
    g.add_argument("--format", dest="data_format", choices=FORMATS, default=None,
                   help="row format; default: chat if there is a messages field, prompt_completion if "
                   "prompt/completion fields, else text")
    g.add_argument("--text-field", default=None, help="text column (default: text)")
    g.add_argument("--prompt-field", default=None, help="prompt column (default: prompt)")
    g.add_argument("--completion-field", default=None, help="completion column (default: completion)")
    g.add_argument("--messages-field", default=None, help="chat messages column (default: messages)")
    g.add_argument("--split", default=None, help=split_help or "split to read (default: train)")
    g.add_argument("--chat-template", default=None, help="Jinja chat template or .jinja file replacing the tokenizer's")
    g.add_argument("--txt-unit", choices=("document", "paragraph", "line"), default=None,
                   help=".txt rows: one per file (default), per blank-line paragraph, or per line")
    g.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other data key (docs/data.md), e.g. --data-set train_on=all")


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The data mapping of a YAML file: its ``data:`` block, or the whole file."""
    from kdforge.config import read_yaml
    from kdforge.errors import ConfigError

    raw = read_yaml(str(path))
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        raw = raw["data"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds no data mapping", "write e.g. `path: chats.jsonl` (and format, fields...)")
    return dict(raw)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: yaml(VALUE)}`` (ConfigError on an item without ``=``)."""
    import yaml

    from kdforge.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--data-set {item!r} is not KEY=VALUE", "write e.g. --data-set train_on=all")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def spec_from_args(source: str, args: argparse.Namespace | None = None, **defaults: Any) -> DataSpec:
    """The :class:`DataSpec` of ``--data SOURCE`` and the shared options.

    ``defaults`` fill keys neither the spec file nor a flag sets (a command's own defaults, e.g.
    ``max_length``).
    """
    data: dict[str, Any] = (read_spec_file(source) if Path(source).suffix.lower() in (".yaml", ".yml")
                            else {"path": source})
    if args is not None:
        for dest, key in FLAG_KEYS.items():
            value = getattr(args, dest, None)
            if value is not None:
                data[key] = value
        data.update(parse_assignments(getattr(args, "data_set", None) or []))
    for key, value in defaults.items():
        data.setdefault(key, value)
    return parse_spec(data, source=f"--data {source}")


__all__ = ["FLAG_KEYS", "add_data_options", "parse_assignments", "read_spec_file", "spec_from_args"]
