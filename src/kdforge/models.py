"""One loader for every causal LM kdforge reads: teacher or student, asset, local folder or Hub id.

A model is named by a :class:`ModelSource` (YAML: the ``teacher:`` section of ``llm_kd``, or the
``student:`` section with ``kind: pretrained``):

* ``model``: an **offline asset** name (``smollm2``: :mod:`kdforge.assets`), a **local folder**
  written by ``save_pretrained`` (``./teacher``, ``/models/llama``), or a **Hub id**
  (``HuggingFaceTB/SmolLM2-360M-Instruct``) with ``revision`` (branch, tag or commit) and
  ``trust_remote_code``; the Hub token comes from the environment (``HF_TOKEN``), never from
  the YAML;
* placement: ``device`` (``auto`` = the accelerator when there is one, else the CPU; ``cpu``,
  ``cuda``, ``cuda:1``, ``mps``), ``dtype`` (``float32``/``bfloat16``/``float16``/``auto`` = the
  checkpoint's), ``device_map: auto`` (shard a large model over the visible GPUs: accelerate's
  big-model loading) and ``attn_implementation`` (``eager``, ``sdpa``, ``flash_attention_2``).

Which of the three a name is (:func:`classify_model_name`): an asset name wins, then an existing
folder (or an existing ``.gguf`` file, loaded with ``gguf_file=``); a name that looks like a path
(``./x``, ``/x``, ``~/x``, or another existing file) but is not a folder is a missing-folder error;
anything else of the Hub form ``owner/name`` is a Hub id. An asset is spelled by its bare name
(``smollm2``); ``asset:smollm2`` (the spelling of ``kdforge generate`` configs) is the same asset, and
``asset:`` followed by an unknown name is an error listing the assets.

Every command loads models here: ``kdforge run`` (``teacher:``/``student:``), ``eval``,
``make-student``, ``select`` and ``cache-teacher``, so they all accept the same names, put the model
on the accelerator by default and fail with the same errors.

**Offline, fast.** Before a Hub id is downloaded, kdforge looks for it in the local Hugging Face
cache (``local_files_only``): a model fetched earlier loads with no network. Otherwise it checks
whether the Hub can be reached at all (``HF_HUB_OFFLINE=1``, or the endpoint refuses within a few
seconds: :func:`kdforge.data.sources.hub_offline_reason`) and fails at once with a
:class:`~kdforge.errors.AssetError` naming the fix, instead of minutes of retries.

Example::

    teacher, tok = load_model(ModelSource(model="smollm2", device="auto", dtype="bfloat16"),
                              role="teacher")
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from kdforge.config import StrictModel
from kdforge.errors import AssetError, ConfigError, DeviceError

log = logging.getLogger(__name__)

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class ModelSource(StrictModel):
    """Where a causal LM comes from and where it runs (module doc of :mod:`kdforge.models`)."""

    model: str = Field("smollm2", description="offline asset name (smollm2; asset:smollm2 is the same), a "
                                             "local save_pretrained folder or .gguf file, or a Hub id (owner/name)")
    revision: str | None = Field(None, description="Hub revision: branch, tag or commit (Hub ids only)")
    trust_remote_code: bool = Field(False, description="run the model's own code from the Hub/folder "
                                                       "(only for models you trust)")
    dtype: Dtype = Field("float32", description="parameter dtype; auto = the checkpoint's")
    device: str = Field("auto", description="auto (the accelerator if any, else cpu), cpu, cuda, cuda:N, mps")
    device_map: Literal["auto"] | None = Field(None, description="auto: shard the model over the visible "
                                                                  "GPUs (needs a GPU; replaces device)")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2 (default: "
                                                              "transformers' choice)")


class HubOptions(StrictModel):
    """The loading options of :class:`ModelSource` for config blocks that name their model in their
    own field (``kdforge cache-teacher``'s ``teacher``, ``kdforge select``'s models)."""

    revision: str | None = ModelSource.model_fields["revision"]
    trust_remote_code: bool = ModelSource.model_fields["trust_remote_code"]
    device_map: Literal["auto"] | None = ModelSource.model_fields["device_map"]
    attn_implementation: str | None = ModelSource.model_fields["attn_implementation"]

    def load_kwargs(self) -> dict[str, Any]:
        """The options that differ from the defaults, as keywords of
        :func:`kdforge.teachers.online.load_teacher`."""
        return self.model_dump(include=set(HubOptions.model_fields), exclude_defaults=True)

    def tokenizer_options(self) -> dict[str, Any]:
        """What the model's own tokenizer is loaded with too (``ModelSource`` keywords)."""
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


