"""llm_kd feature terms from the cached teacher (kdforge.recipes.llm_features): the same training as
with the live teacher (exactly with fp32 hidden states, within the compression error with int8),
the live teacher idle while such a method trains, the cache fingerprint, and the refusals."""

from __future__ import annotations

import json

import pytest
from tests.recipes.test_llm_kd import _config, tiny_setup  # noqa: F401  (shared tiny teacher/corpus fixture)

from kdforge.config import validate
from kdforge.errors import CacheError, ConfigError
from kdforge.recipes import llm_kd
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig, subrun_fingerprint

CE = {"name": "cross_entropy", "weight": 1.0}
FKL = {"name": "forward_kl", "weight": 1.0, "params": {"sparse_policy": "tail_bucket"}}
HINT = {"name": "hidden_mse", "weight": 1.0, "params": {"layers": "uniform"}}


def _fast(root, methods, steps=4, **kw):
    kw.setdefault("cache", {"k": 8, "batch_size": 4})
    return _config(root, methods=methods, plot=False, save_students=False,
                   train={"max_steps": steps, "batch_size": 4, "lr": 1e-2, "log_every": 1, "eval_every": 2,
                          "progress": False}, **kw)


def _log(out, name):
    lines = (out / name / "seed-0" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines)]


def _manifest(cache):
    return json.loads((cache / "manifest.json").read_text())


