"""Reading prompt datasets and turning rows into prompts."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from kdforge.config import StrictModel
from kdforge.elicit.types import Message
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class DataConfig(StrictModel):
    """Where the input rows come from: a file, or a bundled asset split."""

    path: str | None = Field(None, description="a .jsonl/.json/.csv/.parquet/.txt file, or a generation output folder")
    asset: str | None = Field(None, description="a kdforge asset, e.g. rotten-tomatoes")
    split: str = Field("train", description="asset split (train/validation/test)")
    id_field: str | None = Field(None, description="column with a unique id per row (default: content hash)")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


class PromptConfig(StrictModel):
    """How a row becomes a prompt.

    ``template`` is a Python format string over the row's fields, e.g.
    ``"Review: {text}\\nIs it fresh or rotten?"``. With ``chat: true`` the prompt is sent as
    chat messages (``system`` first if given); with ``chat: false`` as plain text. A row that
    has a ``messages_field`` (a list of ``{role, content}``) is used as it is.
    """

    template: str = "{prompt}"
    system: str | None = None
    chat: bool = True
    messages_field: str | None = None


def load_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Rows as dicts (a ``.txt`` file gives one ``{"text": line}`` per non-empty line)."""
    if (cfg.path is None) == (cfg.asset is None):
        raise ConfigError("data needs exactly one of 'path' or 'asset'",
                          "set data.path: prompts.jsonl, or data.asset: rotten-tomatoes")
    if cfg.asset is not None:
        from kdforge.assets import ensure

        root = ensure(cfg.asset)
        path = root / f"{cfg.split}.jsonl"
        if not path.exists():
            raise DataError(f"asset {cfg.asset!r} has no split {cfg.split!r} ({path} missing)",
                            f"pick one of: {', '.join(sorted(p.stem for p in root.glob('*.jsonl')))}")
    else:
        path = Path(cfg.path)  # type: ignore[arg-type]
    rows = read_table(path)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise DataError(f"{path} has no rows", "check the file (and data.limit)")
    return rows


def read_table(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DataError(f"data file not found: {path}", "check data.path (relative paths start at the working directory)")
    if path.is_dir():
        if (path / "shards").is_dir() or (path / "journal.partial.jsonl").exists():
            from kdforge.elicit.store import read_records

            return read_records(path)  # the output folder of an earlier generation job
        raise DataError(f"{path} is a folder but not a generation output", "point data.path at a file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n} is not valid JSON ({exc.msg})", "fix or remove that line") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of objects", "or use a .jsonl file")
        return data
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".txt":
        return [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise DataError(f"unsupported data file type {suffix!r} ({path})", "use .jsonl, .json, .csv, .parquet or .txt")


def render_prompt(row: dict[str, Any], cfg: PromptConfig, template: str | None = None) -> str | list[Message]:
    """Build the prompt for one row (see :class:`PromptConfig`)."""
    if cfg.messages_field:
        msgs = row.get(cfg.messages_field)
        if not isinstance(msgs, list):
            raise DataError(f"row has no list in field {cfg.messages_field!r}", "check prompt.messages_field")
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
