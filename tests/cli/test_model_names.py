"""Every command reads model names through kdforge.models: ``kdforge eval``, ``make-student``,
``select`` and ``cache-teacher`` accept an asset name (bare or ``asset:``), a folder or a Hub id like
``kdforge run`` does, ask for the accelerator by default, and fail with the same error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.recipes import _byo

import kdforge.assets
import kdforge.models as models
from kdforge.cli.main import main
from kdforge.errors import AssetError
from kdforge.models import ModelSource, classify_model_name, load_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return _byo.teacher_and_student(tmp_path_factory.mktemp("names"))


@pytest.fixture
def asset(folders, monkeypatch) -> list[str]:
    """``smollm2`` resolves to the tiny teacher folder; returns the asset names asked for."""
    asked: list[str] = []
    monkeypatch.setattr(kdforge.assets, "ensure", lambda name, cache_dir=None: asked.append(name) or folders[0])
    return asked


@pytest.fixture
def devices(monkeypatch) -> list[str]:
    """Records the device names the loaders resolve (this box has no accelerator: they end on the CPU)."""
    asked: list[str] = []
    real = models.resolve_device
    monkeypatch.setattr(models, "resolve_device", lambda d: asked.append(d) or real(d))
    return asked


def test_asset_prefix_is_an_alias_of_the_bare_name(asset):
    assert classify_model_name("asset:smollm2") == classify_model_name("smollm2") == "asset"
    assert resolve_model_path("asset:smollm2") == resolve_model_path("smollm2")
    assert asset == ["smollm2", "smollm2"]
    assert len(load_tokenizer(ModelSource(model="asset:smollm2"))) == len(_byo.tokenizer())
    with pytest.raises(AssetError, match="'nope' is no kdforge asset") as exc:
        classify_model_name("asset:nope")
    assert "smollm2" in exc.value.fix


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(" ".join(_byo.WORDS[i: i + 12]) for i in range(0, 48, 4)))
    return path


def test_make_student_and_eval_take_an_asset_name(asset, tmp_path, capsys):
    assert main(["make-student", "asset:smollm2", str(tmp_path / "s"), "--num-layers", "2"]) == 0
    assert "of 4" in capsys.readouterr().out and (tmp_path / "s" / "tokenizer.json").is_file()
    assert main(["eval", "--teacher", "smollm2", "--student", str(tmp_path / "s"), "--data", str(_text(tmp_path)),
                 "--no-cost", "--max-tokens", "64", "--block-size", "16", "-o", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [m["role"] for m in res["models"]] == ["teacher", "student"] and "smollm2" in asset


def test_cache_teacher_and_select_take_an_asset_name_on_the_accelerator_by_default(asset, devices, folders,
                                                                                     tmp_path, capsys):
    cache = {"teacher": {"name_or_path": "smollm2"}, "data": {"path": str(_text(tmp_path)), "block_size": 8},
             "output_dir": str(tmp_path / "cache"), "k": 2, "encoding": "compact-u8-zlib", "max_sequences": 4}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(cache))
    assert main(["cache-teacher", str(tmp_path / "cache.yaml")]) == 0
    assert "auto" in devices  # no teacher.device: the accelerator when there is one
    devices.clear()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(_byo.WORDS[i: i + 8])}) + "\n" for i in range(6)))
    assert main(["select", "--teacher", "asset:smollm2", "--reference", str(folders[1]), "--corpus", str(corpus),
                 "--out", str(tmp_path / "sel"), "--max-length", "16"]) == 0
    assert devices.count("auto") == 2 and "kept 3 of 6" in capsys.readouterr().out


def test_cache_teacher_and_select_yaml_take_the_hub_loading_options(asset, folders, tmp_path, monkeypatch, capsys):
    """``revision``, ``attn_implementation`` (and the other ModelSource options) in the YAML of
    cache-teacher and select reach ``from_pretrained`` like ``kdforge run``'s teacher block."""
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.append(kwargs)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    opts = {"attn_implementation": "eager"}
    cache = {"teacher": {"name_or_path": "smollm2", "revision": "v1"}, "data": {"path": str(_text(tmp_path)),
             "block_size": 8}, "output_dir": str(tmp_path / "cache"), "k": 2, "encoding": "compact-u8-zlib",
             "max_sequences": 2}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(cache))
    assert main(["cache-teacher", str(tmp_path / "cache.yaml")]) == 2  # read, and checked like kdforge run's
    assert "'smollm2' is a local asset, which has no revisions" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    cache["teacher"] = {"name_or_path": "smollm2", **opts}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(cache))
    assert main(["cache-teacher", str(tmp_path / "cache.yaml")]) == 0
    assert seen[-1]["attn_implementation"] == "eager"
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(_byo.WORDS[i: i + 8])}) + "\n" for i in range(4)))
    select = {"teacher": {"name_or_path": "smollm2", **opts}, "reference": {"name_or_path": str(folders[1])},
              "corpus": {"path": str(corpus)}, "output_dir": str(tmp_path / "sel"), "max_length": 16}
    (tmp_path / "select.yaml").write_text(yaml.safe_dump(select))
    seen.clear()
    assert main(["select", str(tmp_path / "select.yaml")]) == 0
    assert [k.get("attn_implementation") for k in seen] == ["eager", None]  # teacher, reference


def test_generate_backend_takes_an_asset_name_either_way(asset):
    from kdforge.elicit.backends import build_backend
    from kdforge.elicit.backends.config import TransformersConfig

    for name in ("smollm2", "asset:smollm2"):
        backend = build_backend(TransformersConfig(model=name, device="cpu"))
        assert backend.model.config.hidden_size == 32 and len(backend.tokenizer) == len(_byo.tokenizer())


@pytest.mark.parametrize("command", ["eval", "make-student", "select", "cache-teacher", "run", "sft"])
def test_a_missing_model_folder_is_the_same_error_everywhere(command, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = "./no-such-model"
    text = str(_text(tmp_path))
    if command == "eval":
        argv = ["eval", "--student", missing, "--data", text]
    elif command == "make-student":
        argv = ["make-student", missing, "out", "--num-layers", "1"]
    elif command == "sft":
        argv = ["sft", text, "--student", missing, "-o", "out"]
    elif command == "select":
        argv = ["select", "--teacher", missing, "--reference", str(folders[1]), "--corpus", text, "--out", "sel"]
    else:
        config = {"teacher": {"name_or_path": missing}, "data": {"path": text, "block_size": 8}, "output_dir": "c"}
        if command == "run":
            config = {"recipe": "llm_kd", "teacher": {"model": missing}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        argv = [command, "c.yaml"] + (["--dry-run"] if command == "run" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{missing!r}: no such folder" in err and "save_pretrained" in err, err
    assert not any((tmp_path / d).exists() for d in ("out", "sel", "c"))
