"""kdforge.recipes.subrun: the sub-run records, their reuse rules and rank-0 publishing (one process)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kdforge.errors import CheckpointError
from kdforge.recipes.subrun import (
    FINGERPRINT_FILE,
    SUBRUN_RECORD,
    RecipeRun,
    config_key,
    fingerprint,
    gather_student,
    slug,
)


def _run(tmp_path) -> RecipeRun:
    return RecipeRun(tmp_path / "run")


def test_fingerprint_hashes_sorted_json_and_ignores_key_order():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({"a": 1})) == 20 and len(fingerprint({"a": 1}, length=16)) == 16
    assert fingerprint({"a": 1}).startswith(fingerprint({"a": 1}, length=16))


def test_config_key_leaves_out_defaults_so_a_new_field_keeps_old_fingerprints():
    """A config class that gains a field (default = old behaviour) between versions: runs of the old
    version resume under the new one; changing any value, new field included, still retrains."""
    from pydantic import BaseModel, Field

    class Train(BaseModel):
        lr: float = 1e-3
        steps: int = 10

    class Old(BaseModel):
        name: str
        train: Train = Field(default_factory=Train)

    class TrainV2(Train):
        clip: float | None = None  # added later

    class New(BaseModel):
        name: str
        train: TrainV2 = Field(default_factory=TrainV2)
        extra: list[str] = Field(default_factory=list)  # added later

    old, new = Old(name="kd", train=Train(lr=2e-3)), New(name="kd", train=TrainV2(lr=2e-3))
    assert config_key(old) == config_key(new) == {"name": "kd", "train": {"lr": 2e-3}}
    assert fingerprint(config_key(old)) == fingerprint(config_key(new))
    assert fingerprint(config_key(New(name="kd", train=TrainV2(lr=2e-3, clip=1.0)))) != fingerprint(config_key(old))
    assert fingerprint(config_key(New(name="kd", extra=["a"]))) != fingerprint(config_key(New(name="kd")))
    assert "name" not in config_key(new, exclude={"name"})


def test_real_recipe_keys_ignore_fields_at_their_defaults():
    """``llm_kd``'s sub-run fingerprint: spelling out a default (as a newer version's dump would) changes nothing."""
    from kdforge.recipes.llm_kd import LLMKDConfig, subrun_fingerprint

    base = {"methods": [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]}]}
    a = LLMKDConfig.model_validate(base)
    spelled = a.methods[0].model_dump(mode="json")  # every field of the method, defaults included
    b = LLMKDConfig.model_validate({**base, "methods": [spelled]})
    assert spelled != config_key(a.methods[0])
    assert subrun_fingerprint(a, a.methods[0], 0) == subrun_fingerprint(b, b.methods[0], 0)
    c = LLMKDConfig.model_validate({**base, "train": {"max_steps": 7}})
    assert subrun_fingerprint(a, a.methods[0], 0) != subrun_fingerprint(c, c.methods[0], 0)


def test_slug_makes_folder_names():
    assert slug("KD top-64") == "kd-top-64" and slug("KD T=2 a=0.5") == "kd-t-2-a-0-5" and slug("!!") == "method"


def test_a_finished_sub_run_is_reused_only_under_its_fingerprint_with_intact_weights(tmp_path, caplog):
    run = _run(tmp_path)
    sub = run.subrun("'kd', seed 0", "kd/seed-0", {"lr": 1e-3})
    assert sub.reuse() is None  # nothing there yet
    sub.prepare(resume=True)
    assert (sub.dir / FINGERPRINT_FILE).read_text().strip() == sub.fingerprint
    model = torch.nn.Linear(3, 2)
    record = sub.finish({"train_info": {"steps": 3}}, weights="final.safetensors", model=model)
    on_disk = json.loads((sub.dir / SUBRUN_RECORD).read_text())
    assert on_disk == record and set(on_disk) == {"fingerprint", "weights", "weights_sha256", "train_info"}

    with caplog.at_level(logging.INFO):
        assert sub.reuse() == record
    assert "'kd', seed 0 finished earlier" in caplog.text
    assert sub.reuse(enabled=False) is None  # no --resume: train again

    other = run.subrun("'kd', seed 0", "kd/seed-0", {"lr": 2e-3})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert other.reuse() is None
    assert "trained with another config" in caplog.text

    weights = sub.dir / "final.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert sub.reuse() is None
    assert "do not match their checksum" in caplog.text


def test_prepare_drops_the_stale_record_and_only_on_resume_checkpoints_of_another_config(tmp_path):
    run = _run(tmp_path)
    old = run.subrun("x", "m/seed-0", {"v": 1})
    old.prepare(resume=False)
    old.finish({}, weights="final.safetensors", model=torch.nn.Linear(2, 2))
    (old.dir / "checkpoints" / "step-1").mkdir(parents=True)

    new = run.subrun("x", "m/seed-0", {"v": 2})
    new.prepare(resume=False)  # a fresh run: the Distiller itself replaces the checkpoints
    assert not new.record.exists() and (new.dir / "checkpoints").exists()
    (new.dir / FINGERPRINT_FILE).write_text(old.fingerprint + "\n")
    new.prepare(resume=True)  # continuing another config's checkpoints would mix two runs
    assert not (new.dir / "checkpoints").exists()
    assert (new.dir / FINGERPRINT_FILE).read_text().strip() == new.fingerprint

    (new.dir / "checkpoints" / "step-2").mkdir(parents=True)
    new.prepare(resume=True)  # same config: its checkpoints are kept for the Distiller to resume
    assert (new.dir / "checkpoints" / "step-2").is_dir()


def test_a_record_without_weights_is_reused_on_its_fingerprint_alone(tmp_path):
    """fashion_mnist's result.json records written before the sub-run layer named no weights."""
    run = _run(tmp_path)
    sub = run.subrun("s", "students/a/seed-0", {"k": 1}, length=16, record="result.json")
    sub.dir.mkdir(parents=True)
    sub.record.write_text(json.dumps({"fingerprint": sub.fingerprint, "metrics": {"accuracy": 0.5}}))
    assert sub.reuse()["metrics"] == {"accuracy": 0.5}


