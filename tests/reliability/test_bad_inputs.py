"""The bad-input corpus: every way a user can feed kdforge something wrong gets a clear error.

One table (:data:`CASES`). Each row says how to provoke a bad input through the public API or the
CLI, which :class:`~kdforge.errors.KdforgeError` subclass must come out (exactly that class), words
its ``problem`` must contain, words its ``fix`` must contain, and which files already on disk (a
previous results file, checkpoint, cache shard, download) must be byte-identical afterwards.

CLI rows are also run without ``--debug``: ``kdforge`` must return 2 and print
``kdforge: error: ... Fix: ...`` with no traceback.

docs/errors.md is the human-readable copy of this table; keep them in step.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdforge.io as kio
from kdforge.cli.main import main
from kdforge.errors import (
    AssetError,
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    DiskFullError,
    GenerationError,
    KdforgeError,
    NonFiniteError,
    ShapeError,
    VocabMismatchError,
)

from ._cases_os import OS_CASES
from ._cases_training import TRAINING_CASES
from ._corpus import (
    LLM_KD_OK,
    MLP,
    VOCAB,
    Case,
    Rows,
    Shared,
    TokenRows,
    World,
    _mkdir,
    cli_case,
    distiller,
    fill_disk,
    lm_distiller,
    run_yaml,
    tiny_llama,
    tiny_tokenizer,
)


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------
def _losses():
    from kdforge import losses

    return losses


def _sparse(ids: list[list[int]], vocab: int):
    from kdforge.losses import SparseTeacher

    ids_t = torch.tensor(ids)
    return SparseTeacher(ids_t, torch.full(ids_t.shape, -2.0), vocab)


def _case_checkpoint_truncated(w: World):
    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2, save_every=1, keep_last=2).train()
    newest = out / "checkpoints" / "step-2" / "student.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])
    keep = [out / "checkpoints" / "step-1", out / "checkpoints" / "step-2"]
    return (lambda: distiller(w, out=out, max_steps=3, save_every=1).train(resume=True)), keep


def _case_resume_other_config(w: World):
    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2).train()
    d = distiller(w, out=out, max_steps=3)
    d.config = d.config.model_copy(update={"batch_size": 3})
    return (lambda: d.train(resume=True)), [out / "checkpoints"]


def _case_resume_other_student(w: World):
    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2).train()
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    d = distiller(w, student=wider, out=out, max_steps=3)
    return (lambda: d.train(resume=True)), [out / "checkpoints"]


def _case_nan_student_mid_run(w: World):
    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2).train()
    broken = MLP()
    with torch.no_grad():
        broken.net[0].weight[0, 0] = float("nan")  # e.g. a diverged or badly loaded student
    d = distiller(w, student=broken, out=out, max_steps=4, save_every=2)
    return (lambda: d.train(resume=False)), [out / "checkpoints" / "step-2"]


def _case_disk_full_checkpoint(w: World):
    from kdforge.train import Callback

    class DiskFillsAfterStep3(Callback):
        def on_step_end(self, state: Any, logs: Any) -> None:
            if state.step == 3:
                fill_disk(w)

    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2).train()
    d = distiller(w, out=out, max_steps=4, save_every=2, callbacks=[DiskFillsAfterStep3()])
    return (lambda: d.train(resume=True)), [out / "checkpoints" / "step-2"]


def _case_disk_full_json(w: World):
    results = w.write("run/results.json", json.dumps({"accuracy": 0.91}) + "\n")

    def act():
        fill_disk(w)
        kio.write_json_atomic(results, {"accuracy": 0.12, "padding": "x" * 10_000})

    return act, [results.parent]


def _case_disk_full_cache(w: World, everywhere: bool = False):
    from kdforge.teachers import build_teacher_cache

    out = w.tmp / "cache"

    class Stop(Exception):
        pass

    def stop_after_first(index: int, entry: dict) -> None:
        raise Stop

    with pytest.raises(Stop):  # an interrupted build: shard 0 and its manifest are on disk
        build_teacher_cache(w.shared.teacher, w.shared.sequences, out, k=4, shard_size=4, batch_size=4,
                            on_shard=stop_after_first)
    keep = [out / "manifest.json", out / "shard-00000.kdc"]

    def act():
        fill_disk(w, everywhere=everywhere)
        try:
            build_teacher_cache(w.shared.teacher, w.shared.sequences, out, k=4, shard_size=4, batch_size=4)
        finally:
            assert not (out / ".build.lock").exists(), "a failed build must not leave its lock behind"

    return act, keep


def _case_cache_corrupt(w: World):
    from kdforge.teachers import TeacherCacheDataset

    path = w.cache_copy()
    shard = path / "shard-00001.kdc"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return (lambda: TeacherCacheDataset(path)), [path]


def _case_cache_truncated(w: World):
    from kdforge.teachers import TeacherCacheDataset

    path = w.cache_copy()
    shard = path / "shard-00001.kdc"
    shard.write_bytes(shard.read_bytes()[:-7])
    return (lambda: TeacherCacheDataset(path, verify=False)), [path]


def _case_cache_manifest_unreadable(w: World):
    from kdforge.teachers import TeacherCacheDataset

    path = w.cache_copy()
    (path / "manifest.json").write_text("{oops")
    return (lambda: TeacherCacheDataset(path)), [path]


def _case_cache_other_teacher(w: World):
    from kdforge.teachers import OnlineTeacher, TeacherCacheDataset

    path = w.cache_copy()
    other = OnlineTeacher(tiny_llama(seed=5))
    return (lambda: TeacherCacheDataset(path, teacher=other)), [path]


def _case_cache_other_tokenizer(w: World):
    from kdforge.teachers import TeacherCacheDataset

    path = w.cache_copy()
    other = tiny_tokenizer(extra=" Pemberley")
    return (lambda: TeacherCacheDataset(path, tokenizer=other)), [path]


def _case_cache_other_data(w: World):
    from kdforge.teachers import TeacherCacheDataset

    path = w.cache_copy()
    other = w.shared.sequences.clone()
    other[2, 3] = (other[2, 3] + 1) % VOCAB
    return (lambda: TeacherCacheDataset(path, other)), [path]


def _case_cache_rebuild_other_settings(w: World):
    from kdforge.teachers import build_teacher_cache

    path = w.cache_copy()
    return (lambda: build_teacher_cache(w.shared.teacher, w.shared.sequences, path, k=2, shard_size=4,
                                        tokenizer=w.shared.tokenizer)), [path]


def _case_cache_locked(w: World):
    import socket

    from kdforge.teachers import build_teacher_cache

    path = w.cache_copy()
    (path / ".build.lock").write_text(f"{socket.gethostname()}:{os.getpid()}")  # a live builder: us
    return (lambda: build_teacher_cache(w.shared.teacher, w.shared.sequences, path, k=4, shard_size=4)), [path]


def _case_cache_ids_outside_student_vocab(w: World):
    from kdforge.teachers import TeacherCacheDataset, collate_teacher_cache

    ds = TeacherCacheDataset(w.cache_copy())
    student = tiny_llama(vocab=VOCAB // 4, seed=1)  # 64 tokens; the cache holds ids up to 255
    return (lambda: _train_with_collate(w, student, ds, collate_teacher_cache)), []


def _train_with_collate(w: World, student: nn.Module, ds: Any, collate: Any) -> Any:
    from kdforge.train import CausalLMTask, Distiller, TrainConfig

    return Distiller(student, None, task=CausalLMTask(), objective=[{"name": "forward_kl", "weight": 1.0}],
                     config=TrainConfig(max_steps=1, batch_size=2, progress=False), train_data=ds,
                     collate_fn=collate).train()


def _case_train_vocab_mismatch(w: World):
    student = tiny_llama(vocab=VOCAB // 2, seed=1)
    data = TokenRows(vocab=VOCAB // 2)
    d = lm_distiller(w, student, w.shared.teacher, data, [{"name": "forward_kl", "weight": 1.0}])
    return d.train, []


def _case_train_too_long(w: World):
    student = tiny_llama(max_positions=8, seed=1)
    d = lm_distiller(w, student, None, TokenRows(length=12), [{"name": "cross_entropy", "weight": 1.0}])
    return d.train, []


def _case_teacher_meta(w: World):
    with torch.device("meta"):
        teacher = MLP()
    return (lambda: distiller(w, teacher=teacher, objective=[{"name": "forward_kl", "weight": 1.0}])), []


def _case_fmnist_interrupted(w: World):
    from kdforge.assets import fashion_mnist

    folder = w.tmp / "cache" / "fashion-mnist"
    done = folder / "train-images-idx3-ubyte.gz"  # downloaded by an earlier run
    done.parent.mkdir(parents=True)
    done.write_bytes(b"a finished earlier download")

    class Dropped:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            raise http.client.IncompleteRead(b"\x1f\x8b partial", 1000)

    w.mp.setattr(fashion_mnist.urllib.request, "urlopen", lambda url, timeout: Dropped())
    act = lambda: fashion_mnist.ensure(w.tmp / "cache", system_dir=w.tmp / "nowhere", allow_install=False)  # noqa: E731
    return act, [folder]


def _case_fmnist_partial(w: World):
    from kdforge.assets import fashion_mnist

    class Short:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"\x1f\x8b\x08\x00 the first bytes only"

    w.mp.setattr(fashion_mnist.urllib.request, "urlopen", lambda url, timeout: Short())
    act = lambda: fashion_mnist.ensure(w.tmp / "cache", system_dir=w.tmp / "nowhere", allow_install=False)  # noqa: E731
    return act, []


def _case_fmnist_truncated_gzip(w: World):
    import gzip

    from kdforge.data.vision import read_idx

    path = w.tmp / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))[:-12])
    return (lambda: read_idx(path)), [path]


def _case_austen_no_apt(w: World):
    from kdforge.assets import austen

    w.mp.setattr(austen.shutil, "which", lambda name: None)
    return (lambda: austen.ensure(w.tmp / "cache")), []


def _case_missing_api_key(w: World):
    from kdforge.elicit.backends.config import OpenAIConfig, build_backend

    w.mp.delenv("KDFORGE_TEST_NO_SUCH_KEY", raising=False)
    cfg = OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="KDFORGE_TEST_NO_SUCH_KEY")
    return (lambda: build_backend(cfg)), []


def _case_report_no_results(w: World):
    from kdforge.eval.report import load_run

    bad = w.write("run/results.json", "{not json")
    return (lambda: load_run(bad.parent)), [bad]


def _case_cache_too_long(w: World):
    from kdforge.teachers import OnlineTeacher, build_teacher_cache

    short = OnlineTeacher(tiny_llama(max_positions=8))
    return (lambda: build_teacher_cache(short, w.shared.sequences, w.tmp / "c", k=4)), []


def _case_cache_ids_outside_teacher_vocab(w: World):
    from kdforge.teachers import build_teacher_cache

    seqs = w.shared.sequences.clone()
    seqs[1, 2] = VOCAB + 44  # tokenised with a bigger tokenizer than the teacher's
    return (lambda: build_teacher_cache(w.shared.teacher, seqs, w.tmp / "c", k=4)), []


def _case_checkpoint_no_checksums(w: World):
    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2).train()
    (out / "checkpoints" / "step-2" / "checksums.json").unlink()
    return (lambda: distiller(w, out=out, max_steps=3).train(resume=True)), [out / "checkpoints"]


def _case_fmnist_env_incomplete(w: World):
    from kdforge.assets import fashion_mnist

    folder = _mkdir(w.tmp / "fm")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    w.mp.setenv(fashion_mnist.ENV_VAR, str(folder))
    return (lambda: fashion_mnist.ensure(w.tmp / "cache")), [folder]


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sft_data(w: World) -> str:
    return str(w.write("sft.jsonl", json.dumps({"prompt": "Say hi.", "text": "Hi."}) + "\n"))


CASES: list[Case] = [
    # ---- recipe / config files (through `kdforge run`) -------------------------------------
    cli_case("config-unknown-top-key", "config", ConfigError, ("unknown key", "epochz"), ("edit the keys",),
             run_yaml(LLM_KD_OK + "epochz: 3\n")),
    cli_case("config-unknown-nested-key", "config", ConfigError, ("train.lrr", "did you mean 'lr'"),
             ("edit the keys",), run_yaml(LLM_KD_OK + "train: {lrr: 0.1}\n")),
    cli_case("config-wrong-type", "config", ConfigError, ("train.lr", "valid number", "fast"), ("edit the keys",),
             run_yaml(LLM_KD_OK + "train: {lr: fast}\n")),
    cli_case("config-bad-enum", "config", ConfigError, ("train.scheduler", "exponential"), ("edit the keys",),
             run_yaml(LLM_KD_OK + "train: {scheduler: exponential}\n")),
    cli_case("config-missing-recipe-key", "config", ConfigError, ("missing top-level key 'recipe'",),
             ("recipe:", "llm_kd"), run_yaml("output_dir: out\n")),
    cli_case("config-unknown-recipe", "config", ConfigError, ("llm_kdd",), ("did you mean 'llm_kd'", "fashion_mnist_kd", "pgkd"),
             run_yaml("recipe: llm_kdd\n")),
    cli_case("config-yaml-syntax", "config", ConfigError, ("not valid yaml",), ("yaml syntax",),
             run_yaml("recipe: llm_kd\ntrain: {lr: 0.1\n")),
    cli_case("config-not-a-mapping", "config", ConfigError, ("mapping", "list"), ("key: value",),
             run_yaml("- recipe: llm_kd\n")),
    cli_case("config-set-without-equals", "config", ConfigError, ("train.lr", "key=value"), ("--set",),
             run_yaml(LLM_KD_OK, "--set", "train.lr")),
    cli_case("config-set-into-a-list", "config", ConfigError, ("seeds", "is a list", "index"), ("key path",),
             run_yaml(LLM_KD_OK + "seeds: [0]\n", "--set", "seeds.first=1")),
    cli_case("config-file-missing", "config", ConfigError, ("not found",), ("check the path",),
             lambda w: (["run", str(w.tmp / "nope.yaml")], [])),
    cli_case("config-empty-method-list", "config", ConfigError, ("methods",), ("edit the keys",),
             run_yaml(LLM_KD_OK + "methods: []\n")),
    cli_case("config-unknown-loss-in-recipe", "config", ConfigError,
             ("methods.0.objective.0", "unknown loss 'foward_kl'", "did you mean 'forward_kl'"), ("edit the keys",),
             run_yaml(LLM_KD_OK + "methods:\n  - name: kd\n    objective: [{name: foward_kl, weight: 1.0}]\n")),
    cli_case("config-unknown-loss-param-in-recipe", "config", ConfigError,
             ("methods.0.objective.0", "no parameter 'temprature'", "did you mean 'temperature'"), ("edit the keys",),
             run_yaml(LLM_KD_OK + "methods:\n  - name: kd\n    objective:\n"
                                  "      - {name: forward_kl, weight: 1.0, params: {temprature: 2.0}}\n")),
    cli_case("config-negative-loss-weight-in-recipe", "config", ConfigError,
             ("methods.0.objective.0.weight", "greater than or equal to 0"), ("edit the keys",),
             run_yaml(LLM_KD_OK + "methods:\n  - name: kd\n    objective: [{name: forward_kl, weight: -1.0}]\n")),
    cli_case("config-cache-teacher-unknown-key", "config", ConfigError, ("unknown key", "kk"), ("edit the keys",),
             lambda w: (["cache-teacher", str(w.write("c.yaml", "teacher: {name_or_path: t}\ncorpus: {path: c.txt}\n"
                                                                "output_dir: o\nkk: 3\n"))], [])),
    cli_case("elicit-bad-backend-name", "elicitation", ConfigError, ("backend", "openaii"), ("edit the keys",),
             lambda w: (["generate", str(w.write("g.yaml", "task: generate\nbackend: {type: openaii, model: m}\n"
                                                           "data: {path: x.jsonl}\n")), "--dry-run"], [])),
    cli_case("elicit-server-unreachable", "elicitation", GenerationError, ("failed", "http://127.0.0.1:"),
             ("rerun the same command",),
             lambda w: (["generate", str(w.write("g.yaml", "task: generate\noutput_dir: gen\n"
                                                           "backend: {type: openai, model: m, base_url: "
                                                           f"'http://127.0.0.1:{_closed_port()}/v1', max_retries: 0}}\n"
                                                           "data: {path: x.jsonl}\nprompt: {template: '{text}'}\n"
                                                           "output: {on_error: raise}\n")),
                         "--no-progress"], [w.write("x.jsonl", '{"id": 1, "text": "hi"}\n')])),
    Case("elicit-missing-api-key", "elicitation", ConfigError, ("kdforge_test_no_such_key", "not set"),
         ("export kdforge_test_no_such_key",), _case_missing_api_key),
    # ---- losses -----------------------------------------------------------------------------
    Case("loss-vocab-mismatch", "losses", VocabMismatchError, ("49216", "49152"), ("slice",),
         lambda w: ((lambda: _losses().forward_kl(torch.randn(2, 49152), torch.randn(2, 49216))), [])),
    Case("loss-position-mismatch", "losses", ShapeError, ("positions",), ("same",),
         lambda w: ((lambda: _losses().reverse_kl(torch.randn(2, 5, 10), torch.randn(2, 6, 10))), [])),
    Case("loss-mask-shape", "losses", ShapeError, ("mask",), ("mask",),
         lambda w: ((lambda: _losses().forward_kl(torch.randn(2, 5, 10), torch.randn(2, 5, 10),
                                                   mask=torch.ones(2, 4, dtype=torch.bool))), [])),
    Case("loss-nan-student-logits", "losses", NonFiniteError, ("student logits", "nan"), ("learning rate",),
         lambda w: ((lambda: _losses().forward_kl(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2))), [])),
    Case("loss-inf-teacher-logits", "losses", NonFiniteError, ("teacher", "inf"), ("teacher",),
         lambda w: ((lambda: _losses().generalized_jsd(torch.zeros(1, 3),
                                                        torch.tensor([[0.0, float("inf"), 1.0]]))), [])),
    Case("loss-zero-temperature", "losses", ConfigError, ("temperature",), ("1.0",),
         lambda w: ((lambda: _losses().forward_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=0.0)), [])),
    Case("loss-beta-out-of-range", "losses", ConfigError, ("beta",), ("beta", "range"),
         lambda w: ((lambda: _losses().generalized_jsd(torch.randn(2, 5), torch.randn(2, 5), beta=1.5)), [])),
    Case("loss-bad-reduction", "losses", ConfigError, ("avg",), ("mean",),
         lambda w: ((lambda: _losses().forward_kl(torch.randn(2, 5), torch.randn(2, 5), reduction="avg")), [])),
    Case("loss-sparse-ids-out-of-range", "losses", ShapeError, ("outside [0, 5)",), ("rebuild",),
         lambda w: ((lambda: _losses().forward_kl(torch.randn(1, 5), _sparse([[0, 9]], 5))), [])),
    Case("loss-sparse-logprobs-nan", "losses", NonFiniteError, ("sparse teacher log-probs", "nan"), ("teacher",),
         lambda w: ((lambda: _losses().forward_kl(torch.randn(2, 5), _losses().SparseTeacher(
             torch.tensor([[0, 1], [1, 2]]), torch.tensor([[float("nan"), -1.0], [-1.0, -2.0]]), 5))), [])),
    Case("loss-dkd-without-labels", "losses", ShapeError, ("dkd needs labels",), ("labels=",),
         lambda w: ((lambda: _losses().dkd(torch.randn(2, 5), torch.randn(2, 5))), [])),
    Case("loss-labels-shape", "losses", ShapeError, ("labels has shape (2, 4)", "(2, 3)"), ("aligned with the logits",),
         lambda w: ((lambda: _losses().cross_entropy(torch.randn(2, 3, 5), None,
                                                      labels=torch.zeros(2, 4, dtype=torch.long))), [])),
    Case("loss-taid-t-out-of-range", "losses", ConfigError, ("t must lie in [0, 1]", "2.0"), ("inside that range",),
         lambda w: ((lambda: _losses().taid(torch.randn(2, 5), torch.randn(2, 5), t=2.0)), [])),
    Case("loss-unknown-name", "losses", ConfigError, ("foward_kl",), ("did you mean 'forward_kl'",),
         lambda w: ((lambda: _losses().LOSSES.get("foward_kl")), [])),
    Case("loss-empty-objective", "losses", ConfigError, ("no loss terms",), ("forward_kl",),
         lambda w: ((lambda: __import__("kdforge.train", fromlist=["Objective"]).Objective([])), [])),
    Case("loss-integer-logits", "losses", ShapeError, ("float",), ("logits",),
         lambda w: ((lambda: _losses().forward_kl(torch.randint(0, 5, (2, 5)), torch.randn(2, 5))), [])),
    # ---- trainer ----------------------------------------------------------------------------
    Case("train-no-trainable-params", "trainer", ConfigError, ("no trainable parameters",), ("unfreeze",),
         lambda w: ((lambda: distiller(w, student=MLP().requires_grad_(False))), [])),
    Case("train-empty-dataset", "trainer", DataError, ("dataset is empty",), ("at least one example",),
         lambda w: ((lambda: distiller(w, data=[])), [])),
    Case("train-iterable-dataset", "trainer", DataError, ("map-style",), ("wrap",),
         lambda w: ((lambda: distiller(w, data=iter(Rows()))), [])),
    Case("train-kd-without-teacher", "trainer", ConfigError, ("needs a teacher signal",), ("teacher",),
         lambda w: ((lambda: distiller(w, objective=[{"name": "forward_kl", "weight": 1.0}]).train()), [])),
    Case("train-truncated-checkpoint", "trainer", CheckpointError, ("step-2", "checksum"), ("delete",),
         _case_checkpoint_truncated),
    Case("train-resume-other-config", "trainer", CheckpointError, ("batch_size",), ("output",),
         _case_resume_other_config),
    Case("train-nan-student", "trainer", NonFiniteError, ("student logits", "nan"), ("learning rate",),
         _case_nan_student_mid_run),
    Case("train-resume-other-student", "trainer", CheckpointError, ("step-2", "does not fit", "missing key"),
         ("same student architecture",), _case_resume_other_student),
    Case("train-teacher-student-vocab-mismatch", "trainer", VocabMismatchError, ("256", "128"), ("tokenizer",),
         _case_train_vocab_mismatch),
    Case("train-sequence-longer-than-model", "trainer", ShapeError, ("12 tokens", "max_position_embeddings=8"),
         ("seq_len",), _case_train_too_long),
    Case("train-teacher-on-meta-device", "trainer", DeviceError, ("meta",), ("load",), _case_teacher_meta),
    Case("train-checkpoint-without-checksums", "trainer", CheckpointError, ("step-2", "incomplete or corrupted"),
         ("delete",), _case_checkpoint_no_checksums),
    Case("teacher-on-a-device-that-does-not-exist", "trainer", DeviceError, ("cuda:99",), ("device exists",),
         lambda w: ((lambda: __import__("kdforge.teachers", fromlist=["x"]).OnlineTeacher(
             tiny_llama(), device="cuda:99")), [])),
    Case("teacher-unknown-dtype", "trainer", ConfigError, ("fp13",), ("bfloat16",),
         lambda w: ((lambda: __import__("kdforge.teachers", fromlist=["x"]).OnlineTeacher(
             tiny_llama(), dtype="fp13")), [])),
    cli_case("make-student-missing-teacher", "trainer", AssetError, ("no-such-model", "hub id"),
             ("offline asset",), lambda w: (["make-student", "no-such-model", str(w.tmp / "s"), "--num-layers", "1"],
                                             [])),
    cli_case("sft-missing-student", "trainer", AssetError, ("no-such-model", "hub id"), ("offline asset",),
             lambda w: (["sft", _sft_data(w), "--student", "no-such-model", "-o", str(w.tmp / "o")], [])),
    cli_case("sft-missing-data", "data", DataError, ("not found", "missing.jsonl"), ("data.path",),
             lambda w: (["sft", str(w.tmp / "missing.jsonl"), "--student", "x", "-o", str(w.tmp / "o")], [])),
    Case("train-cached-ids-outside-student-vocab", "trainer", VocabMismatchError, ("outside", "64"),
         ("tokenizer",), _case_cache_ids_outside_student_vocab),
    # ---- teacher caches ---------------------------------------------------------------------
    Case("cache-missing-folder", "caches", CacheError, ("no teacher cache", "manifest.json is missing"), ("cache-teacher",),
         lambda w: ((lambda: __import__("kdforge.teachers", fromlist=["x"]).TeacherCacheDataset(w.tmp / "none")),
                    [])),
    Case("cache-corrupted-shard", "caches", CacheError, ("shard-00001.kdc", "corrupted"), ("rebuild",),
         _case_cache_corrupt),
    Case("cache-truncated-shard", "caches", CacheError, ("shard-00001.kdc", "truncated"), ("rebuild",),
         _case_cache_truncated),
    Case("cache-manifest-unreadable", "caches", CacheError, ("manifest.json is unreadable",), ("rebuild",),
         _case_cache_manifest_unreadable),
    Case("cache-other-teacher", "caches", CacheError, ("another teacher",), ("rebuild",), _case_cache_other_teacher),
    Case("cache-other-tokenizer", "caches", CacheError, ("another tokenizer",), ("rebuild",),
         _case_cache_other_tokenizer),
    Case("cache-other-data", "caches", CacheError, ("other token sequences",), ("rebuild",), _case_cache_other_data),
    Case("cache-rebuild-with-other-settings", "caches", CacheError, ("differs in: k",), ("overwrite",),
         _case_cache_rebuild_other_settings),
    Case("cache-sequences-longer-than-teacher", "caches", ShapeError, ("16 tokens", "max_position_embeddings=8"),
         ("seq_len",), _case_cache_too_long),
    Case("cache-ids-outside-teacher-vocab", "caches", VocabMismatchError, ("token id 300", "256"), ("tokenizer",),
         _case_cache_ids_outside_teacher_vocab),
    Case("cache-concurrent-build", "caches", CacheError, ("another build",), ("wait",), _case_cache_locked),
    # ---- data -------------------------------------------------------------------------------
    Case("data-missing-corpus", "data", DataError, ("corpus not found",), ("corpus.path",),
         lambda w: ((lambda: _read_texts(w.tmp / "missing.jsonl")), [])),
    Case("data-unsupported-format", "data", DataError, ("unknown corpus format", "parquet"), ("jsonl",),
         lambda w: ((lambda: _read_texts(w.write("c.txt", "hello"), fmt="parquet")), [])),
    Case("data-bad-jsonl-line", "data", DataError, ("c.jsonl:2", "not valid json"), ("one json object per line",),
         lambda w: ((lambda: _read_texts(w.write("c.jsonl", '{"text": "a"}\n{oops\n'))), [])),
    Case("data-missing-text-field", "data", DataError, ("no 'text' field",), ("text_field",),
         lambda w: ((lambda: _read_texts(w.write("c.jsonl", '{"body": "a"}\n'))), [])),
    Case("data-empty-corpus-folder", "data", DataError, ("no .txt files",), ("text file",),
         lambda w: ((lambda: _read_texts(_mkdir(w.tmp / "empty"))), [])),
    Case("data-empty-corpus", "data", DataError, ("0 tokens", "seq_len=8"), ("more text",),
         lambda w: ((lambda: __import__("kdforge.data.text", fromlist=["x"]).pack_tokens(
             [], w.shared.tokenizer, 8)), [])),
    Case("data-no-sequences", "data", DataError, ("[num_sequences, seq_len]", "(0,)"), ("pack",),
         lambda w: ((lambda: __import__("kdforge.teachers", fromlist=["x"]).build_teacher_cache(
             w.shared.teacher, [], w.tmp / "c", k=4)), [])),
    Case("data-ragged-sequences", "data", DataError, ("fixed-length",), ("pack",),
         lambda w: ((lambda: __import__("kdforge.teachers", fromlist=["x"]).build_teacher_cache(
             w.shared.teacher, [[1, 2, 3], [4, 5]], w.tmp / "c", k=4)), [])),
    Case("data-recipe-corpus-without-texts", "data", DataError, ("no .txt files",), ("text file per document",),
         lambda w: ((lambda: __import__("kdforge.recipes.llm_kd", fromlist=["x"]).load_documents(
             str(_mkdir(w.tmp / "corpus")))), [])),
    Case("data-truncated-gzip-idx", "data", DataError, ("corrupt gzip",), ("download or install it again",),
         _case_fmnist_truncated_gzip),
    # ---- assets -----------------------------------------------------------------------------
    cli_case("asset-unknown-name", "assets", AssetError, ("unknown asset", "smollm3"), ("smollm2",),
             lambda w: (["assets", "fetch", "smollm3"], [])),
    Case("asset-interrupted-download", "assets", AssetError, ("fashion-mnist not found", "incompleteread"),
         ("apt-get install",), _case_fmnist_interrupted),
    Case("asset-partial-download", "assets", AssetError, ("md5",), ("apt-get install",), _case_fmnist_partial),
    Case("asset-env-folder-incomplete", "assets", AssetError, ("kdforge_fashion_mnist_dir", "lacks"), ("unset it",),
         _case_fmnist_env_incomplete),
    Case("asset-no-apt", "assets", AssetError, ("apt-get is not available",), ("apt-get download",),
         _case_austen_no_apt),
    # ---- disk full --------------------------------------------------------------------------
    Case("disk-full-json", "disk", DiskFullError, ("disk full", "results.json", "intact"), ("free disk space",),
         _case_disk_full_json),
    Case("disk-full-cache-shard", "disk", DiskFullError, ("disk full", "shard-00001.kdc"), ("free disk space",),
         _case_disk_full_cache),
    Case("disk-full-cache-build-lock", "disk", DiskFullError, ("disk full", ".build.lock", "intact"),
         ("free disk space",), lambda w: _case_disk_full_cache(w, everywhere=True)),
    Case("disk-full-checkpoint", "disk", DiskFullError, ("disk full", "step-4"), ("free disk space",),
         _case_disk_full_checkpoint),
    # ---- eval / report ----------------------------------------------------------------------
    cli_case("report-missing-run-folder", "eval", DataError, ("does not exist",), ("kdforge run",),
             lambda w: (["report", str(w.tmp / "no-run")], [])),
    cli_case("report-run-without-results", "eval", DataError, ("neither results.json",), ("run",),
             lambda w: (["report", str(_mkdir(w.tmp / "run"))], [])),
    cli_case("eval-missing-data", "eval", DataError, ("missing.jsonl", "does not exist"), ("existing",),
             lambda w: (["eval", "--student", str(w.shared.model_dir), "--data", str(w.tmp / "missing.jsonl"),
                         "--no-cost"], [])),
    cli_case("eval-empty-data", "eval", DataError, ("fewer than 2 tokens",), ("more evaluation text",),
             lambda w: (["eval", "--student", str(w.shared.model_dir), "--data",
                         str(w.write("empty.jsonl", '{"text": ""}\n')), "--no-cost"], [])),
    cli_case("report-results-wrong-shape", "eval", DataError, ("no 'models' list",), ("run-format.md",),
             lambda w: (["report", str(w.write("run/results.json", "[1, 2]\n").parent)], [])),
    Case("report-results-not-json", "eval", DataError, ("not valid json",), ("re-run",),
         _case_report_no_results),
    *OS_CASES,
    *TRAINING_CASES,
]


def _read_texts(path: Path, **kw: Any) -> list[str]:
    from kdforge.teachers.cache import read_texts

    return read_texts(path, **kw)


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------
def _snapshot(paths: list[Path]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    return Shared(tmp_path_factory.mktemp("shared"))


def test_the_corpus_has_distinct_cases_over_every_area():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 120
    assert {c.area for c in CASES} >= {"config", "losses", "trainer", "caches", "data", "assets", "disk",
                                       "elicitation", "eval", "os", "noop", "nonfinite"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_its_error_naming_problem_and_fix_and_keeps_outputs(case, shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    act, keep = case.setup(World(tmp_path, monkeypatch, shared))
    before = _snapshot(keep)
    assert before or not keep, "a protected output must exist before the bad input"
    with pytest.raises(KdforgeError) as info:
        act()
    err = info.value
    assert type(err) is case.error, f"{type(err).__name__}: {err}"
    problem, fix = err.problem.lower(), (err.fix or "").lower()
    for word in case.problem:
        assert word in problem, f"problem lacks {word!r}: {err.problem}"
    assert fix, f"no fix given: {err}"
    for word in case.fix:
        assert word in fix, f"fix lacks {word!r}: {err.fix}"
    assert _snapshot(keep) == before, "pre-existing outputs changed"
    for p in keep:
        folder = p if p.is_dir() else p.parent
        assert not list(folder.glob(".*.tmp")), f"temporary files left in {folder}"


CLI_CASES = [c for c in CASES if c.cli]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_prints_the_error_without_traceback_and_exits_2(case, shared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    world = World(tmp_path, monkeypatch, shared)
    case.setup(world)
    capsys.readouterr()
    assert main(world.argv) == 2
    err = capsys.readouterr().err
    message = err[err.index("kdforge: error: "):]  # log lines may come first
    assert "\n  Fix: " in message, err
    assert "Traceback" not in err
