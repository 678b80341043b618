"""Chaos (c): the disk fills up while a checkpoint or a cache shard is written; once space is
free again, the same command continues from the previous state and ends exactly where an
uninterrupted run ends.

The full disk is the corpus's: every ``kdforge.io.atomic_write`` writes half its bytes, then
fails with ``ENOSPC`` (see ``_corpus.fill_disk``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import kdforge.io as kio
from kdforge.errors import DiskFullError
from kdforge.train import Callback
from kdforge.train.checkpoint import latest_checkpoint, verify_checkpoint

from ._corpus import Shared, World, distiller, fill_disk


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    return World(tmp_path, monkeypatch, Shared(tmp_path / "shared"))


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_the_resume_ends_identical(world, monkeypatch):
    class FillAtStep3(Callback):
        def on_step_end(self, state: Any, logs: Any) -> None:
            if state.step == 3:
                fill_disk(world)

    ref = distiller(world, out=world.tmp / "ref", max_steps=6, save_every=2)
    ref.train()
    out = world.tmp / "run"
    with pytest.raises(DiskFullError, match="step-4"):
        distiller(world, out=out, max_steps=6, save_every=2, callbacks=[FillAtStep3()]).train()
    assert latest_checkpoint(out / "checkpoints").name == "step-2"
    verify_checkpoint(out / "checkpoints" / "step-2")  # complete, checksums match
    monkeypatch.setattr(kio, "os", __import__("os"))  # space is free again
    resumed = distiller(world, out=out, max_steps=6, save_every=2)
    assert resumed.train(resume=True).step == 6
    for a, b in zip(resumed.unwrapped_student.state_dict().values(), ref.unwrapped_student.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the torn attempt is gone
    want = _files(ref.run_dir / "checkpoints" / "step-6")
    got = _files(out / "checkpoints" / "step-6")
    assert got.keys() == want.keys()
    for name in want:  # trainer_state.json differs only where the run folder is named, if anywhere
        if name.endswith(".safetensors") or name.startswith("optimizer"):
            assert got[name] == want[name], name


def test_disk_full_during_a_cache_shard_keeps_the_finished_shards_and_the_rebuild_ends_identical(world, monkeypatch):
    from kdforge.teachers import TeacherCacheDataset, build_teacher_cache

    teacher, seqs = world.shared.teacher, world.shared.sequences

    def build(out: Path, **kw: Any) -> Path:
        return build_teacher_cache(teacher, seqs, out, k=4, shard_size=2, batch_size=2, **kw)

    ref = build(world.tmp / "ref")

    def fill_after_shard_1(index: int, entry: dict) -> None:
        if index == 1:
            fill_disk(world)

    out = world.tmp / "cache"
    with pytest.raises(DiskFullError, match="shard-00002.kdc|manifest.json"):
        build(out, on_shard=fill_after_shard_1)
    finished = _files(out)
    assert {"shard-00000.kdc", "shard-00001.kdc", "manifest.json"} <= set(finished)
    assert finished["shard-00000.kdc"] == _files(ref)["shard-00000.kdc"]
    assert not list(out.glob(".*.tmp")) and not (out / ".build.lock").exists()
    monkeypatch.setattr(kio, "os", __import__("os"))
    build(out)
    assert _files(out) == _files(ref)  # byte for byte: no lost or duplicated rows
    assert len(TeacherCacheDataset(out, seqs)) == len(seqs)
