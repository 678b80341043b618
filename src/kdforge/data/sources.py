"""Where data comes from: one strict :class:`DataSpec` and :func:`load` on Hugging Face ``datasets``.

A spec names a source and how to read it; :func:`load` returns a ``datasets.DatasetDict`` with a
``train`` split and, when the spec asks for one, an ``eval`` split. Sources, tried in this order:

1. a **preset** name (:data:`PRESETS`): ``austen`` (the six novels, one document per book),
   ``rotten-tomatoes`` (review snippets with train/validation/test files);
2. a **local path**: a data file, a glob (``data/*.jsonl``), a folder of data files (splits
   inferred from file names the way ``datasets`` does: ``train.jsonl``, ``validation.jsonl``...),
   or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``; file types by
   extension: ``.txt`` (text), ``.json``/``.jsonl`` (json), ``.csv``, ``.parquet``;
3. a **Hub dataset id** (``owner/name`` with ``name:`` for its config, ``revision`` and ``split``).
   Offline (``HF_HUB_OFFLINE=1``, or the endpoint refuses the connection) it fails at once with a
   :class:`~kdforge.errors.DataError` that names the fix, instead of retrying.

**The ``.txt`` rule** (one rule for the whole package): a ``.txt`` file is *one document* (one row
``{"text", "document"}``, ``document`` = file stem), with hard-wrapped lines rejoined inside each
paragraph (``unwrap: true``, see :func:`kdforge.data.text.unwrap_paragraphs`). ``txt_unit:
paragraph`` gives one row per blank-line-separated paragraph, ``txt_unit: line`` one row per
non-empty line; ``unwrap: false`` keeps the text byte for byte.

Example::

    spec = DataSpec(path="chats.jsonl", format="chat", eval_fraction=0.1)
    dd = load(spec)          # DatasetDict(train=..., eval=...)
"""

from __future__ import annotations

import difflib
import glob
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdforge.config import StrictModel, validate
from kdforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Format = Literal["text", "prompt_completion", "chat"]
FORMATS: tuple[str, ...] = ("text", "prompt_completion", "chat")

#: file extension -> ``datasets`` packaged builder
BUILDERS: dict[str, str] = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                            ".parquet": "parquet"}

#: seconds to wait for the Hub endpoint before declaring it unreachable
HUB_PROBE_TIMEOUT_S = 5.0