# --------------------------------------------------------------------------------------------- names
def classify_model_name(name: str) -> Literal["asset", "local", "hub"]:
    """``asset`` (an offline kdforge asset), ``local`` (an existing folder) or ``hub`` (a Hub id).

    Raises:
        AssetError: the name looks like a local path but no such folder exists, or it is neither a
            folder nor of the Hub form ``owner/name``.
    """
    from kdforge.assets import ASSET_MODULES

    name = asset_name(name)
    if name in ASSET_MODULES:
        return "asset"
    path = Path(name).expanduser()
    if path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return "local"
    looks_local = name.startswith((".", "/", "~")) or path.exists() or "\\" in name
    if looks_local or not _HUB_ID.match(name) or name.count("/") > 1:
        raise AssetError(f"model {name!r}: no such folder",
                         "point model at a folder written by save_pretrained (config.json + weights), "
                         "an offline asset (smollm2), or a Hub id like owner/name")
    return "hub"


def asset_name(name: str) -> str:
    """``asset:NAME`` -> ``NAME`` (the bare name is the one spelling :class:`ModelSource` documents);
    any other name is returned unchanged.

    Raises:
        AssetError: ``asset:`` followed by a name that is no kdforge asset.
    """
    if not name.startswith("asset:"):
        return name
    from kdforge.assets import ASSET_MODULES

    bare = name.split(":", 1)[1]
    if bare not in ASSET_MODULES:
        raise AssetError(f"model {name!r}: {bare!r} is no kdforge asset",
                         f"use one of: {', '.join(sorted(ASSET_MODULES))} (write it bare: model: smollm2)")
    return bare


def resolve_model_path(name: str) -> str:
    """An asset name (``smollm2`` or ``asset:smollm2``) becomes its local folder; a folder or Hub id is
    returned as is."""
    if classify_model_name(name) == "asset":
        from kdforge.assets import ensure

        return str(ensure(asset_name(name)))
    return name