@pytest.fixture
def teacher_calls(monkeypatch):
    """Teacher forwards during each sub-run's training, by sub-run folder name."""
    import kdforge.models as models

    calls: list[int] = []
    during: dict[str, int] = {}
    load, train = models.load_causal_lm, llm_kd.train_student

    def counting_load(*args, **kwargs):
        model = load(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        return model

    def counting_train(distiller, **kwargs):
        before = len(calls)
        result = train(distiller, **kwargs)
        during[distiller.config.output_dir.split("/")[-2]] = len(calls) - before
        return result

    monkeypatch.setattr(models, "load_causal_lm", counting_load)
    monkeypatch.setattr(llm_kd, "train_student", counting_train)
    return during


@pytest.mark.parametrize(("dtype", "rel"), [("fp32", 1e-6), ("int8", 2e-2)])
def test_a_cached_feature_method_trains_as_with_the_live_teacher(tiny_setup, tmp_path, teacher_calls,  # noqa: F811
                                                                  dtype, rel):
    methods = [{"name": "live", "teacher": "online", "objective": [CE, HINT]},
               {"name": "cached", "teacher": "cache", "objective": [CE, HINT]}]
    out = tmp_path / "run"
    LLMKD().run(_fast(tiny_setup, methods, cache={"k": 8, "batch_size": 4, "feature_dtype": dtype}), out)
    # the hint maps the 2-block student onto the 4-block teacher: hidden states 2 and 4 are stored
    features = _manifest(out / "teacher_cache")["features"]
    assert features["layers"] == [2, 4] and features["dtype"] == dtype
    assert teacher_calls["live"] > 0 and teacher_calls["cached"] == 0  # the live teacher idles for the cached one
    live, cached = _log(out, "live"), _log(out, "cached")
    assert [r["step"] for r in live] == [r["step"] for r in cached]
    keys = ("loss", "loss/hidden_mse", "loss/cross_entropy", "eval/perplexity")
    compared = 0
    for a, b in zip(live, cached, strict=True):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (key, a["step"])
                compared += 1
    assert compared >= 14 and any("eval/perplexity" in r for r in cached)  # held-out scores: perplexity only
    assert live[0]["loss/hidden_mse"] > 0
    if dtype == "int8":  # the compressed states: close, not the same numbers
        assert any(a.get("loss/hidden_mse") != b.get("loss/hidden_mse") for a, b in zip(live, cached))
    results = json.loads((out / "results.json").read_text())
    stored = results["teacher_cache"]["features"]
    assert stored["layers"] == [2, 4] and stored["bytes_per_token"] == 2 * (32 * 4 if dtype == "fp32" else 32 + 4)
    assert stored["max_error"] == 0.0 if dtype == "fp32" else stored["max_error"] > 0
    rows = {r["name"]: r for r in results["models"]}
    ppl = [rows[f"student / {n}"]["metrics"]["perplexity"] for n in ("live", "cached")]
    assert ppl[1] == pytest.approx(ppl[0], rel=rel)


def test_the_hint_from_the_cache_pulls_the_student_toward_the_teacher(tiny_setup, tmp_path):  # noqa: F811
    methods = [{"name": "hint", "teacher": "cache",
                "objective": [{"name": "hidden_mse", "weight": 1.0, "params": {"layers": "uniform",
                                                                               "projector": "identity"}}]}]
    out = tmp_path / "run"
    LLMKD().run(_fast(tiny_setup, methods, steps=12), out)
    losses = [r["loss/hidden_mse"] for r in _log(out, "hint") if "loss/hidden_mse" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_methods_without_cached_features_keep_their_cache_and_fingerprint(tiny_setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    kd = {"name": "kd", "objective": [FKL, CE]}
    LLMKD().run(_fast(tiny_setup, [kd]), out)
    plain = _manifest(out / "teacher_cache")
    assert "features" not in plain and "features" not in json.loads((out / "results.json").read_text())["teacher_cache"]
    record = (out / "kd" / "seed-0" / "subrun.json").read_text()
    # adding a cached hint method: the run's own cache gains the hidden states, the top-k shards are the same
    # bytes, and the finished kd sub-run is reused (its fingerprint ignores the hidden states' encoding)
    both = _fast(tiny_setup, [kd, {"name": "hint", "teacher": "cache", "objective": [CE, HINT]}])
    LLMKD().run(both, out, resume=True)
    rebuilt = _manifest(out / "teacher_cache")
    assert rebuilt["features"]["layers"] == [2, 4]
    assert [s["sha256"] for s in rebuilt["shards"]] == [s["sha256"] for s in plain["shards"]]
    assert (out / "kd" / "seed-0" / "subrun.json").read_text() == record
    bf16 = both.model_copy(update={"cache": both.cache.model_copy(update={"feature_dtype": "bf16"})})
    assert subrun_fingerprint(bf16, bf16.methods[0], 0) == subrun_fingerprint(both, both.methods[0], 0)
    assert subrun_fingerprint(bf16, bf16.methods[1], 0) != subrun_fingerprint(both, both.methods[1], 0)


def test_a_given_cache_dir_is_reused_with_the_layers_and_refused_without(tiny_setup, tmp_path):  # noqa: F811
    shared = tmp_path / "shared_cache"
    cache = {"k": 8, "batch_size": 4, "dir": str(shared)}
    LLMKD().run(_fast(tiny_setup, [{"name": "kd", "objective": [FKL, CE]}], cache=cache), tmp_path / "a")
    hint = {"name": "hint", "teacher": "cache", "objective": [CE, HINT]}
    out = tmp_path / "b"
    with pytest.raises(CacheError, match=r"stores no hidden states.*need layers \[2, 4\]") as err:
        LLMKD().run(_fast(tiny_setup, [hint], cache=cache), out)
    assert "cache.dir" in err.value.fix and "teacher: online" in err.value.fix
    assert not (out / "hint").exists()  # refused before training
    # a cache with the layers (here: built by a run of its own) serves a method needing a subset of them
    fresh = {**cache, "dir": str(tmp_path / "with_layers")}
    LLMKD().run(_fast(tiny_setup, [hint], cache=fresh), tmp_path / "c")
    before = (tmp_path / "with_layers" / "manifest.json").stat().st_mtime_ns
    last = {"name": "last", "teacher": "cache",
            "objective": [CE, {"name": "cka", "weight": 1.0, "params": {"layers": {2: 4}}}]}
    LLMKD().run(_fast(tiny_setup, [last], cache=fresh), tmp_path / "d")
    assert (tmp_path / "with_layers" / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(CacheError, match=r"layers \[2, 4\] \(int8\).*need layers \[4\] \(bf16\)"):
        LLMKD().run(_fast(tiny_setup, [last], cache={**fresh, "feature_dtype": "bf16"}), tmp_path / "e")


def test_an_ensemble_of_the_main_teacher_shares_the_cache_with_its_hidden_states(tiny_setup, tmp_path):  # noqa: F811
    methods = [{"name": "ens", "teacher": "ensemble", "ensemble": {"members": ["teacher"]}, "objective": [FKL, CE]},
               {"name": "hint", "teacher": "cache", "objective": [CE, HINT]}]
    out = tmp_path / "run"
    LLMKD().run(_fast(tiny_setup, methods), out)
    assert _manifest(out / "teacher_cache")["features"]["layers"] == [2, 4]
    assert {"ens", "hint"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize(("method", "cache", "match"), [
    ({"name": "m", "teacher": "cache", "objective": [{"name": "attention_kl", "weight": 1.0}]}, {},
     r"attention features; use teacher: online"),
    ({"name": "m", "teacher": "cache", "objective": [
        {"name": "hidden_mse", "weight": 1.0,
         "params": {"student_modules": ["model.layers.0"], "teacher_modules": ["model.layers.0"]}}]}, {},
     r"module outputs; use teacher: online"),
    ({"name": "m", "teacher": "cache", "objective": [HINT]}, {"tail_samples": 4},
     r"cache.tail_samples=4.*set cache.tail_samples: 0"),
])
def test_what_the_cache_cannot_hold_is_refused_at_validation(method, cache, match):
    with pytest.raises(ConfigError, match=match):
        validate(LLMKDConfig, {"methods": [method], "cache": cache})
    # the same terms with the live teacher are fine
    validate(LLMKDConfig, {"methods": [{**method, "teacher": "online"}], "cache": cache})


def test_the_dry_run_estimate_counts_the_hidden_states_the_run_writes(tiny_setup, tmp_path):  # noqa: F811
    from kdforge.preflight import llm_kd as preflight

    config = _fast(tiny_setup, [{"name": "hint", "teacher": "cache", "objective": [CE, HINT]}])
    est = preflight.estimate(config, tmp_path / "run", device="cpu")
    (item,) = [i for i in est.items if i.name == "teacher hidden states (cache)"]
    assert item.kind == "disk" and "layers [2, 4], int8" in item.note
    LLMKD().run(config, tmp_path / "run")
    written = sum(p.stat().st_size for p in (tmp_path / "run" / "teacher_cache").glob("features-*.kdf"))
    assert item.bytes == written == 8 * 2 * 16 * (32 + 4)  # rows x layers x tokens x (H + a float32 scale)
    plain = _fast(tiny_setup, [{"name": "kd", "objective": [FKL, CE]}])
    assert "teacher hidden states (cache)" not in {i.name for i in preflight.estimate(plain, tmp_path, device="cpu").items}
