"""vLLM generation for on-policy KD (kdforge.train.vllm_generation), against a fake ``vllm`` module.

The fake records every engine it starts, every weight push and every generation request, and
answers with deterministic completions, so the tests prove: weights are pushed exactly when the
student changed (once per optimizer step, every ``sync_every`` steps, never for a frozen model),
only trainable tensors with Hugging Face names, engine dtype, tied weights once; requests carry
the sampling parameters; completions are handled like HFGenerator's. The real-vLLM test at the
end needs a GPU and vllm (marked ``gpu``).
"""

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from kdforge.errors import ConfigError, DeviceError
from kdforge.train import CausalLMTask, Distiller, LossTerm, OnPolicyConfig, TrainConfig
from kdforge.train.onpolicy import OnPolicyBatcher, VLLMSettings, make_generator
from kdforge.train.vllm_generation import (
    VLLMGenerator,
    _clean_name,
    iter_sync_tensors,
    unwrap_model,
)

from ._tiny import TokenDataset, pad_collate, tiny_llama

EOS = 2


class FakeEngineModel(torch.nn.Module):
    """The engine-side model: keeps the last tensor pushed under each name."""

    def __init__(self, snapshot: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives load targets a device
        self.weights = dict(snapshot)
        self.pushes: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []

    def load_weights(self, weights):
        batch = []
        for name, t in weights:
            self.weights[name] = t.detach().clone()
            batch.append((name, tuple(t.shape), t.dtype))
        self.pushes.append(batch)


class FakeLLM:
    instances: list["FakeLLM"] = []
    in_process = True
    on_generate = None  # test hook: f(llm) called before each generation

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        path = Path(kwargs["model"])
        assert (path / "config.json").is_file()
        self.model = FakeEngineModel(load_file(path / "model.safetensors"))
        self.requests: list[tuple[list[list[int]], object]] = []
        self.prefix_resets = 0
        self.rpc_calls = 0
        self.events: list[str] = []
        if self.in_process:
            runner = SimpleNamespace(model=self.model)
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
                model_runner=runner)))
        FakeLLM.instances.append(self)

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        if FakeLLM.on_generate is not None:
            FakeLLM.on_generate(self)
        self.requests.append(([r["prompt_token_ids"] for r in requests], sampling_params))
        self.events.append("generate")
        # deterministic: continue with last+1, last+2, then EOS, then junk after EOS
        outs = []
        for r in requests:
            last = r["prompt_token_ids"][-1]
            ids = [(last + 1) % 60 + 3, (last + 2) % 60 + 3, EOS, 9][: sampling_params.kw["max_tokens"]]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(ids))]))
        return outs

    def reset_prefix_cache(self):
        self.prefix_resets += 1
        self.events.append("reset")

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append("wake")

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc_calls += 1
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        return [method(worker, *args, **(kwargs or {}))]


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    FakeLLM.in_process = True
    FakeLLM.on_generate = None
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def _gen(tmp_path, **settings) -> VLLMGenerator:
    return VLLMGenerator(VLLMSettings(tmp_dir=str(tmp_path), **settings), require_cuda=False)


def _student(seed: int = 2, tied: bool = False):
    model = tiny_llama(seed)
    if tied:
        from transformers import LlamaForCausalLM

        cfg = model.config
        cfg.tie_word_embeddings = True
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.model.embed_tokens.requires_grad_(False)  # frozen like a layer-subset student's
    return model


def _trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_missing_vllm_package_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match="vllm package") as err:
        VLLMGenerator()
    assert "kdforge[vllm]" in err.value.fix and "transformers" in err.value.fix