def _path_and_gguf(name: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained``'s first argument for ``name`` and, for a ``.gguf`` file, ``gguf_file``."""
    path = resolve_model_path(name)
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def hub_token() -> str | None:
    """The Hub token from the environment (``HF_TOKEN``), or None (then ``huggingface_hub``'s login)."""
    for var in _TOKEN_ENV:
        if os.environ.get(var):
            return os.environ[var]
    return None


# --------------------------------------------------------------------------------------------- placement
def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` (``cuda:LOCAL_RANK`` under a multi-process launch) if available, else
    ``mps`` if available, else ``cpu``; other names are checked against this machine.

    Raises:
        DeviceError: a CUDA/MPS device that this machine does not have.
    """
    if device == "auto":
        if torch.cuda.is_available():
            from kdforge.distributed import launched_world_size

            if launched_world_size() > 1:  # one process per GPU (accelerate launch / torchrun)
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked, but this machine has no CUDA GPU",
                              "use device: auto (the accelerator when there is one, else the CPU) or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} asked, but only {torch.cuda.device_count()} GPU(s) are visible",
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or check CUDA_VISIBLE_DEVICES")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device {device!r} asked, but MPS is not available here", "use device: auto or cpu")
    return dev


def check_device_map(source: ModelSource) -> None:
    """``device_map`` shards over GPUs: refuse it on a machine without one, before loading anything.

    Raises:
        DeviceError: ``device_map`` set and no CUDA GPU visible.
    """
    if source.device_map is not None and not torch.cuda.is_available():
        raise DeviceError(
            f"device_map: {source.device_map} shards {source.model!r} over GPUs, but this machine has none",
            "remove device_map (the model then loads on device: auto, the CPU here), or run on a GPU machine",
        )


def torch_dtype(dtype: str) -> torch.dtype | str:
    """``float32``/``bfloat16``/``float16`` as a ``torch.dtype``; ``auto`` stays ``"auto"``."""
    return "auto" if dtype == "auto" else _TORCH_DTYPES[dtype]


# --------------------------------------------------------------------------------------------- loading
def pretrained_kwargs(source: ModelSource) -> dict[str, Any]:
    """The keyword arguments of ``from_pretrained`` for ``source`` (revision, remote code, token, ...)."""
    kind = classify_model_name(source.model)
    kwargs: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.revision is not None:
        if kind != "hub":
            raise ConfigError(f"revision: {source.revision!r} is set, but {source.model!r} is a local "
                              f"{'asset' if kind == 'asset' else 'folder'}, which has no revisions",
                              "remove revision, or give a Hub id")
        kwargs["revision"] = source.revision
    if kind == "hub" and hub_token() is not None:
        kwargs["token"] = hub_token()
    return kwargs


def _hub_ready(source: ModelSource, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``kwargs`` for a Hub id: cached locally -> ``local_files_only``; else the Hub must answer.

    Raises:
        AssetError: not in the local cache and the Hub cannot be reached (offline), at once.
    """
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.model, "config.json", revision=source.revision)
    if isinstance(cached, str):
        return {**kwargs, "local_files_only": True}
    from kdforge.data.sources import hub_offline_reason

    reason = hub_offline_reason()
    if reason is not None:
        raise AssetError(
            f"{what} {source.model!r} is a Hugging Face Hub id that is not in the local cache, and the Hub "
            f"cannot be reached: {reason}",
            "download it where there is a network (huggingface-cli download ID, or save_pretrained to a "
            "folder) and point model at that folder, use an offline asset (smollm2), or run with network access",
        )
    return kwargs


def check_source(source: ModelSource, *, what: str = "model") -> None:
    """Every check of ``source`` that needs no weights: the name, the folder, the Hub (offline?),
    ``revision`` on a local model, the device and ``device_map``. Run it before writing anything.

    Raises:
        AssetError: a missing folder or one without ``config.json``; a Hub id while offline.
        ConfigError: ``revision`` on a local folder or asset.
        DeviceError: ``device_map`` without a GPU, or a device this machine lacks.
    """
    kind = classify_model_name(source.model)
    check_device_map(source)
    if source.device_map is None:
        resolve_device(source.device)
    kwargs = pretrained_kwargs(source)
    if kind == "hub":
        _hub_ready(source, kwargs, what)
    elif kind == "local" and Path(source.model).expanduser().is_dir() \
            and not (Path(source.model).expanduser() / "config.json").is_file():
        raise AssetError(f"{what} folder {source.model!r} has no config.json, so it is not a saved model",
                         "point model at a folder written by model.save_pretrained(folder) "
                         "(config.json, weights and the tokenizer files)")


def load_config(source: ModelSource, *, what: str = "model") -> Any:
    """The model's ``AutoConfig`` (no weights), e.g. for its ``vocab_size``."""
    from transformers import AutoConfig

    kwargs = pretrained_kwargs(source)
    if classify_model_name(source.model) == "hub":
        kwargs = _hub_ready(source, kwargs, what)
    path, gguf = _path_and_gguf(source.model)
    try:
        return AutoConfig.from_pretrained(path, **kwargs, **gguf)
    except (OSError, ValueError) as exc:
        raise AssetError(f"cannot read the config of {what} {source.model!r}: {str(exc).splitlines()[0]}",
                         "point model at a folder written by save_pretrained (config.json) or a Hub id") from None


def load_tokenizer(source: ModelSource, *, what: str = "model") -> Any:
    """The tokenizer of ``source`` (``AutoTokenizer``), with the same revision/remote-code/token."""
    from transformers import AutoTokenizer

    path, gguf = _path_and_gguf(source.model)
    kwargs = pretrained_kwargs(source)
    if classify_model_name(source.model) == "hub":
        kwargs = _hub_ready(source, kwargs, what)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs, **gguf)
    except (OSError, ValueError) as exc:
        raise AssetError(f"cannot load the tokenizer of {what} {source.model!r}: {str(exc).splitlines()[0]}",
                         "the folder (or Hub repo) must hold a tokenizer (tokenizer.json or "
                         "tokenizer_config.json); save it with tokenizer.save_pretrained(folder)") from None


def load_causal_lm(source: ModelSource, *, what: str = "model", place: bool = True) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` for ``source``, placed on its device and dtype.

    ``place=False`` leaves a single-device model on the CPU (the trainer places a student).

    Raises:
        AssetError: missing folder, a Hub id offline, or a folder that is not a causal LM.
        DeviceError: ``device_map`` without a GPU, or a device this machine lacks.
    """
    from transformers import AutoModelForCausalLM

    return load_pretrained(source, AutoModelForCausalLM, what=what, place=place, kind="a causal LM")


def load_sequence_classifier(source: ModelSource, *, what: str = "model", place: bool = True) -> torch.nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained`` for ``source`` (same names, placement
    and errors as :func:`load_causal_lm`), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    return load_pretrained(source, AutoModelForSequenceClassification, what=what, place=place,
                           kind="a sequence classifier").eval()


def load_pretrained(source: ModelSource, auto_class: Any, *, what: str = "model", place: bool = True,
                    kind: str = "a model") -> torch.nn.Module:
    """``auto_class.from_pretrained`` (an ``AutoModelFor...``) for ``source``: asset, folder, ``.gguf``
    file or Hub id, with revision/remote code/token, dtype, attention and placement.

    Raises:
        AssetError: missing folder, a Hub id offline, or a folder that ``auto_class`` cannot load.
        DeviceError: ``device_map`` without a GPU, or a device this machine lacks.
    """
    check_device_map(source)
    device = None if source.device_map is not None else resolve_device(source.device)
    path, gguf = _path_and_gguf(source.model)
    kwargs = pretrained_kwargs(source)
    if classify_model_name(source.model) == "hub":
        kwargs = _hub_ready(source, kwargs, what)
    kwargs.update(gguf)
    kwargs["dtype"] = torch_dtype(source.dtype)
    if source.attn_implementation is not None:
        kwargs["attn_implementation"] = source.attn_implementation
    if source.device_map is not None:
        kwargs["device_map"] = source.device_map
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        local = classify_model_name(source.model) != "hub"
        raise AssetError(
            f"cannot load {what} {source.model!r} as {kind}: {str(exc).splitlines()[0]}",
            f"check that the folder holds config.json and the weights of {kind} (save_pretrained)"
            if local else "check the Hub id, revision and access (HF_TOKEN for gated models), or pass a local folder",
        ) from None
    if place and device is not None and device.type != "cpu":
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise DeviceError(f"cannot move {what} {source.model!r} to {device}: {str(exc).splitlines()[0]}",
                              "free memory on that device, use a smaller dtype (bfloat16), or device: cpu") from None
    log.info("%s %s: %s, %s, on %s", what, source.model, type(model).__name__,
             next(model.parameters()).dtype, source.device_map or next(model.parameters()).device)
    return model


def load_model(source: ModelSource, *, role: Literal["teacher", "student"] = "teacher",
               place: bool = True) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer of ``source``; a teacher comes back frozen and in eval mode."""
    tokenizer = load_tokenizer(source, what=role)
    model = load_causal_lm(source, what=role, place=place)
    if role == "teacher":
        model.requires_grad_(False).eval()
    return model, tokenizer


__all__ = ["Dtype", "HubOptions", "ModelSource", "asset_name", "check_device_map", "check_source", "classify_model_name",
           "hub_token", "load_causal_lm", "load_config", "load_model", "load_pretrained", "load_sequence_classifier",
           "load_tokenizer", "pretrained_kwargs", "resolve_device", "resolve_model_path", "torch_dtype"]
