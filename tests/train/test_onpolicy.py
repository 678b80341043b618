"""On-policy distillation (GKD) on tiny causal LMs."""

import pytest
import torch

from kdforge.errors import ConfigError, DataError
from kdforge.train import (
    CausalLMTask,
    ClassificationTask,
    Distiller,
    LossTerm,
    OnPolicyConfig,
    TrainConfig,
)
from kdforge.train.onpolicy import HFGenerator, OnPolicyBatcher, build_batch, split_prompts

from ._tiny import MLP, ClassDataset, TokenDataset, pad_collate, tiny_llama


def test_split_prompts_and_build_batch_roundtrip_with_prompt_masked():
    batch = pad_collate(prompt=2)([torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])])
    prompts = split_prompts(batch)
    assert [p.tolist() for p in prompts] == [[5, 6], [9, 10]]
    out = build_batch(prompts, [torch.tensor([20, 2]), torch.tensor([21, 22, 23])], pad_token_id=0, device="cpu")
    assert out["input_ids"].tolist() == [[5, 6, 20, 2, 0], [9, 10, 21, 22, 23]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, -100, 20, 2, -100], [-100, -100, 21, 22, 23]]


def test_row_without_prompt_is_a_data_error():
    batch = pad_collate(prompt=0)([torch.tensor([5, 6, 7])])
    with pytest.raises(DataError, match="no prompt"):
        split_prompts(batch)


def test_hf_generator_samples_completions_and_cuts_after_eos():
    model = tiny_llama(3)
    cfg = OnPolicyConfig(max_new_tokens=6, temperature=1.0)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    was_training = model.training
    outs = HFGenerator()(model, prompts, cfg)
    assert len(outs) == 2 and model.training == was_training
    for c in outs:
        assert 1 <= c.numel() <= 6
        eos_at = (c == 2).nonzero()
        if len(eos_at):
            assert int(eos_at[0]) == c.numel() - 1


def test_on_policy_draw_is_a_pure_function_of_seed_step_and_micro_batch():
    b = OnPolicyBatcher(OnPolicyConfig(lmbda=0.5), seed=3)
    draws = [b.use_student(s, m) for s in range(50) for m in range(2)]
    assert draws == [OnPolicyBatcher(OnPolicyConfig(lmbda=0.5), seed=3).use_student(s, m)
                     for s in range(50) for m in range(2)]
    assert 20 < sum(draws) < 80
    assert not any(OnPolicyBatcher(OnPolicyConfig(lmbda=0.0)).use_student(s, 0) for s in range(20))