def test_no_gpu_is_a_device_error(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA"):
        make_generator(OnPolicyConfig(backend="vllm"))


def test_backend_is_chosen_from_the_config(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    batcher = OnPolicyBatcher(OnPolicyConfig(backend="vllm", vllm={"sync_every": 3, "dtype": "float16"}))
    assert isinstance(batcher.generate_fn, VLLMGenerator)
    assert batcher.generate_fn.settings.sync_every == 3 and batcher.generate_fn.dtype == torch.float16
    assert type(OnPolicyBatcher(OnPolicyConfig()).generate_fn).__name__ == "HFGenerator"


def test_vllm_settings_without_the_vllm_backend_are_refused():
    with pytest.raises(ConfigError, match="backend"):
        OnPolicyConfig(vllm={"sync_every": 2})
    with pytest.raises(ConfigError, match="sync_every"):
        OnPolicyConfig(backend="vllm", vllm={"sync_every": 0})
    with pytest.raises(ConfigError):
        OnPolicyConfig(backend="vllm", vllm={"gpu_memory_util": 0.5})  # unknown key


def test_llm_kd_method_picks_the_vllm_backend_from_yaml_keys():
    from kdforge.recipes.llm_kd import MethodSpec

    m = MethodSpec.model_validate({
        "name": "GKD", "objective": [{"name": "generalized_jsd", "weight": 1.0}],
        "on_policy": {"lmbda": 0.5, "prompt_tokens": 8, "backend": "vllm",
                      "vllm": {"gpu_memory_utilization": 0.25, "sync_every": 2}},
    })
    cfg = m.on_policy.to_config()
    assert cfg.backend == "vllm" and cfg.vllm.gpu_memory_utilization == 0.25 and cfg.vllm.sync_every == 2


def test_engine_starts_from_a_snapshot_with_the_engine_options(fake_vllm, tmp_path):
    student = _student()
    gen = _gen(tmp_path, gpu_memory_utilization=0.2, max_model_len=64, engine_kwargs={"swap_space": 0})
    gen(student, [torch.tensor([5, 6, 7])], OnPolicyConfig(max_new_tokens=4))
    (llm,) = FakeLLM.instances
    kw = llm.kwargs
    assert kw["gpu_memory_utilization"] == 0.2 and kw["max_model_len"] == 64 and kw["swap_space"] == 0
    assert kw["dtype"] == "bfloat16" and kw["skip_tokenizer_init"] is True and kw["tensor_parallel_size"] == 1
    assert Path(kw["model"]).parent == tmp_path
    # the snapshot holds every weight of the student as it was at the first generation
    state = student.state_dict()
    assert set(llm.model.weights) == set(state)
    assert all(torch.equal(llm.model.weights[k], state[k]) for k in state)
    assert llm.model.pushes == []          # in sync from the start: nothing pushed
    gen.close()
    assert not Path(kw["model"]).exists()


def test_requests_carry_sampling_params_and_completions_are_cut_after_eos(fake_vllm, tmp_path):
    gen = _gen(tmp_path)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    cfg = OnPolicyConfig(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=4, eos_token_id=EOS)
    outs = gen(_student(), prompts, cfg)
    (llm,) = FakeLLM.instances
    sent, params = llm.requests[0]
    assert sent == [[5, 6, 7], [8]]
    assert params.kw == {"n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 4,
                         "stop_token_ids": [EOS], "detokenize": False}
    assert [o.tolist() for o in outs] == [[11, 12, EOS], [12, 13, EOS]]   # the token after EOS is dropped
    assert all(o.dtype == torch.long for o in outs)
    outs = gen(_student(), prompts, cfg.model_copy(update={"max_new_tokens": 2, "top_k": None}))
    assert [o.tolist() for o in outs] == [[11, 12], [12, 13]]             # no EOS: kept whole
    assert FakeLLM.instances[-1].requests[-1][1].kw["top_k"] == -1         # vLLM's "no top-k"


def _check_engine_matches(student, dtype):
    def check(llm):
        for name, p in student.named_parameters():
            if p.requires_grad:
                assert torch.equal(llm.model.weights[name], p.detach().to(dtype)
                                   if llm.model.pushes else p.detach()), name
    return check


@pytest.mark.parametrize("accum", [1, 2])
def test_weights_are_pushed_once_per_optimizer_step_and_match_the_student(fake_vllm, tmp_path, accum):
    teacher, student = tiny_llama(1, head_scale=4.0), _student()
    gen = _gen(tmp_path)
    FakeLLM.on_generate = _check_engine_matches(student, torch.bfloat16)
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("generalized_jsd", 1.0, {"beta": 0.5})],
                  config=TrainConfig(max_steps=3, batch_size=2, grad_accum_steps=accum, progress=False, log_every=1),
                  train_data=TokenDataset(n=16), on_policy=OnPolicyConfig(lmbda=1.0, max_new_tokens=3),
                  generate_fn=gen)
    d.train()
    (llm,) = FakeLLM.instances
    assert len(llm.requests) == 3 * accum                    # every micro-batch generated
    assert len(llm.model.pushes) == 2 == gen.sync_count(student)   # steps 1 and 2 (step 0 = snapshot)
    assert llm.prefix_resets == 2
    for push in llm.model.pushes:
        assert sorted(n for n, _, _ in push) == _trainable_names(student)
        assert "model.embed_tokens.weight" not in [n for n, _, _ in push]      # frozen: never re-sent
        assert all(dt == torch.bfloat16 for _, _, dt in push)
        shapes = dict(student.named_parameters())
        assert all(shape == tuple(shapes[n].shape) for n, shape, _ in push)


