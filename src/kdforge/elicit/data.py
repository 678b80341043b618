"""Reading prompt datasets and turning rows into prompts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.elicit.types import Message
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class DataConfig(StrictModel):
    """Where the input rows come from, read by the data layer (:mod:`kdforge.data`, docs/data.md):
    a file, glob or folder, a ``save_to_disk`` folder, a Hub dataset id, a data preset, or the
    output folder of an earlier generation job."""

    path: str | None = Field(None, description="a .jsonl/.json/.csv/.parquet/.txt file, glob or folder, a "
                                               "save_to_disk folder, a Hub dataset id, a data preset "
                                               "(rotten-tomatoes, austen), or a generation output folder")
    asset: str | None = Field(None, description="a kdforge data asset, e.g. rotten-tomatoes (same as path: NAME)")
    split: str = Field("train", description="split of a preset, saved dataset, split-named files or Hub dataset")
    name: str | None = Field(None, description="Hub dataset config name")
    revision: str | None = Field(None, description="Hub dataset revision")
    txt_unit: Literal["document", "paragraph", "line"] = Field(
        "document", description=".txt rows (the package's .txt rule): one per file, per paragraph, or per "
                                "line (line: one prompt per line)")
    id_field: str | None = Field(None, description="column with a unique id per row (default: content hash)")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


class PromptConfig(StrictModel):
    """How a row becomes a prompt.

    ``template`` is a Python format string over the row's fields, e.g.
    ``"Review: {text}\\nIs it fresh or rotten?"``. With ``chat: true`` the prompt is sent as
    chat messages (``system`` first if given); with ``chat: false`` as plain text. Chat data (a
    ``messages_field``, a list of ``{role, content}``; by default ``messages`` when the rows have
    it and no ``prompt``) is sent as the conversation up to its last turn: a final assistant turn
    is the reference reply the teacher writes anew, and is dropped.
    """

    template: str = "{prompt}"
    system: str | None = None
    chat: bool = True
    messages_field: str | None = None


def load_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Rows as dicts, read by the data layer (a ``.txt`` file is one ``{"text", "document"}`` row
    per file, or per line with ``txt_unit: line``); a generation output folder gives its records."""
    if (cfg.path is None) == (cfg.asset is None):
        raise ConfigError("data needs exactly one of 'path' or 'asset'",
                          "set data.path: prompts.jsonl, or data.asset: rotten-tomatoes")
    source = cfg.asset if cfg.asset is not None else cfg.path
    assert source is not None
    if cfg.path is not None and _is_generation_output(Path(cfg.path)):
        rows = _generation_records(Path(cfg.path))
    else:
        from kdforge.data.sources import PRESETS, load

        if cfg.asset is not None and cfg.asset not in PRESETS:
            raise DataError(f"{cfg.asset!r} is not a data asset", f"use one of: {', '.join(PRESETS)}")
        spec = {"path": source, "split": cfg.split, "name": cfg.name, "revision": cfg.revision,
                "txt_unit": cfg.txt_unit}
        rows = _plain_rows(load(spec)["train"])
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise DataError(f"{source} has no rows", "check the file (and data.limit)")
    return rows


def _is_generation_output(path: Path) -> bool:
    return path.is_dir() and ((path / "shards").is_dir() or (path / "journal.partial.jsonl").exists())


def _generation_records(path: Path) -> list[dict[str, Any]]:
    from kdforge.elicit.store import read_records

    return read_records(path)  # the output folder of an earlier generation job


def _plain_rows(ds: Any) -> list[dict[str, Any]]:
    """A ``datasets.Dataset`` as dicts; fields a row lacks (filled with None by the json/parquet
    readers) are dropped, so a template naming one fails with its clear error."""
    return [_drop_none(row) for row in ds.to_list()]


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def read_table(path: Path, *, txt_unit: str = "document") -> list[dict[str, Any]]:
    """Rows of one local data file, folder or ``save_to_disk`` folder (its train split), read by the
    data layer, or the records of a generation output folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}", "check data.path (relative paths start at the working directory)")
    if _is_generation_output(path):
        return _generation_records(path)
    from kdforge.data.sources import load

    return _plain_rows(load({"path": str(path), "txt_unit": txt_unit})["train"])


def render_prompt(row: dict[str, Any], cfg: PromptConfig, template: str | None = None) -> str | list[Message]:
    """Build the prompt for one row (see :class:`PromptConfig`)."""
    field = cfg.messages_field
    if field is None and template is None and cfg.template == "{prompt}" and "prompt" not in row and \
            isinstance(row.get("messages"), list):
        field = "messages"  # chat data with the default template: the conversation is the prompt
    if field:
        msgs = row.get(field)
        if not isinstance(msgs, list):
            raise DataError(f"row has no list in field {field!r}", "check prompt.messages_field")
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]  # the reference reply: the teacher writes it
        if not msgs:
            raise DataError(f"a row's {field!r} holds only an assistant turn, nothing to prompt with",
                            "give every conversation a user turn before its last assistant turn")
        return msgs
    tpl = template if template is not None else cfg.template
    try:
        text = tpl.format(**row)
    except KeyError as exc:
        raise ConfigError(
            f"prompt template uses field {exc.args[0]!r}, which the data rows do not have "
            f"(they have: {', '.join(map(str, row))})",
            "fix the {field} names in the template",
        ) from None
    if not cfg.chat:
        return text if cfg.system is None else f"{cfg.system}\n\n{text}"
    msgs: list[Message] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    msgs.append({"role": "user", "content": text})
    return msgs
