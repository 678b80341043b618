"""kdforge.models (one loader for teacher and student) and kdforge.students.build (the three kinds).

Every path of the loader: a local folder, an offline asset, a Hub id (intercepted
``from_pretrained``: revision, trust_remote_code, token, dtype, attn_implementation are passed
through; offline: a fast AssetError), and each bad input with the error that names its fix.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tests.recipes import _byo

import kdforge.models as models
from kdforge.errors import AssetError, ConfigError, DeviceError, VocabMismatchError
from kdforge.models import ModelSource, check_source, classify_model_name, load_model
from kdforge.students.build import LoraSpec, StudentSpec, build_student, check_student, merged


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return _byo.teacher_and_student(tmp_path_factory.mktemp("models"))


# --------------------------------------------------------------------------------------------- names
def test_classify_asset_folder_hub_and_missing(folders, monkeypatch):
    teacher, _ = folders
    assert classify_model_name("smollm2") == "asset"
    assert classify_model_name(str(teacher)) == "local"
    assert classify_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    for missing in ("./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c"):
        with pytest.raises(AssetError, match="no such folder") as exc:
            classify_model_name(missing)
        assert "save_pretrained" in exc.value.fix


def test_local_folder_loads_frozen_teacher_and_tokenizer(folders):
    teacher, _ = folders
    model, tok = load_model(ModelSource(model=str(teacher), device="cpu"), role="teacher")
    assert model.config.num_hidden_layers == 4 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.chat_template == _byo.CHAT_TEMPLATE
    student, _ = load_model(ModelSource(model=str(teacher), dtype="bfloat16"), role="student")
    assert next(student.parameters()).dtype == torch.bfloat16
    assert all(p.requires_grad for p in student.parameters())  # a student is not frozen


def test_asset_name_resolves_through_kdforge_assets(folders, monkeypatch):
    teacher, _ = folders
    import kdforge.assets

    asked = []
    monkeypatch.setattr(kdforge.assets, "ensure", lambda name, cache_dir=None: asked.append(name) or teacher)
    model, _ = load_model(ModelSource(model="smollm2"), role="teacher")
    assert asked and set(asked) == {"smollm2"} and model.config.hidden_size == 32


class _Recorder:
    """Stands in for ``from_pretrained``: records the call, returns a model/tokenizer loaded beforehand."""

    def __init__(self, real_folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.calls: list[tuple[str, dict]] = []
        self._model = AutoModelForCausalLM.from_pretrained(real_folder)
        self._tokenizer = AutoTokenizer.from_pretrained(real_folder)

    def model(self, path, **kwargs):
        self.calls.append((path, kwargs))
        return self._model

    def tokenizer(self, path, **kwargs):
        self.calls.append((path, kwargs))
        return self._tokenizer


def test_hub_id_passes_revision_remote_code_token_through(folders, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, _ = folders
    rec = _Recorder(teacher)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", rec.model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", rec.tokenizer)
    monkeypatch.setattr(models, "_hub_ready", lambda source, kwargs, what: kwargs)  # "the Hub answers"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    source = ModelSource(model="org/model", revision="abc123", trust_remote_code=True, dtype="bfloat16",
                         attn_implementation="eager", device="cpu")
    load_model(source, role="teacher")
    (tok_path, tok_kw), (model_path, model_kw) = rec.calls
    assert tok_path == model_path == "org/model"
    for kw in (tok_kw, model_kw):
        assert kw["revision"] == "abc123" and kw["trust_remote_code"] is True and kw["token"] == "hf_secret"
    assert model_kw["dtype"] == torch.bfloat16 and model_kw["attn_implementation"] == "eager"
    assert "device_map" not in model_kw


def test_hub_id_offline_fails_at_once_naming_the_fix(monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("from_pretrained must not be tried offline"))
    with pytest.raises(AssetError, match="HF_HUB_OFFLINE") as exc:
        load_model(ModelSource(model="someone/not-a-cached-model-kdforge"), role="teacher")
    assert "folder" in exc.value.fix
    with pytest.raises(AssetError, match="cannot be reached"):
        check_source(ModelSource(model="someone/not-a-cached-model-kdforge"))


def test_bad_sources(folders, tmp_path, monkeypatch):
    teacher, _ = folders
    with pytest.raises(ConfigError, match="revision"):
        load_model(ModelSource(model=str(teacher), revision="main"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="no config.json"):
        check_source(ModelSource(model=str(tmp_path / "empty")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="device_map") as exc:
        check_source(ModelSource(model=str(teacher), device_map="auto"))
    assert "remove device_map" in exc.value.fix
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        load_model(ModelSource(model=str(teacher), device="cuda:0"))
    assert models.resolve_device("auto").type in ("cpu", "mps")


# --------------------------------------------------------------------------------------------- students
def _teacher(folders):
    model, tok = load_model(ModelSource(model=str(folders[0])), role="teacher")
    return model, tok


def test_pretrained_student_is_the_other_model(folders):
    teacher, tok = _teacher(folders)
    spec = StudentSpec(kind="pretrained", model=str(folders[1]))
    check_student(spec, ModelSource(model=str(folders[0])), tok)
    student = build_student(spec, teacher, tok)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 16
    assert all(p.requires_grad for p in student.parameters())  # nothing frozen by default for pretrained


def test_from_teacher_stays_the_default_cut(folders):
    teacher, tok = _teacher(folders)
    student = build_student(StudentSpec(num_layers=2), teacher, tok)
    assert student.config.kdforge_source_layers == [0, 3]
    assert not student.get_input_embeddings().weight.requires_grad  # frozen by default, as before


def test_from_config_width_depth_and_seed(folders):
    teacher, tok = _teacher(folders)
    spec = StudentSpec(kind="from_config", hidden_size=16, num_layers=2, init_seed=3)
    a, b = build_student(spec, teacher, tok), build_student(spec, teacher, tok)
    assert (a.config.hidden_size, a.config.num_hidden_layers, a.config.vocab_size) == (16, 2, teacher.config.vocab_size)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_student(spec.model_copy(update={"init_seed": 4}), teacher, tok)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_vocabularies_that_do_not_align(folders, tmp_path):
    teacher, tok = _teacher(folders)
    # a tokenizer whose ids mean other words
    other = _byo.tokenizer()
    vocab = other.get_vocab()
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    shuffled = {w: (len(vocab) - 1 - i) for w, i in vocab.items()}
    raw = Tokenizer(tmodels.WordLevel(shuffled, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    bad_tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
    _byo.llama(tmp_path / "alien", hidden=16, layers=2, seed=2, tok=bad_tok)
    spec = StudentSpec(kind="pretrained", model=str(tmp_path / "alien"))
    with pytest.raises(VocabMismatchError, match="tokenizers differ") as exc:
        check_student(spec, ModelSource(model=str(folders[0])), tok)
    assert "cross_tokenizer_kd" in exc.value.fix  # the recipe a YAML user can switch to
    # a tokenizer that extends the teacher's: only with shared_prefix
    _byo.llama(tmp_path / "extended", hidden=16, layers=2, seed=2, tok=_byo.tokenizer(extra_words=5))
    spec = StudentSpec(kind="pretrained", model=str(tmp_path / "extended"))
    with pytest.raises(VocabMismatchError) as exc:
        check_student(spec, ModelSource(model=str(folders[0])), tok)
    assert "shared_prefix" in exc.value.fix
    ok = spec.model_copy(update={"vocab_policy": "shared_prefix"})
    check_student(ok, ModelSource(model=str(folders[0])), tok)
    assert build_student(ok, teacher, tok).config.vocab_size == len(tok) + 5
    # same tokenizer, embeddings padded to another width: exact refuses, shared_prefix accepts
    _byo.llama(tmp_path / "padded", hidden=16, layers=2, seed=2, tok=_byo.tokenizer(), vocab_size=80)
    padded = StudentSpec(kind="pretrained", model=str(tmp_path / "padded"))
    with pytest.raises(VocabMismatchError, match="padded differently"):
        check_student(padded, ModelSource(model=str(folders[0])), tok)
    check_student(padded.model_copy(update={"vocab_policy": "shared_prefix"}), ModelSource(model=str(folders[0])), tok)


def test_lora_without_peft_is_a_clear_error(folders, monkeypatch):
    teacher, tok = _teacher(folders)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    spec = StudentSpec(lora=LoraSpec(r=2))
    with pytest.raises(ConfigError, match="peft") as exc:
        check_student(spec, ModelSource(model=str(folders[0])), tok)
    assert "kdforge[lora]" in exc.value.fix


def test_lora_student_trains_only_the_adapter_and_merges(folders, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    teacher, tok = _teacher(folders)
    student = build_student(StudentSpec(kind="pretrained", model=str(folders[1]), lora=LoraSpec(r=2)), teacher, tok)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapter so merging changes the weights
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    ids = torch.tensor([[3, 10, 11, 12]])
    expected = student(input_ids=ids).logits
    merged(student).save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_is_switched_on(folders):
    teacher, tok = _teacher(folders)
    student = build_student(StudentSpec(kind="pretrained", model=str(folders[1]), gradient_checkpointing=True),
                            teacher, tok)
    flag = getattr(student, "is_activation_checkpointing", None)
    assert flag if flag is not None else student.is_gradient_checkpointing


def test_student_keys_must_match_the_kind():
    from kdforge.config import validate

    with pytest.raises(ConfigError, match="layers do"):
        validate(StudentSpec, {"kind": "pretrained", "model": "x/y", "layers": "first_last"})
    with pytest.raises(ConfigError, match="needs model"):
        validate(StudentSpec, {"kind": "pretrained"})
    with pytest.raises(ConfigError, match="hidden_size"):
        validate(StudentSpec, {"hidden_size": 64})


@pytest.mark.gpu
def test_teacher_lands_on_the_gpu_in_bf16_and_a_run_uses_it(folders, tmp_path):
    from kdforge.config import validate
    from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig

    model, _ = load_model(ModelSource(model=str(folders[0]), dtype="bfloat16"), role="teacher")
    param = next(model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
    _byo.chat_jsonl(tmp_path / "chats.jsonl", rows=12)
    config = validate(LLMKDConfig, {
        "teacher": {"model": str(folders[0]), "dtype": "bfloat16"},
        "student": {"kind": "pretrained", "model": str(folders[1])},
        "data": {"path": str(tmp_path / "chats.jsonl"), "eval_fraction": 0.25},
        "cache": {"k": 8}, "train": {"max_steps": 2, "batch_size": 4, "progress": False},
        "eval": {"batch_size": 4, "during_training_sequences": 0, "speed_batch": 2, "speed_repeats": 1},
        "methods": [{"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0}]},
                    {"name": "kd online", "teacher": "online", "objective": [{"name": "forward_kl", "weight": 1.0}]}],
        "plot": False, "save_students": False})
    results = LLMKD().run(config, tmp_path / "run")
    assert all(r["metrics"].get("perplexity", 1.0) == r["metrics"].get("perplexity", 1.0) for r in results["models"])