def test_sync_every_leaves_the_engine_stale_in_between(fake_vllm, tmp_path):
    student = _student()
    gen = _gen(tmp_path, sync_every=2, dtype="float32")
    cfg = OnPolicyConfig(max_new_tokens=2)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    pushes_seen = []
    for step in range(6):
        gen.set_step(step)
        gen(student, [torch.tensor([5, 6])], cfg)
        gen(student, [torch.tensor([7])], cfg)       # a second micro-batch of the same step
        pushes_seen.append(len(FakeLLM.instances[0].model.pushes))
        student(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    assert pushes_seen == [0, 0, 1, 1, 2, 2]         # synced at steps 2 and 4 only
    engine = FakeLLM.instances[0].model.weights
    # after the step-4 push the engine holds the weights of after 4 updates, not the current ones
    name = _trainable_names(student)[0]
    assert not torch.equal(engine[name], dict(student.named_parameters())[name].detach())


def test_without_step_information_every_generation_syncs(fake_vllm, tmp_path):
    student = _student()
    gen = _gen(tmp_path)
    for _ in range(3):
        gen(student, [torch.tensor([5])], OnPolicyConfig(max_new_tokens=1))
    assert len(FakeLLM.instances[0].model.pushes) == 2


def test_a_frozen_model_gets_its_own_engine_and_is_never_synced(fake_vllm, tmp_path):
    teacher = tiny_llama(1).requires_grad_(False)
    student = _student()
    gen = _gen(tmp_path)
    for step in range(3):
        gen.set_step(step)
        gen(teacher, [torch.tensor([5])], OnPolicyConfig(max_new_tokens=1))
        gen(student, [torch.tensor([5])], OnPolicyConfig(max_new_tokens=1))
    t_llm, s_llm = FakeLLM.instances
    assert t_llm.model.pushes == [] and len(s_llm.model.pushes) == 2
    assert len(gen.engines) == 2


def test_tied_embeddings_are_sent_once_under_the_embedding_name(tmp_path):
    student = _student(tied=True)
    student.model.embed_tokens.requires_grad_(True)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    names = [n for n, _ in iter_sync_tensors(student, trainable_only=True, dtype=torch.bfloat16)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(set(names))


def test_wrappers_are_removed_and_their_name_prefixes_dropped():
    student = _student()
    wrapped = torch.nn.DataParallel(student)                 # CPU: a plain wrapper with .module
    assert unwrap_model(wrapped) is student
    names = [n for n, _ in iter_sync_tensors(wrapped, trainable_only=True, dtype=None)]
    assert sorted(names) == _trainable_names(student)
    assert _clean_name("_fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") \
        == "model.layers.0.mlp.up_proj.weight"
    assert _clean_name("module._orig_mod.lm_head.weight") == "lm_head.weight"


def test_pushes_go_through_collective_rpc_on_cpu_when_the_engine_is_out_of_process(fake_vllm, tmp_path):
    FakeLLM.in_process = False
    student = _student()
    gen = _gen(tmp_path)
    for step in range(2):
        gen.set_step(step)
        gen(student, [torch.tensor([5])], OnPolicyConfig(max_new_tokens=1))
        with torch.no_grad():
            student.lm_head.weight.add_(1.0)
    (llm,) = FakeLLM.instances
    assert llm.rpc_calls == 1 and len(llm.model.pushes) == 1
    pushed = llm.model.weights["lm_head.weight"]
    assert pushed.device.type == "cpu" and pushed.dtype == torch.bfloat16
    assert torch.equal(pushed, (student.lm_head.weight.detach() - 1.0).to(torch.bfloat16))


def test_sleep_mode_wakes_the_engine_before_a_push_and_sleeps_after_each_generation(fake_vllm, tmp_path):
    student = _student()
    gen = _gen(tmp_path, sleep=True)
    for step in range(2):
        gen.set_step(step)
        gen(student, [torch.tensor([5])], OnPolicyConfig(max_new_tokens=1))
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_sleep_mode"] is True
    assert llm.events == ["generate", "sleep1", "wake", "reset", "generate", "sleep1"]
    assert len(llm.model.pushes) == 1


@pytest.mark.gpu
def test_real_vllm_generates_like_hf_greedy_before_and_after_a_weight_sync(tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    student = LlamaForCausalLM(cfg).cuda()
    student.model.embed_tokens.requires_grad_(False)
    gen = VLLMGenerator(VLLMSettings(dtype="float32", gpu_memory_utilization=0.2, max_model_len=128,
                                     tmp_dir=str(tmp_path)))
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])]
    op = OnPolicyConfig(temperature=1e-6, max_new_tokens=8)   # below vLLM's epsilon: greedy

    def hf_greedy():
        outs = []
        for p in prompts:
            o = student.generate(input_ids=p[None].cuda(), do_sample=False, max_new_tokens=8,
                                 eos_token_id=2, pad_token_id=0)
            row = o[0, p.numel():].cpu()
            hits = (row == 2).nonzero()
            outs.append((row[: int(hits[0]) + 1] if len(hits) else row).tolist())
        return outs

    try:
        gen.set_step(0)
        assert [c.tolist() for c in gen(student, prompts, op)] == hf_greedy()
        with torch.no_grad():
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        gen.set_step(1)
        assert [c.tolist() for c in gen(student, prompts, op)] == hf_greedy()
        assert gen.sync_count(student) == 1
    finally:
        gen.close()


_FSDP2_SCRIPT = r"""
import os, sys, socket, torch
sys.path.insert(0, sys.argv[1])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
torch.set_num_threads(1)
torch.distributed.init_process_group("gloo")
from torch.distributed.fsdp import fully_shard
from _tiny import tiny_llama
from kdforge.train.vllm_generation import iter_sync_tensors
m = tiny_llama(2)
m.model.embed_tokens.requires_grad_(False)
ref = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
for layer in m.model.layers:
    fully_shard(layer)
fully_shard(m)
assert type(next(m.model.layers.parameters())).__name__ == "DTensor"
got = dict(iter_sync_tensors(m, trainable_only=True, dtype=torch.bfloat16))
assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
assert all(type(t) is torch.Tensor and torch.equal(t, ref[k].to(torch.bfloat16)) for k, t in got.items())
torch.distributed.destroy_process_group()
print("ok")
"""


def test_fsdp2_sharded_parameters_are_gathered_into_plain_full_tensors():
    """One gloo process on CPU: FSDP2 DTensor shards come back as whole tensors with HF names."""
    import os
    import subprocess

    here = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", _FSDP2_SCRIPT, str(here)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