def test_load_weights_accepts_a_tied_head_stored_once_and_refuses_another_model(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    run = _run(tmp_path)
    sub = run.subrun("t", "t/seed-0", {})
    sub.prepare(resume=False)
    trained = Tied()
    record = sub.finish({}, weights="final.safetensors", model=trained)
    loaded = sub.load_weights(record, Tied())
    assert torch.equal(loaded.head.weight, trained.emb.weight) and not loaded.training
    with pytest.raises(CheckpointError, match="does not fit"):
        sub.load_weights(record, torch.nn.Linear(3, 5))


def test_publish_writes_results_and_a_failing_plot_is_only_a_warning(tmp_path, caplog):
    run = _run(tmp_path)
    run.out.mkdir(parents=True)

    def broken_plot():
        raise RuntimeError("no display")

    with caplog.at_level(logging.WARNING):
        run.publish({"models": []}, "# table\n", plots=[broken_plot], extra={"metrics.jsonl": "{}\n"})
    assert json.loads((run.out / "results.json").read_text()) == {"models": []}
    assert (run.out / "results.md").read_text() == "# table\n" and (run.out / "metrics.jsonl").is_file()
    assert "could not write the plot: no display" in caplog.text
    assert run.wait_for_results() == {"models": []}


def test_gather_student_without_fsdp_is_the_unwrapped_student_in_eval_mode():
    class Acc:
        is_main_process = True

        def unwrap_model(self, m):
            return m.module

    class Distiller:
        accelerator = Acc()
        student = torch.nn.Sequential(torch.nn.Linear(2, 2))  # stands for a DDP wrapper with .module

    Distiller.student.module = torch.nn.Linear(2, 2).train()
    got = gather_student(Distiller(), lambda: pytest.fail("no copy is needed without FSDP"))
    assert got is Distiller.student.module and not got.training


def test_slug_folder_names_hold_only_lower_case_letters_digits_and_dashes():
    """Any method name (brackets, slashes, dots, unicode) becomes one safe path component."""
    import re

    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.text(max_size=40))
    def check(name: str) -> None:
        folder = slug(name)
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*|method", folder), (name, folder)
        assert slug(folder) == folder  # stable: a folder name is its own slug

    check()
    assert slug("kd [T=2]") == "kd-t-2" and slug("a/b\\c") == "a-b-c" and slug("../x") == "x"
