"""Teacher hidden states stored in the cache (feature_layers): round trip within the compression
error (bf16, int8 per-row scaled), feature terms from the cache equal to the live teacher's within
that error, integrity (checksums, resume), refusals that name the fix, and training from the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdforge.errors import CacheError, ConfigError
from kdforge.features import FeatureRequest
from kdforge.teachers import (
    OnlineTeacher,
    TeacherCacheDataset,
    build_teacher_cache,
    open_teacher_cache,
)
from kdforge.teachers.cache import collate_teacher_cache
from kdforge.teachers.cache.features import decode_features, encode_features
from kdforge.teachers.forward import run_model_features
from kdforge.teachers.sources.cached import CachedTeacher
from kdforge.train import CausalLMTask, Distiller, Objective, TrainConfig
from kdforge.train.tasks import attach_teacher

from .conftest import tiny_llama

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=3)


def _live_hidden(teacher, ids):
    with torch.no_grad():
        _, feats = run_model_features(teacher, FeatureRequest(hidden_states=True), input_ids=ids,
                                      attention_mask=torch.ones_like(ids))
    return torch.stack([feats.hidden_states[i] for i in LAYERS], dim=1)


def _build(teacher, sequences, path, dtype, **kw):
    return build_teacher_cache(OnlineTeacher(teacher), sequences, path, k=8, shard_size=6, batch_size=3,
                               feature_layers=LAYERS, feature_dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "fp32"])
def test_hidden_states_round_trip_within_the_compression_error(teacher, sequences, tmp_path, dtype):
    out = _build(teacher, sequences, tmp_path / "c", dtype)
    cache = open_teacher_cache(out)
    got = torch.stack([torch.from_numpy(cache.features(i)) for i in range(len(cache))])
    ref = _live_hidden(teacher, sequences)
    assert cache.feature_layers == LAYERS and got.shape == ref.shape
    err = (got - ref).abs()
    if dtype == "fp32":  # stored as computed: exact (the codec bit for bit; the cache up to batch-size rounding)
        blob, bound = encode_features(ref, "fp32")
        assert bound == 0.0 and np.array_equal(decode_features(blob, "fp32", *ref.shape), ref.numpy())
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert cache.manifest["stats"]["features_max_error"] == 0.0
        assert cache.manifest["stats"]["features_bytes_per_token"] == len(LAYERS) * 4 * ref.shape[-1]
        return
    if dtype == "bf16":
        assert (err <= ref.abs() * 2.0**-8 + 1e-6).all()
    else:  # half a step of the row's scale
        assert (err <= ref.abs().amax(-1, keepdim=True) / 254 + 1e-6).all()
    stats = cache.manifest["stats"]
    assert 0 < err.max() <= stats["features_max_error"] + 1e-6
    h = ref.shape[-1]
    per_token = len(LAYERS) * (2 * h if dtype == "bf16" else h + 4)
    assert stats["features_bytes_per_token"] == per_token
    # the ordinary top-k part is unchanged by storing features
    plain = build_teacher_cache(OnlineTeacher(teacher), sequences, tmp_path / "plain", k=8, shard_size=6, batch_size=3)
    m_plain = json.loads((plain / "manifest.json").read_text())
    assert [s["sha256"] for s in m_plain["shards"]] == [s["sha256"] for s in cache.manifest["shards"]]
    assert "features" not in m_plain and open_teacher_cache(plain).feature_layers is None


def test_feature_terms_from_the_cache_equal_the_live_teacher(teacher, sequences, tmp_path):
    out = _build(teacher, sequences, tmp_path / "c", "bf16")
    ds = TeacherCacheDataset(out)
    batch = collate_teacher_cache([ds[i] for i in range(4)])
    student = tiny_llama(seed=4)
    obj = Objective([{"name": "forward_kl", "weight": 1.0},
                     {"name": "hidden_mse", "weight": 1.0, "params": {"layers": {1: 1, 2: 2},
                                                                       "projector": "identity"}}])
    task = CausalLMTask()
    cached_src = CachedTeacher.with_features(ds.cache)
    cached = attach_teacher(task, student, cached_src, batch, extras=obj.bind(student, cached_src))
    live_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    live = attach_teacher(task, student, OnlineTeacher(teacher), live_batch, extras=obj.bind(student, teacher))
    (key,) = [k for k in live.extra_terms if "hidden_mse" in k]
    c, v = cached.extra_terms[key], live.extra_terms[key]
    c, v = (c[0] if isinstance(c, tuple) else c), (v[0] if isinstance(v, tuple) else v)
    assert float(v.detach()) > 0
    torch.testing.assert_close(c, v, rtol=2e-2, atol=1e-6)


def test_refusals_name_the_fix(teacher, sequences, tmp_path):
    plain = build_teacher_cache(OnlineTeacher(teacher), sequences, tmp_path / "plain", k=8)
    with pytest.raises(CacheError, match="feature_layers"):
        CachedTeacher.with_features(open_teacher_cache(plain))
    with pytest.raises(ConfigError, match="feature_layers"):
        build_teacher_cache(OnlineTeacher(teacher), sequences, tmp_path / "x", k=8, feature_layers=[0, 9])
    student = tiny_llama(seed=4)
    ds = TeacherCacheDataset(plain)
    batch = collate_teacher_cache([ds[i] for i in range(2)])
    obj = Objective([{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 1.0}])
    with pytest.raises(ConfigError, match="feature_layers"):  # a cache without hidden states
        attach_teacher(CausalLMTask(), student, CachedTeacher(), batch, extras=obj.bind(student, teacher))
    out = _build(teacher, sequences, tmp_path / "c", "int8")
    src = CachedTeacher.with_features(open_teacher_cache(out))
    ds = TeacherCacheDataset(out)
    batch = collate_teacher_cache([ds[i] for i in range(2)])
    obj = Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"layers": {0: 0}}}])
    with pytest.raises(CacheError, match=r"stores hidden_states layers \[1, 2\]"):
        attach_teacher(CausalLMTask(), student, src, batch, extras=obj.bind(student, src))


def test_features_files_are_checked_and_rebuilt_on_resume(teacher, sequences, tmp_path):
    out = _build(teacher, sequences, tmp_path / "c", "int8")
    before = (out / "features-00001.kdf").read_bytes()
    blob = bytearray(before)
    blob[10] ^= 0xFF
    (out / "features-00001.kdf").write_bytes(bytes(blob))
    with pytest.raises(CacheError, match="corrupted"):
        open_teacher_cache(out)
    _build(teacher, sequences, out, "int8")  # the resume rebuilds the damaged shard
    assert (out / "features-00001.kdf").read_bytes() == before
    open_teacher_cache(out)
    with pytest.raises(CacheError, match="other settings"):  # other layers: not the same cache
        build_teacher_cache(OnlineTeacher(teacher), sequences, out, k=8, shard_size=6, batch_size=3,
                            feature_layers=[2], feature_dtype="int8")


def test_training_hidden_mse_from_the_cache_pulls_the_student_toward_the_teacher(teacher, sequences, tmp_path):
    out = _build(teacher, sequences, tmp_path / "c", "int8")
    ds = TeacherCacheDataset(out)
    batch = collate_teacher_cache([ds[i] for i in range(len(ds))])
    student = tiny_llama(seed=4)
    source = CachedTeacher.with_features(ds.cache)
    obj = Objective([{"name": "hidden_mse", "weight": 1.0, "params": {"layers": {1: 1, 2: 2},
                                                                       "projector": "identity"}}])

    def gap() -> float:
        return float((_live_hidden(student, batch["input_ids"]) - _live_hidden(teacher, batch["input_ids"]))
                     .pow(2).mean())

    before = gap()
    cfg = TrainConfig(max_steps=30, batch_size=4, lr=1e-2, progress=False, seed=0, output_dir=str(tmp_path / "r"))
    Distiller(student, source, task=CausalLMTask(), objective=obj, config=cfg, train_data=ds,
              collate_fn=collate_teacher_cache).train()
    assert gap() < 0.6 * before


def test_a_view_without_features_skips_reading_them(teacher, sequences, tmp_path, monkeypatch):
    data = TeacherCacheDataset(_build(teacher, sequences, tmp_path / "c", "int8"))
    view = data.with_features(False)
    assert "teacher_hidden_states" in data[0] and data.features  # the original keeps them
    ids = data[0]["teacher_ids"]
    reads = []
    monkeypatch.setattr(view.cache, "features", lambda i: reads.append(i))
    item = view[0]
    assert reads == [] and "teacher_hidden_states" not in item and "teacher_feature_layers" not in item
    assert torch.equal(item["teacher_ids"], ids)
