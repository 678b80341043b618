"""Capturing intermediate outputs (model outputs, hooks) and student-to-teacher layer maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge.errors import ConfigError
from kdforge.features import (
    FeatureRequest,
    ModuleTaps,
    capture,
    layer_map,
    num_layers,
    source_layers,
    use_eager_attention,
    value_modules,
)


def tiny_llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _hooks(model: nn.Module) -> int:
    """Forward hooks installed by kdforge (transformers keeps output-recording hooks of its own)."""
    return sum(getattr(h, "__module__", "").startswith("kdforge") for m in model.modules()
               for h in m._forward_hooks.values())


# -- layer maps ------------------------------------------------------------------------------------
def test_uniform_map_pairs_student_block_i_with_teacher_block_round_i_lt_over_ls():
    assert layer_map("uniform", 2, 6) == [(1, 3), (2, 6)]  # hidden-state indices (0 = embeddings)
    assert layer_map("uniform", 3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert layer_map("uniform", 2, 6, space="blocks") == [(0, 2), (1, 5)]


def test_last_kept_auto_and_explicit_maps():
    assert layer_map("last", 2, 6) == [(2, 6)]
    assert layer_map("last", 2, 6, space="blocks") == [(1, 5)]
    assert layer_map("kept", 3, 8, kept=[0, 4, 7]) == [(1, 1), (2, 5), (3, 8)]
    assert layer_map("auto", 3, 8, kept=[0, 4, 7]) == layer_map("kept", 3, 8, kept=[0, 4, 7])
    assert layer_map("auto", 2, 6) == layer_map("uniform", 2, 6)
    assert layer_map([3, -1], 2, 6) == [(1, 3), (2, 6)]
    assert layer_map({0: 0, -1: 6}, 2, 6) == [(0, 0), (2, 6)]


@pytest.mark.parametrize("spec, kept, match", [
    ("kept", None, "student_from_teacher"),
    ([1, 2, 3], None, "one teacher index per student layer"),
    ({1: 9}, None, "out of range"),
    ("every_other", None, "unknown layer map"),
])
def test_bad_layer_maps_are_config_errors_with_a_fix(spec, kept, match):
    with pytest.raises(ConfigError, match=match) as info:
        layer_map(spec, 2, 6, kept=kept)
    assert info.value.fix


def test_student_from_teacher_records_the_kept_layers_used_as_the_default_map():
    from kdforge.students import student_from_teacher

    teacher = tiny_llama(layers=4)
    student = student_from_teacher(teacher, [0, 3])
    assert source_layers(student) == [0, 3]
    assert num_layers(student) == 2
    assert layer_map("auto", 2, 4, kept=source_layers(student)) == [(1, 1), (2, 4)]
    assert source_layers(teacher) is None


# -- hooks -----------------------------------------------------------------------------------------
def test_module_taps_capture_outputs_and_remove_their_hooks_even_when_the_forward_fails():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with ModuleTaps(model, ["0", "2"]) as taps:
        assert _hooks(model) == 2 == sum(len(m._forward_hooks) for m in model.modules())
        y = model(x)
    assert _hooks(model) == 0
    assert torch.equal(taps.outputs["2"], y) and taps.outputs["0"].shape == (5, 4)
    with pytest.raises(RuntimeError), ModuleTaps(model, ["0"]):
        model(torch.randn(5, 7))  # wrong width: the forward raises inside the block
    assert _hooks(model) == 0


def test_an_unknown_module_path_is_a_config_error_suggesting_close_paths():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.v_proj"):
        ModuleTaps(model, ["model.layers.0.self_atn.v_proj"])


def test_a_module_that_runs_twice_is_refused():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, lin)
    with pytest.raises(ConfigError, match="more than once"), ModuleTaps(model, ["0"]):
        model(torch.randn(1, 2))
    assert _hooks(model) == 0


def test_value_modules_finds_the_value_projections_in_block_order():
    assert value_modules(tiny_llama(layers=3)) == [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]
    with pytest.raises(ConfigError, match="value projection"):
        value_modules(nn.Sequential(nn.Linear(2, 2)))


# -- capture -----------------------------------------------------------------------------------------
def test_capture_hidden_states_uses_the_model_outputs_and_leaves_no_hooks():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 64, (2, 5))
    out, feats = capture(model, FeatureRequest(hidden_states=True, modules=("model.layers.1.self_attn.v_proj",)),
                         input_ids=ids)
    assert len(feats.hidden_states) == 3 and feats.hidden_states[0].shape == (2, 5, 32)
    assert feats.attentions is None
    assert feats.modules["model.layers.1.self_attn.v_proj"].shape == (2, 5, 16)  # 2 KV heads x 8
    assert out.logits.shape == (2, 5, 64) and _hooks(model) == 0


def test_attentions_need_eager_attention_and_the_error_says_how():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ConfigError, match="use_eager_attention"):
        capture(model, FeatureRequest(attentions=True), input_ids=ids)
    assert use_eager_attention(model) is True and use_eager_attention(model) is False
    _, feats = capture(model, FeatureRequest(attentions=True), input_ids=ids)
    assert [a.shape for a in feats.attentions] == [(1, 4, 4, 4)] * 2
    assert torch.allclose(feats.attentions[0].sum(-1), torch.ones(1, 4, 4), atol=1e-5)
