"""Model card (README.md with Hub metadata and the evaluation table) and push_to_hub with the
upload intercepted: no network."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, ModelCard

from kdforge.errors import AssetError, ConfigError
from kdforge.students.card import push_to_hub, render_eval_table, write_model_card

TABLE = {"labels only": {"eval/nll": 3.21, "eval/kl_to_teacher": 0.91},
         "forward_kl": {"eval/nll": 3.02, "eval/kl_to_teacher": 0.42}}


def _card(folder, **kw):
    args = {"teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "student": "HuggingFaceTB/SmolLM2-135M",
            "data": "me/chat-data", "method": "forward KL on the cached top-64, T=1", "steps": 120,
            "eval_table": TABLE, "command": "kdforge run configs/quickstart.yaml"}
    args.update(kw)
    return write_model_card(folder, **args)


def test_card_has_hub_metadata_and_the_teacher_data_method_steps_and_table(tmp_path):
    path = _card(tmp_path)
    card = ModelCard.load(path)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.datasets == ["me/chat-data"]
    assert {"knowledge-distillation", "kdforge"} <= set(card.data.tags)
    text = card.text
    for needle in ("HuggingFaceTB/SmolLM2-135M-Instruct", "me/chat-data", "forward KL on the cached top-64",
                   "**Optimizer steps:** 120", "| labels only | 3.21 | 0.91 |", "kdforge run configs/quickstart.yaml"):
        assert needle in text


def test_local_paths_never_become_hub_ids_and_a_cut_student_names_the_teacher(tmp_path):
    local = tmp_path / "teacher"
    local.mkdir()
    card = ModelCard.load(_card(tmp_path, teacher=str(local), student="cut from the teacher", data=[str(local)]))
    assert card.data.base_model is None and card.data.datasets is None
    card = ModelCard.load(_card(tmp_path, student="layers 0,2,4 of the teacher"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_card_is_rewritten_whole_and_bad_inputs_are_config_errors(tmp_path):
    _card(tmp_path, steps=1)
    _card(tmp_path, steps=2)
    assert "**Optimizer steps:** 2" in (tmp_path / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name != "README.md"]  # no temp files left
    with pytest.raises(ConfigError):
        _card(tmp_path / "missing")


def test_eval_table_from_rows_takes_the_union_of_columns():
    table = render_eval_table([{"method": "kd", "nll": 1.0}, {"method": "ce", "acc": 0.5}])
    assert table.splitlines()[0] == "| method | nll | acc |"
    assert table.splitlines()[3] == "| ce |  | 0.5 |"


@pytest.fixture
def uploads(monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw, self.token))

    def upload_folder(self, **kw):
        calls.append(("upload", kw["repo_id"], kw, self.token))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


def test_push_uploads_the_folder_with_the_environment_token(tmp_path, uploads, monkeypatch):
    _card(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    url = push_to_hub(tmp_path, "me/student", commit_message="first")
    assert url == "https://huggingface.co/me/student/commit/abc"
    (create, upload) = uploads
    assert create[:2] == ("create", "me/student") and create[2]["private"] is True and create[3] == "hf_env_token"
    assert upload[2]["folder_path"] == str(tmp_path) and upload[2]["commit_message"] == "first"


def test_push_refuses_offline_without_token_or_card_before_uploading(tmp_path, uploads, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "t")
    with pytest.raises(ConfigError, match="README.md"):
        push_to_hub(tmp_path, "me/student")
    _card(tmp_path)
    with pytest.raises(ConfigError, match="owner/name"):
        push_to_hub(tmp_path, "not a repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetError, match="offline"):
        push_to_hub(tmp_path, "me/student")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(AssetError, match="HF_TOKEN"):
        push_to_hub(tmp_path, "me/student")
    assert uploads == []


def test_a_failed_upload_is_an_asset_error_naming_the_fix(tmp_path, uploads, monkeypatch):
    _card(tmp_path)

    def broken(self, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "upload_folder", broken)
    with pytest.raises(AssetError, match="no route to host"):
        push_to_hub(tmp_path, "me/student", token="t")