class RecordingGenerator:
    """A pluggable backend (what a vLLM generator would implement): fixed completions, logged calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, prompts, config):
        self.calls.append((model, [p.tolist() for p in prompts]))
        return [torch.tensor([40 + i, 41, 2]) for i in range(len(prompts))]


def test_lmbda_one_trains_on_student_generated_completions_via_pluggable_backend():
    teacher, student = tiny_llama(1, head_scale=4.0), tiny_llama(2)
    gen = RecordingGenerator()
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("generalized_jsd", 1.0, {"beta": 0.5})],
                  config=TrainConfig(max_steps=2, batch_size=4, progress=False, log_every=1),
                  train_data=TokenDataset(n=8), on_policy=OnPolicyConfig(lmbda=1.0), generate_fn=gen)
    state = d.train()
    assert len(gen.calls) == 2
    assert all(model is student for model, _ in gen.calls)
    assert all(len(prompts) == 4 and all(len(p) == 2 for p in prompts) for _, prompts in gen.calls)
    # 4 rows x 3 completion tokens per step; the first completion token is predicted from the prompt
    assert state.positions_seen == 2 * 4 * 3


def test_seq_kd_generates_with_the_teacher():
    teacher, student = tiny_llama(1), tiny_llama(2)
    gen = RecordingGenerator()
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 1.0)],
                  config=TrainConfig(max_steps=1, batch_size=4, progress=False),
                  train_data=TokenDataset(n=8), on_policy=OnPolicyConfig(lmbda=0.0, seq_kd=True), generate_fn=gen)
    d.train()
    assert [m for m, _ in gen.calls] == [teacher]


def test_gkd_with_real_hf_sampling_trains_the_student_toward_the_teacher():
    teacher, student = tiny_llama(1, head_scale=6.0), tiny_llama(2)
    data = TokenDataset(n=16)
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("reverse_kl", 1.0)],
                  config=TrainConfig(max_steps=12, batch_size=8, lr=1e-2, progress=False, log_every=1,
                                     scheduler="constant"),
                  train_data=data, eval_data=data, on_policy=OnPolicyConfig(lmbda=1.0, max_new_tokens=6))
    before = d.evaluate()["eval/kl_to_teacher"]
    d.train()
    assert d.evaluate()["eval/kl_to_teacher"] < before


def test_on_policy_needs_causal_lm_task_and_online_teacher():
    with pytest.raises(ConfigError, match="CausalLMTask"):
        Distiller(MLP(), MLP(), task=ClassificationTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=TrainConfig(max_steps=1), train_data=ClassDataset(), on_policy={"lmbda": 0.5})
    with pytest.raises(ConfigError, match="online teacher"):
        Distiller(tiny_llama(2), None, task=CausalLMTask(), objective=[LossTerm("forward_kl", 1.0)],
                  config=TrainConfig(max_steps=1), train_data=TokenDataset(), on_policy={"lmbda": 0.5})


def test_gkd_run_with_sampling_resumes_to_bitwise_identical_weights(tmp_path):
    from kdforge.train import Callback

    class Crash(Callback):
        def on_step_end(self, state, logs):
            if state.step == 3:
                raise KeyboardInterrupt

    def make(out, callbacks=()):
        teacher, student = tiny_llama(1, head_scale=4.0), tiny_llama(2)
        d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                      objective=[LossTerm("generalized_jsd", 1.0, {"beta": 0.5})],
                      config=TrainConfig(max_steps=4, batch_size=4, lr=1e-2, progress=False, log_every=1,
                                         save_every=2, output_dir=str(out)),
                      train_data=TokenDataset(n=12), on_policy=OnPolicyConfig(lmbda=0.5, max_new_tokens=4),
                      callbacks=callbacks)
        return d, student

    ref, ref_student = make(tmp_path / "ref")
    ref.train()
    crashed, _ = make(tmp_path / "run", [Crash()])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed, student = make(tmp_path / "run")
    resumed.train(resume=True)
    for a, b in zip(ref_student.parameters(), student.parameters()):
        assert torch.equal(a, b)


def test_special_token_ids_prefer_config_then_generation_config_then_model_config():
    from types import SimpleNamespace

    from kdforge.train.generation import special_token_ids

    model = torch.nn.Linear(1, 1)
    model.generation_config = SimpleNamespace(eos_token_id=[7, 8], pad_token_id=None)
    model.config = SimpleNamespace(eos_token_id=3, pad_token_id=4)
    assert special_token_ids(model, OnPolicyConfig()) == (4, 7)  # first of an EOS list; pad from config
    assert special_token_ids(model, OnPolicyConfig(pad_token_id=1, eos_token_id=9)) == (1, 9)
    model.config = SimpleNamespace()
    assert special_token_ids(model, OnPolicyConfig()) == (7, 7)  # pad falls back to EOS
    model.generation_config = SimpleNamespace()
    with pytest.raises(ConfigError, match="pad token id"):
        special_token_ids(model, OnPolicyConfig())


def test_cut_after_eos_keeps_the_first_eos_and_a_row_without_one_whole():
    from kdforge.train.generation import cut_after_eos

    assert cut_after_eos(torch.tensor([5, 2, 6, 2]), 2).tolist() == [5, 2]
    assert cut_after_eos(torch.tensor([5, 6]), 2).tolist() == [5, 6]
    assert cut_after_eos(torch.tensor([5, 2]), None).tolist() == [5, 2]


def test_generation_names_stay_importable_from_onpolicy_and_train():
    import kdforge.train as train
    from kdforge.train import generation, onpolicy, vllm_generation

    for name in ("GenerateFn", "HFGenerator"):
        assert getattr(onpolicy, name) is getattr(generation, name) is getattr(train, name)
    assert onpolicy.VLLMSettings is vllm_generation.VLLMSettings is train.VLLMSettings
    assert onpolicy._special_ids is generation.special_token_ids  # still imported by kdforge.eval.onpolicy
