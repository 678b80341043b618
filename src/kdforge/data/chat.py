"""Rows to tokens: plain text, prompt/completion, and chat ``messages`` with response-only labels.

Every format renders to ``{"input_ids", "attention_mask", "labels"}`` (Hugging Face convention:
``labels`` are *not* shifted; the model predicts ``labels[t]`` from tokens ``< t``; a label of
:data:`~kdforge.constants.IGNORE_INDEX` is neither trained nor counted).

- ``text``: ``ids = tok(text) + [eos]`` (no BOS, as in :func:`kdforge.data.text.pack_tokens`, so a
  teacher cache and a training run tokenise alike); every token is trained.
- ``prompt_completion``: ``ids = tok(prompt) + tok(completion) + [eos]`` (each part tokenised on
  its own, so the prompt tokens are exactly what the model is given at inference); with
  ``train_on: completion`` only ``tok(completion) + [eos]`` is trained. Prompt and completion that
  are lists of messages (conversational prompt/completion) are rendered as one chat.
- ``chat``: the conversation rendered with the tokenizer's chat template. With ``train_on:
  completion`` the trained tokens are those of each assistant turn, template end-of-turn marker
  included (the model must learn to stop). Found two ways:

  1. the template marks them with ``{% generation %}`` … ``{% endgeneration %}`` (fast tokenizer):
     ``apply_chat_template(return_assistant_tokens_mask=True)``;
  2. otherwise by *prefix rendering*: for assistant turn ``i``, ``P_i = render(m[:i],
     add_generation_prompt=True)`` and ``S_i = render(m[:i+1])``; the turn's text is
     ``S_i[len(P_i):]``. This needs ``P_i`` to be a prefix of ``S_i`` and ``S_i`` of the whole
     rendering (templates that rewrite earlier turns fail with a clear error). The whole
     rendering is tokenised once; a token is trained iff its first character lies in an assistant
     span (offsets of a fast tokenizer; a slow one tokenises span by span).

Truncation (``max_length``) cuts ids and labels together from the right (keep the start) or the
left (keep the end). Rows left with no trained token are dropped (logged); a dataset left empty
is an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge.constants import IGNORE_INDEX
from kdforge.data.sources import DataSpec, parse_spec
from kdforge.errors import DataError

log = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Rendered:
    """One tokenised example: ``input_ids`` and ``labels`` of equal length (labels unshifted)."""

    input_ids: list[int]
    labels: list[int]

    def as_row(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids),
                "labels": self.labels}


# ----------------------------------------------------------------------------- formats
def detect_format(columns: Sequence[str], spec: DataSpec) -> str:
    """``spec.format`` if set, else the first of chat / prompt_completion / text whose fields exist.

    Raises:
        DataError: no format's fields are present (lists the columns found).
    """
    if spec.format is not None:
        check_fields(columns, spec, spec.format)
        return spec.format
    cols = set(columns)
    if spec.messages_field in cols:
        return "chat"
    if spec.prompt_field in cols or spec.completion_field in cols:
        check_fields(columns, spec, "prompt_completion")  # one of the pair: name the other
        return "prompt_completion"
    if spec.text_field in cols:
        return "text"
    raise DataError(
        f"cannot tell the data format: the rows have fields {sorted(cols)}, none of "
        f"{spec.messages_field!r} (chat), {spec.prompt_field!r}+{spec.completion_field!r} "
        f"(prompt_completion) or {spec.text_field!r} (text)",
        "set data.format and the matching field name (messages_field, prompt_field/completion_field "
        "or text_field) to your column names",
    )


def check_fields(columns: Sequence[str], spec: DataSpec, fmt: str) -> None:
    """Raise :class:`DataError` naming the missing field(s) of ``fmt`` and listing those present."""
    needed = {"text": {"text_field": spec.text_field},
              "prompt_completion": {"prompt_field": spec.prompt_field,
                                    "completion_field": spec.completion_field},
              "chat": {"messages_field": spec.messages_field}}[fmt]
    missing = {key: name for key, name in needed.items() if name not in columns}
    if missing:
        keys = ", ".join(f"{key}: {name!r}" for key, name in missing.items())
        raise DataError(f"format {fmt!r} needs field(s) {sorted(missing.values())}, but the rows have "
                        f"fields {sorted(columns)}",
                        f"set data.{' / data.'.join(missing)} to one of those columns (now {keys})")


# ----------------------------------------------------------------------------- renderers
def _eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id to end each example",
                        "set tokenizer.eos_token (e.g. tokenizer.eos_token = '</s>')")
    return int(eos)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def render_text(text: str, tokenizer: Any, *, add_eos: bool = True) -> Rendered:
    """``tok(text) + [eos]``, every token trained."""
    if not isinstance(text, str):
        raise DataError(f"expected a text string, got {type(text).__name__}", "check data.text_field")
    ids = _ids(tokenizer, text) + ([_eos(tokenizer)] if add_eos else [])
    return Rendered(ids, list(ids))


def render_prompt_completion(prompt: Any, completion: Any, tokenizer: Any, *, train_on: str = "completion",
                             chat_template: str | None = None) -> Rendered:
    """``tok(prompt) + tok(completion) + [eos]``; labels on the completion and EOS only
    (``train_on='completion'``) or on every token. Message lists render as one chat. A message-list
    prompt with a text completion (a teacher's generation for a chat prompt) renders the prompt
    with the chat template and its generation prompt, exactly as it was sent to the teacher, then
    ``tok(completion) + [eos]``."""
    if isinstance(prompt, list) and isinstance(completion, list):
        return render_chat(list(prompt) + list(completion), tokenizer, train_on=train_on,
                           chat_template=chat_template)
    if isinstance(prompt, list) and isinstance(completion, str):
        template = resolve_chat_template(tokenizer, chat_template)
        prompt = _render(tokenizer, _clean_messages(prompt, "prompt"), template, add_generation_prompt=True)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"prompt and completion must both be strings (or both message lists), got "
                        f"{type(prompt).__name__} and {type(completion).__name__}",
                        "check data.prompt_field / data.completion_field")
    head = _ids(tokenizer, prompt)
    tail = _ids(tokenizer, completion) + [_eos(tokenizer)]
    ids = head + tail
    labels = list(ids) if train_on == "all" else [IGNORE_INDEX] * len(head) + tail
    return Rendered(ids, labels)


def resolve_chat_template(tokenizer: Any, override: str | None = None) -> str:
    """The Jinja chat template to use: ``override`` (a template or a path to one) or the tokenizer's.

    Raises:
        DataError: neither is set.
    """
    if override:
        path = Path(override).expanduser()
        if "{" not in override and path.is_file():
            return path.read_text(encoding="utf-8")
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) "
            "has no chat template, so chat messages cannot be rendered",
            "set data.chat_template to a Jinja template or a .jinja file, or use the tokenizer of an "
            "instruction-tuned model (it ships one)",
        )
    return template


def _clean_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} dicts, got "
                        f"{type(messages).__name__}", "check data.messages_field")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or m.get("content") is None and "tool_calls" not in m:
            raise DataError(f"{where}: message {j} is not a {{role, content}} dict ({m!r:.80})",
                            "write each message as {\"role\": ..., \"content\": ...}")
        out.append({k: v for k, v in m.items() if v is not None})  # json loaders fill absent keys with None
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]], template: str, *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 TemplateError and the template's own raise_exception
        raise DataError(f"the chat template failed on a conversation ({type(exc).__name__}: {exc})",
                        "check the messages' roles/order against the template, or set data.chat_template") from exc


def assistant_spans(messages: list[dict[str, Any]], tokenizer: Any, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn.

    Raises:
        DataError: the template does not render the conversation incrementally (a prefix changes
            once later turns are added), so spans cannot be located.
    """
    full = _render(tokenizer, messages, template, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], template, add_generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise DataError(
                f"the chat template renders earlier turns differently once later turns are added "
                f"(assistant turn {i}), so the assistant tokens cannot be located by prefix rendering",
                "use a template that wraps assistant text in {% generation %} ... {% endgeneration %} "
                "(set data.chat_template), or train_on: all",
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def render_chat(messages: Any, tokenizer: Any, *, train_on: str = "completion",
                chat_template: str | None = None, where: str = "row") -> Rendered:
    """Render a conversation with the chat template; labels on assistant tokens (module doc).

    Raises:
        DataError: malformed messages, no assistant turn (``train_on='completion'``), no template.
    """
    msgs = _clean_messages(messages, where)
    if train_on == "completion" and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained "
                        f"(roles: {[m['role'] for m in msgs]})",
                        "add an assistant message to every conversation, drop those rows, or set train_on: all")
    template = resolve_chat_template(tokenizer, chat_template)
    if train_on == "all":
        ids = _ids(tokenizer, _render(tokenizer, msgs, template, add_generation_prompt=False))
        return Rendered(ids, list(ids))
    if _GENERATION_TAG.search(template) and getattr(tokenizer, "is_fast", False):
        enc = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"])
        return Rendered(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
    full, spans = assistant_spans(msgs, tokenizer, template)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for t, (start, _end) in zip(ids, enc["offset_mapping"])]
        return Rendered(ids, labels)
    ids, labels, cursor = [], [], 0  # slow tokenizer: tokenise the pieces between span edges
    for a, b in spans:
        head, body = _ids(tokenizer, full[cursor:a]), _ids(tokenizer, full[a:b])
        ids += head + body
        labels += [IGNORE_INDEX] * len(head) + body
        cursor = b
    tail = _ids(tokenizer, full[cursor:])
    return Rendered(ids + tail, labels + [IGNORE_INDEX] * len(tail))


def truncate(example: Rendered, max_length: int | None, side: str = "right") -> Rendered:
    """Keep at most ``max_length`` tokens: the first ones (``right``) or the last ones (``left``)."""
    if max_length is None or len(example.input_ids) <= max_length:
        return example
    cut = slice(0, max_length) if side == "right" else slice(len(example.input_ids) - max_length, None)
    return Rendered(example.input_ids[cut], example.labels[cut])


def render_row(row: Mapping[str, Any], tokenizer: Any, spec: DataSpec, fmt: str, *, where: str = "row") -> Rendered:
    """One dataset row of format ``fmt`` rendered and truncated as ``spec`` says."""
    if fmt == "text":
        text = row[spec.text_field]
        out = render_text(text, tokenizer) if isinstance(text, str) and text.strip() else Rendered([], [])
    elif fmt == "prompt_completion":
        out = render_prompt_completion(row[spec.prompt_field], row[spec.completion_field], tokenizer,
                                       train_on=spec.train_on, chat_template=spec.chat_template)
    else:
        out = render_chat(row[spec.messages_field], tokenizer, train_on=spec.train_on,
                          chat_template=spec.chat_template, where=where)
    return truncate(out, spec.max_length, spec.truncation_side)


def tokenize_dataset(ds: Any, tokenizer: Any, spec: DataSpec | Mapping[str, Any], *, name: str = "train",
                     keep: Sequence[str] = ()) -> Any:
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask``/``labels`` lists, one row per example.

    Checks fields, format and chat template before rendering anything; drops rows that end up with
    no trained token (empty text, or truncated away). ``keep``: source columns carried along
    unchanged (e.g. a per-sample ``weight``); absent ones are ignored.

    Raises:
        DataError: a field is missing, a conversation has no assistant turn, the tokenizer has no
            chat template, or no example is left after filtering.
    """
    spec = parse_spec(spec)
    fmt = detect_format(ds.column_names, spec)
    if fmt == "chat" or (fmt == "prompt_completion" and len(ds) and isinstance(ds[0][spec.prompt_field], list)):
        resolve_chat_template(tokenizer, spec.chat_template)
    if fmt != "chat":
        _eos(tokenizer)

    def _one(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        return render_row(row, tokenizer, spec, fmt, where=f"{name} row {index}").as_row()

    drop = [c for c in ds.column_names if c not in keep]
    out = ds.map(_one, with_indices=True, remove_columns=drop, desc=f"render {fmt} ({name})")
    kept = out.filter(lambda labels: any(v != IGNORE_INDEX for v in labels), input_columns="labels")
    if len(kept) < len(out):
        log.info("%s: dropped %d of %d examples with no trained token (empty, or truncated away)",
                 name, len(out) - len(kept), len(out))
    if len(kept) == 0:
        raise DataError(f"the {name} data is empty after rendering: none of its {len(out)} examples has "
                        "a token to train on",
                        "check the data is non-empty and the text/completion fields hold text, or raise "
                        "data.max_length (truncation may have cut every response)")
    return kept


__all__ = ["Rendered", "assistant_spans", "check_fields", "detect_format", "render_chat",
           "render_prompt_completion", "render_row", "render_text", "resolve_chat_template",
           "tokenize_dataset", "truncate"]
