"""Model cards for distilled students, and pushing a student folder to the Hugging Face Hub.

:func:`write_model_card` writes ``README.md`` into a saved student folder: YAML metadata the Hub
reads (``base_model``, ``datasets``, ``tags: [knowledge-distillation, kdforge, ...]``,
``library_name: transformers``) and a body that says what was distilled from what, on which
data, by which method, for how many steps, and the evaluation table. It goes through
``huggingface_hub.ModelCard`` / ``ModelCardData`` so the metadata is validated the way the Hub
validates it, and is written atomically (a crash leaves the previous card or none).

:func:`push_to_hub` uploads the folder with ``HfApi.upload_folder`` (token from ``token=`` or the
``HF_TOKEN`` environment variable); offline or without a token it fails with a
:class:`~kdforge.errors.AssetError` that says what to do, before anything is sent.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdforge.errors import AssetError, ConfigError
from kdforge.io import write_text_atomic

__all__ = ["CARD_TAGS", "push_to_hub", "render_eval_table", "write_model_card"]

log = logging.getLogger(__name__)

#: Tags every kdforge student card carries.
CARD_TAGS = ("knowledge-distillation", "kdforge")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

EvalTable = Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]


def _hub_ids(values: str | Sequence[str] | None) -> list[str]:
    """The entries that look like Hub ids (``owner/name``) and are not local paths."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    return [v for v in items if _HUB_ID.match(v) and not Path(v).exists()]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_eval_table(table: EvalTable) -> str:
    """A Markdown table from ``{row: {column: value}}`` or a list of row dicts.

    Columns are the union of the rows' keys, in first-seen order; missing cells are empty.
    """
    if isinstance(table, Mapping):
        rows = [{"": name, **dict(values)} for name, values in table.items()]
    else:
        rows = [dict(r) for r in table]
    if not rows:
        return "_no evaluation recorded_"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]) if c in row else "" for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_model_card(
    folder: str | os.PathLike,
    *,
    teacher: str,
    student: str,
    data: str | Sequence[str],
    method: str,
    steps: int,
    eval_table: EvalTable,
    base_model: str | Sequence[str] | None = None,
    model_name: str | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    tags: Sequence[str] = (),
    command: str | None = None,
    notes: str | None = None,
) -> Path:
    """Write ``folder/README.md``, a Hub model card of a distilled student.

    Args:
        folder: the saved student folder (must exist).
        teacher: the teacher (Hub id, local folder or kdforge asset name).
        student: where the student started from (a pretrained model, "cut from the teacher",...).
        data: the training data (Hub dataset id(s), files, or a corpus name).
        method: the distillation method (e.g. ``"forward KL on the teacher's top-64, T=1"``).
        steps: optimizer steps trained.
        eval_table: ``{method: {metric: value}}`` or a list of row dicts.
        base_model: the metadata ``base_model`` (default: ``student`` when it is a Hub id, else
            ``teacher`` when the student was cut from it and that is a Hub id); local paths are
            never written as Hub ids.
        model_name, license, language, tags: more card metadata (tags are added to
            :data:`CARD_TAGS`).
        command: the command that re-runs the distillation (shown in the card).
        notes: free text appended at the end.

    Returns:
        The path of the written README.md.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"cannot write a model card: {folder} is not a folder",
                          "save the student first (model.save_pretrained(folder)), then write its card")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}", "pass the number of optimizer steps trained")
    bases = _hub_ids(base_model) if base_model is not None else (_hub_ids(student) or _hub_ids(teacher))
    datasets = _hub_ids(data)
    all_tags = list(dict.fromkeys([*CARD_TAGS, *tags]))
    card_data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        datasets=datasets or None,
        tags=all_tags,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=model_name,
        license=license,
        language=list(language) if language is not None and not isinstance(language, str) else language,
    )
    data_text = data if isinstance(data, str) else ", ".join(data)
    title = model_name or folder.name
    body = [
        f"# {title}",
        "",
        f"A student distilled from **{teacher}** with kdforge.",
        "",
        "## Distillation",
        "",
        f"- **Teacher:** {teacher}",
        f"- **Student initialised from:** {student}",
        f"- **Data:** {data_text}",
        f"- **Method:** {method}",
        f"- **Optimizer steps:** {steps}",
        "",
        "## Evaluation",
        "",
        render_eval_table(eval_table),
        "",
    ]
    if command:
        body += ["## Reproduce", "", "```bash", command, "```", ""]
    body += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "", 'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
             'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", ""]
    if notes:
        body += ["## Notes", "", notes.strip(), ""]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = folder / "README.md"
    write_text_atomic(path, str(card))
    log.info("model card written: %s", path)
    return path


def _upload_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: HfHubHTTPError and offline mode (OSError), bad arguments
    (ValueError), and the HTTP client's transport errors (httpx / httpx2, whichever is installed)."""
    import importlib

    errors: list[type[BaseException]] = [OSError, ValueError]
    for name in ("httpx", "httpx2", "requests"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        base = getattr(module, "HTTPError", None) or getattr(module, "RequestException", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            errors.append(base)
    return tuple(errors)


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str = "Upload student distilled with kdforge",
    create_repo: bool = True,
) -> str:
    """Upload a saved student folder (weights, tokenizer, README.md) to the Hub.

    Args:
        folder: the student folder; it must hold a model card (see :func:`write_model_card`).
        repo_id: ``owner/name`` on the Hub.
        token: a Hub token with write access (default: the ``HF_TOKEN`` environment variable).
        private: create the repository as private (the default: publishing is a choice).
        commit_message: the commit message.
        create_repo: create the repository when it does not exist yet.

    Returns:
        The URL of the commit.

    Raises:
        AssetError: offline (``HF_HUB_OFFLINE``), no token, or the Hub could not be reached /
            refused the upload. ConfigError: bad folder or repo id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"cannot push {folder}: not a folder", "save the student first, then push its folder")
    if not (folder / "README.md").is_file():
        raise ConfigError(f"{folder} has no README.md model card",
                          "write one with kdforge.students.card.write_model_card before pushing")
    if not _HUB_ID.match(repo_id):
        raise ConfigError(f"{repo_id!r} is not a Hub repository id", "write it as owner/name, e.g. me/my-student")
    if _offline():
        raise AssetError(f"cannot push to {repo_id}: the Hub is offline here (HF_HUB_OFFLINE is set)",
                         "push from a machine with internet access: kdforge keeps the folder ready to upload")
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise AssetError(f"cannot push to {repo_id}: no Hub token",
                         "export HF_TOKEN=<a token with write access> (https://huggingface.co/settings/tokens)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except _upload_errors() as exc:
        raise AssetError(f"pushing {folder} to {repo_id} failed: {type(exc).__name__}: {exc}",
                         "check the network, the token's write access and the repository id, then push again "
                         "(the upload is one commit: nothing partial was published)") from exc
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s to %s (%s)", folder, repo_id, url)
    return url