_BLANK_LINES = re.compile(r"\n\s*\n")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataSpec(StrictModel):
    """One dataset: where it is, how it splits, what its rows hold, how they become tokens.

    Source keys are read by :func:`load`; ``format`` and the field names by
    :func:`kdforge.data.chat.tokenize_dataset`; ``packing``/``block_size`` by
    :mod:`kdforge.data.collate`.
    """

    path: str = Field(description="preset name (austen, rotten-tomatoes), local file/glob/folder, "
                                  "save_to_disk folder, or Hub dataset id")
    name: str | None = Field(None, description="Hub dataset config name")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit)")
    split: str = Field("train", description="the training split")
    eval_split: str | None = Field(None, description="a named held-out split (e.g. validation)")
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="hold out this fraction of train rows")
    eval_files: list[str] | None = Field(None, description="held-out local files or globs (removed from train)")
    seed: int = Field(0, description="seed of the eval_fraction draw")
    limit: int | None = Field(None, ge=1, description="keep only the first N training rows")

    format: Format | None = Field(None, description="text | prompt_completion | chat; null = detect from the columns")
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    txt_unit: Literal["document", "paragraph", "line"] = Field(
        "document", description=".txt rows: one per file, per blank-line paragraph, or per line")
    unwrap: bool = Field(True, description="rejoin hard-wrapped lines inside each .txt paragraph")

    train_on: Literal["completion", "all"] = Field(
        "completion", description="labels on completion/assistant tokens only, or on every token")
    chat_template: str | None = Field(None, description="a Jinja chat template (or a path to one) "
                                                        "replacing the tokenizer's")
    max_length: int | None = Field(None, ge=2, description="truncate rendered examples to this many tokens")
    truncation_side: Literal["right", "left"] = Field(
        "right", description="right keeps the start of an example, left keeps its end")
    packing: bool = Field(False, description="pack examples into fixed blocks (else pad per batch)")
    block_size: int | None = Field(None, ge=2, description="packed block length (default: max_length)")
    mask_document_starts: bool = Field(
        False, description="when packing, do not train the first token of each document")
    domain_field: str | None = Field(
        None, description="a column naming each row's domain (DDK sampling, per-domain scores); "
                          "kept through rendering, not with packing")

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        if value is not None and value not in FORMATS:
            close = difflib.get_close_matches(str(value), FORMATS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(FORMATS)}"
            raise ValueError(f"unknown format {value!r} ({hint})")
        return value

    @field_validator("eval_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_eval_rule(self) -> DataSpec:
        chosen = [k for k in ("eval_split", "eval_fraction", "eval_files") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set at most one of eval_split, eval_fraction, eval_files (got {', '.join(chosen)})")
        return self


def parse_spec(data: dict[str, Any] | DataSpec, *, source: str = "data") -> DataSpec:
    """A :class:`DataSpec` from a YAML mapping, with kdforge's did-you-mean ConfigError."""
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, str):
        data = {"path": data}
    return validate(DataSpec, data, source=source)


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A packaged dataset: a folder made by an asset module, and its files per split (read by the
    file rules), or a ``reader`` for files the rules do not cover (``folder -> {split: Dataset}``,
    e.g. Fashion-MNIST's IDX files)."""

    name: str
    description: str
    folder: Callable[[], Path]
    files: dict[str, str]  # split -> glob relative to the folder
    reader: Callable[[Path], dict[str, Any]] | None = None


def _fashion_mnist_splits(folder: Path) -> dict[str, Any]:
    """Fashion-MNIST as ``{train, test}`` datasets of ``image`` (uint8 ``[28, 28]``) and ``label``."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    from kdforge.data.vision import load_fashion_mnist

    s = load_fashion_mnist(folder)
    features = Features({"image": Sequence(Sequence(Value("uint8"))), "label": ClassLabel(names=list(s.classes))})
    return {split: Dataset.from_dict({"image": images.numpy(), "label": labels.numpy()}, features=features)
            for split, images, labels in (("train", s.train_images, s.train_labels),
                                          ("test", s.test_images, s.test_labels))}


def _asset_folder(name: str) -> Callable[[], Path]:
    def folder() -> Path:
        from kdforge.assets import ensure

        return Path(ensure(name))

    return folder


PRESETS: dict[str, Preset] = {
    "austen": Preset("austen", "Jane Austen's six novels, one document per book (text)",
                     _asset_folder("austen"), {"train": "*.txt"}),
    "rotten-tomatoes": Preset("rotten-tomatoes", "movie review snippets with a fresh/rotten label (text)",
                              _asset_folder("rotten-tomatoes"),
                              {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}),
    "austen-chat": Preset("austen-chat", "Austen paragraph continuations as user/assistant chats; validation = "
                          "Persuasion (chat)", _asset_folder("austen-chat"),
                          {"train": "train.jsonl", "validation": "validation.jsonl"}),
    "mixed-domains": Preset("mixed-domains", "four text domains (austen, reviews, headlines, speeches), one "
                            "'domain' column; 800 train + 100 validation rows each, interleaved (text)",
                            _asset_folder("mixed-domains"), {"train": "train.jsonl", "validation": "validation.jsonl"}),
    "fashion-mnist": Preset("fashion-mnist", "Zalando's 28x28 clothing images with 10 classes (image, label)",
                            _asset_folder("fashion-mnist"), {}, reader=_fashion_mnist_splits),
}


def register_preset(preset: Preset) -> Preset:
    """Add a packaged dataset to :data:`PRESETS` (one line per new preset)."""
    PRESETS[preset.name] = preset
    return preset


# ----------------------------------------------------------------------------- load
def load(spec: DataSpec | dict[str, Any] | str) -> Any:
    """Read the dataset a spec names: ``DatasetDict(train=..., [eval=...])`` of raw rows.

    Raises:
        DataError: the path does not exist, holds no data or mixes file types, a split or held-out
            file is missing, a Hub id cannot be reached (offline), or the train split is empty.
    """
    from datasets import DatasetDict

    spec = parse_spec(spec)
    splits, base = _read_source(spec)
    if spec.split not in splits:
        raise DataError(f"{spec.path} has no split {spec.split!r} (splits: {', '.join(splits) or 'none'})",
                        "set data.split to one of those")
    train = splits[spec.split]
    held = None
    if spec.eval_split is not None:
        if spec.eval_split not in splits:
            raise DataError(f"{spec.path} has no split {spec.eval_split!r} (splits: {', '.join(splits)})",
                            "set data.eval_split to one of those, or use eval_fraction: 0.1")
        held = splits[spec.eval_split]
    elif spec.eval_files is not None:
        held = _load_eval_files(spec, base)
    if spec.limit is not None:
        train = train.select(range(min(spec.limit, len(train))))
    if spec.eval_fraction is not None:
        if len(train) < 2:
            raise DataError(f"{spec.path} has {len(train)} training row(s), too few to hold out a fraction",
                            "add rows, or name held-out data with eval_split / eval_files")
        parts = train.train_test_split(test_size=spec.eval_fraction, seed=spec.seed, shuffle=True)
        train, held = parts["train"], parts["test"]
    if len(train) == 0:
        raise DataError(f"the training split of {spec.path} is empty", "point data.path at data with rows")
    out = DatasetDict({"train": train})
    if held is not None:
        out["eval"] = held
    log.info("data %s: %d train rows%s", spec.path, len(train),
             f", {len(held)} eval rows" if held is not None else "")
    return out


def read_splits(spec: DataSpec | dict[str, Any] | str) -> dict[str, Any]:
    """Every split the source of ``spec`` has, ``{name: Dataset}`` of raw rows (no held-out rule,
    no ``limit``), for callers that choose the split themselves (``kdforge eval`` prefers
    ``test``/``validation``). A Hub source gives only ``spec.split`` (and ``eval_split``).

    Raises:
        DataError: as :func:`load`.
    """
    return _read_source(parse_spec(spec))[0]


def _read_source(spec: DataSpec) -> tuple[dict[str, Any], Path | None]:
    """``({split: Dataset}, base folder for relative eval_files or None)``."""
    if spec.path in PRESETS:
        preset = PRESETS[spec.path]
        base = preset.folder()
        if preset.reader is not None:
            if spec.eval_files:
                raise DataError(f"the {preset.name} preset has no files to hold out",
                                "use eval_split (its splits) or eval_fraction")
            return preset.reader(base), base
        files = {split: _expand([str(base / pattern)]) for split, pattern in preset.files.items()}
        return _load_local(files, spec, base), base
    local = Path(spec.path).expanduser()
    if local.is_dir():
        if _is_saved_dataset(local):
            return _load_saved(local), local
        return _load_local(_folder_files(local), spec, local), local
    if local.is_file() or glob.has_magic(spec.path):
        return _load_local({"train": _expand([spec.path])}, spec, local.parent), local.parent
    if local.suffix.lower() in BUILDERS or spec.path.startswith((".", "/", "~")) or not _HUB_ID.match(spec.path):
        raise DataError(f"data path {spec.path} does not exist",
                        "point data.path at an existing file, folder or preset (relative paths start at "
                        "the working directory)")
    return _load_hub(spec), None


def _load_local(files: dict[str, list[Path]], spec: DataSpec, base: Path) -> dict[str, Any]:
    _exclude_eval_files(spec, files, base)
    return _load_files(files, spec)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(folder: Path) -> dict[str, Any]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(folder))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"{folder} could not be read as a saved dataset ({exc})",
                        "write it again with Dataset.save_to_disk") from exc
    return dict(ds) if isinstance(ds, DatasetDict) else {"train": ds}


def _folder_files(folder: Path) -> dict[str, list[Path]]:
    """Data files of a folder, split by file name as ``datasets`` infers it."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception as exc:  # EmptyDatasetError and friends
        raise DataError(f"{folder} holds no data files ({exc})",
                        f"put {'/'.join(BUILDERS)} files there, or point data.path at a file") from None
    files = {str(split): [Path(f) for f in paths if Path(f).suffix.lower() in BUILDERS]
             for split, paths in found.items()}
    files = {split: paths for split, paths in files.items() if paths}
    if not files:
        raise DataError(f"{folder} holds no {'/'.join(BUILDERS)} files",
                        "point data.path at a data file, a glob or a save_to_disk folder")
    return files


def _expand(patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"no file matches {pattern}", "check the path or glob")
        out.extend(Path(m) for m in matches if Path(m).is_file())
    return out


def _builder(files: list[Path]) -> str:
    kinds = {p.suffix.lower() for p in files}
    unknown = sorted(k for k in kinds if k not in BUILDERS)
    if unknown:
        raise DataError(f"unsupported data file type(s) {', '.join(unknown) or '(none)'} "
                        f"({files[0].parent})", f"use {', '.join(BUILDERS)} files")
    builders = {BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise DataError(f"the data files mix types ({', '.join(sorted(kinds))})",
                        "point data.path at one type, e.g. a glob like folder/*.jsonl")
    return builders.pop()


def _load_files(files: dict[str, list[Path]], spec: DataSpec) -> dict[str, Any]:
    from datasets import load_dataset

    all_files = [f for paths in files.values() for f in paths]
    if not all_files:
        raise DataError(f"{spec.path} matched no files", "check the path or glob")
    builder = _builder(all_files)
    data_files = {split: [str(p) for p in paths] for split, paths in files.items()}
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    if builder == "csv":  # cells are text: "007" stays "007" and an empty cell "" (not NaN)
        kwargs = {"features": _csv_string_features(all_files[0]), "keep_default_na": False}
    try:
        dd = load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as exc:  # pyarrow/json parse errors come in many types
        bad = _first_bad_json_line(all_files) if builder == "json" else None
        if bad is not None:
            raise DataError(f"{bad[0]}:{bad[1]} is not valid JSON ({bad[2]})",
                            "fix or remove that line (write one JSON object per line)") from exc
        raise DataError(f"could not read {spec.path} as {builder} ({type(exc).__name__}: {exc})",
                        "fix the file (one JSON object per line for .jsonl, a header row for .csv)") from exc
    out = dict(dd)
    if builder == "text":
        out = {split: _txt_rows(ds, files[split], spec) for split, ds in out.items()}
    return out


def _first_bad_json_line(files: list[Path]) -> tuple[Path, int, str] | None:
    """``(file, line number, reason)`` of the first line of a ``.jsonl`` file that is not JSON."""
    import json

    for path in files:
        if path.suffix.lower() != ".jsonl":
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as exc:
                        return path, n, exc.msg
    return None


def _csv_string_features(path: Path) -> Any:
    import csv

    from datasets import Features, Value

    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DataError(f"{path} has no header row", "write the column names on the first line")
    return Features({name: Value("string") for name in header})


def _txt_rows(ds: Any, files: list[Path], spec: DataSpec) -> Any:
    """Apply the ``.txt`` rule to one-row-per-file text: document / paragraph / line rows."""
    from datasets import Dataset

    if len(ds) != len(files):  # the text builder yields exactly one row per file with sample_by=document
        raise DataError(f"read {len(ds)} documents from {len(files)} .txt files", "report this as a bug")
    texts: list[str] = []
    names: list[str] = []
    for text, path in zip(ds["text"], files):
        for unit in split_txt(text, unit=spec.txt_unit, unwrap=spec.unwrap):
            texts.append(unit)
            names.append(path.stem)
    return Dataset.from_dict({"text": texts, "document": names})


def split_txt(text: str, *, unit: str = "document", unwrap: bool = True) -> list[str]:
    """The ``.txt`` rule on one file's text: its rows (empty ones dropped).

    ``document``: the whole file (paragraphs rejoined if ``unwrap``); ``paragraph``: each
    blank-line-separated paragraph; ``line``: each non-empty line (stripped).
    """
    from kdforge.data.paragraphs import unwrap_paragraphs

    if unit == "line":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if unit == "paragraph":
        paras = [p.strip() for p in _BLANK_LINES.split(text)]
        return [" ".join(p.split()) if unwrap else p for p in paras if p]
    if unit == "document":
        doc = unwrap_paragraphs(text) if unwrap else text
        return [doc] if doc.strip() else []
    raise ConfigError(f"unknown txt_unit {unit!r}", "use document, paragraph or line")


def _load_eval_files(spec: DataSpec, base: Path | None) -> Any:
    """Held-out files: loaded as their own split and removed from the training rows' files."""
    assert spec.eval_files is not None
    paths: list[Path] = []
    for pattern in spec.eval_files:
        try:
            paths.extend(_expand([pattern]))
        except DataError:
            if base is None or Path(pattern).is_absolute():
                raise
            paths.extend(_expand([str(base / pattern)]))
    return _load_files({"eval": paths}, spec)["eval"]


def _exclude_eval_files(spec: DataSpec, files: dict[str, list[Path]], base: Path | None) -> None:
    """Remove held-out files from the training files in place (no file is on both sides)."""
    if not spec.eval_files:
        return
    held: set[Path] = set()
    for pattern in spec.eval_files:
        for cand in (pattern, str(base / pattern) if base is not None else None):
            if cand is not None:
                held.update(Path(m).resolve() for m in glob.glob(os.path.expanduser(cand), recursive=True))
    for split in list(files):
        files[split] = [p for p in files[split] if p.resolve() not in held]
        if not files[split]:
            del files[split]
    if spec.split not in files:
        raise DataError(f"every file of {spec.path} is listed in eval_files, none is left to train on",
                        "hold out fewer files")


# ----------------------------------------------------------------------------- Hub
def hub_offline_reason() -> str | None:
    """Why the Hub cannot be reached now (None if it answers): the offline flag or the connection."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(endpoint + "/api/datasets?limit=1", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # the endpoint answered (even 4xx/5xx means the network works)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{endpoint} is unreachable ({reason})"
    return None


def _load_hub(spec: DataSpec) -> dict[str, Any]:
    from datasets import load_dataset

    reason = hub_offline_reason()
    if reason is not None:
        raise DataError(
            f"{spec.path!r} is not a local path or preset, and as a Hugging Face Hub dataset it cannot "
            f"be downloaded: {reason}",
            f"point data.path at a local file, folder or save_to_disk copy of the dataset (presets: "
            f"{', '.join(PRESETS)}), or run with network access",
        )
    wanted = [s for s in (spec.split, spec.eval_split) if s is not None]
    out: dict[str, Any] = {}
    for split in wanted:
        try:
            out[split] = load_dataset(spec.path, spec.name, revision=spec.revision, split=split)
        except Exception as exc:  # DatasetNotFoundError, ValueError (bad split), connection errors
            raise DataError(f"could not load Hub dataset {spec.path!r} (name={spec.name}, split={split}, "
                            f"revision={spec.revision}): {type(exc).__name__}: {exc}",
                            "check the id, data.name, data.split and data.revision, or use a local copy") from exc
    return out


__all__ = ["BUILDERS", "FORMATS", "DataSpec", "Format", "PRESETS", "Preset", "hub_offline_reason", "load",
           "parse_spec", "read_splits", "register_preset", "split_txt"]
