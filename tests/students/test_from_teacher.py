"""Students built from the teacher: layer choice, weight copying, config updates, saving."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from kdforge.errors import ConfigError
from kdforge.students.from_teacher import (
    count_parameters,
    find_layers,
    narrow_student,
    select_layers,
    student_from_teacher,
)


def _llama(layers: int = 5, tie: bool = True):
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _qwen2(layers: int = 4):
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=16, max_window_layers=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _gpt2(layers: int = 4):
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_every_k_is_uniform_and_keeps_first_and_last_layer():
    assert select_layers(30, "every_k", 6) == [0, 6, 12, 17, 23, 29]
    assert select_layers(10, "every_k", 2) == [0, 9]
    assert select_layers(4, "every_k", 4) == [0, 1, 2, 3]
    assert select_layers(7, "every_k", 1) == [0]


def test_first_last_and_explicit_lists_including_negative_indices():
    assert select_layers(12, "first_last") == [0, 11]
    assert select_layers(12, [11, 0, -2]) == [0, 10, 11]


@pytest.mark.parametrize(
    "spec,num,match",
    [("every_k", None, "num_layers"), ("every_k", 13, "num_layers"), ("middle", None, "unknown"),
     ([0, 12], None, "out of range"), ([1, 1], None, "duplicate"), ([], None, "empty"),
     ([0, 1], 3, "disagrees")],
)
def test_bad_layer_selections_raise_config_error(spec, num, match):
    with pytest.raises(ConfigError, match=match):
        select_layers(12, spec, num)


def test_keeping_every_layer_reproduces_the_teacher_exactly():
    teacher = _llama(3)
    student = student_from_teacher(teacher, "every_k", num_layers=3)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_chosen_layers_are_copied_renumbered_and_config_updated():
    teacher = _llama(5, tie=False)
    student = student_from_teacher(teacher, [0, 3, 4])
    assert student.config.num_hidden_layers == 3
    assert student.config.kdforge_source_layers == [0, 3, 4]
    assert teacher.config.num_hidden_layers == 5, "the teacher config must not change"
    for new, old in enumerate([0, 3, 4]):
        torch.testing.assert_close(student.model.layers[new].mlp.up_proj.weight,
                                   teacher.model.layers[old].mlp.up_proj.weight)
        assert student.model.layers[new].self_attn.layer_idx == new
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight)
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight)
    # copies, not shared tensors: training the student leaves the teacher alone
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


def test_per_layer_config_lists_are_subset_for_qwen2():
    teacher = _qwen2(4)
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    student = student_from_teacher(teacher, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert student.config.max_window_layers == 1
    assert student(torch.randint(0, 128, (1, 5))).logits.shape == (1, 5, 128)


def test_gpt2_style_models_are_supported():
    teacher = _gpt2(4)
    assert find_layers(teacher)[0] == "transformer.h"
    student = student_from_teacher(teacher, "first_last")
    assert student.config.n_layer == 2
    torch.testing.assert_close(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[3].attn.c_attn.weight)
    torch.testing.assert_close(student.transformer.wpe.weight, teacher.transformer.wpe.weight)


def test_freezing_embeddings_and_head_leaves_only_layers_and_norm_trainable():
    teacher = _llama(4, tie=False)
    student = student_from_teacher(teacher, "first_last", freeze_embeddings=True, freeze_head=True)
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight", "lm_head.weight"}
    assert count_parameters(student, trainable_only=True) == count_parameters(student) - 2 * 128 * 32


def test_tied_embeddings_stay_tied_and_are_counted_once():
    student = student_from_teacher(_llama(4, tie=True), "first_last", freeze_embeddings=True)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert not student.lm_head.weight.requires_grad
    with_duplicates = sum(p.numel() for _, p in student.named_parameters(remove_duplicate=False))
    assert count_parameters(student) == with_duplicates - 128 * 32


def test_saved_student_loads_with_plain_transformers(tmp_path):
    teacher = _llama(5)
    student = student_from_teacher(teacher, "every_k", num_layers=2)
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)
    assert reloaded.config.num_hidden_layers == 2


def test_narrow_student_keeps_head_dim_vocab_and_gqa_ratio():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    small = narrow_student(cfg, hidden_size=32, num_layers=2)
    assert (small.hidden_size, small.num_attention_heads, small.head_dim) == (32, 4, 8)
    assert small.num_key_value_heads == 2
    assert small.intermediate_size == 128
    assert small.num_hidden_layers == 2 and small.vocab_size == 128
    assert cfg.hidden_size == 64, "the teacher config must not change"
    model = AutoModelForCausalLM.from_config(small)
    assert model(torch.randint(0, 128, (1, 4))).logits.shape == (1, 4, 128)


def test_narrow_student_works_for_gpt2_and_rejects_indivisible_sizes():
    small = narrow_student(GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4), hidden_size=32)
    assert (small.n_embd, small.n_head) == (32, 2)
    with pytest.raises(ConfigError, match="divisible"):
        narrow_student(LlamaConfig(hidden_size=64, num_attention_heads=8), hidden_size=30, num_attention_heads=4)


def test_make_student_cli_writes_a_loadable_student(tmp_path, capsys):
    from kdforge.cli.main import main

    _llama(5).save_pretrained(tmp_path / "teacher")
    assert main(["make-student", str(tmp_path / "teacher"), str(tmp_path / "s"), "--layers", "0,4"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 2
    assert "layers [0, 4] of 5" in capsys.readouterr().out
    assert main(["make-student", str(tmp_path / "teacher"), str(tmp_path / "s2"), "--layers", "0,x"]) == 2
