"""chunked=True (fused LM head + loss) gives the same update as the plain path."""

import pytest
import torch

from kdforge.train import CausalLMTask, Distiller, LossTerm, Objective, TrainConfig

from ._tiny import TokenDataset, one_step_grads, pad_collate, tiny_llama

KD_TERMS = {
    "forward_kl": LossTerm("forward_kl", 0.7, {"temperature": 2.0}),
    "generalized_jsd": LossTerm("generalized_jsd", 0.7, {"beta": 0.5}),  # the closed form shares CE's softmax
    "adaptive_kl": LossTerm("adaptive_kl", 0.7, {"temperature": 2.0}),  # no closed form: autograd per chunk
}


def _first_step_grads(chunked, kd_name):
    teacher, student = tiny_llama(1, head_scale=4.0), tiny_llama(2)
    objective = Objective([KD_TERMS[kd_name], LossTerm("cross_entropy", 0.3)], chunked=chunked, chunk_size=7)
    return one_step_grads(student, teacher, objective, pad_collate())


@pytest.mark.parametrize("kd_name", list(KD_TERMS))
def test_chunked_objective_matches_plain_gradients_and_logged_terms(kd_name):
    g_plain, logs_plain = _first_step_grads(False, kd_name)
    g_chunk, logs_chunk = _first_step_grads(True, kd_name)
    for name in g_plain:
        torch.testing.assert_close(g_chunk[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("loss", f"loss/{kd_name}", "loss/cross_entropy"):
        assert abs(logs_chunk[key] - logs_plain[key]) < 1e-5 * max(1.0, abs(logs_plain[key]))


def test_objective_hands_compile_kernels_to_the_chunked_loss(monkeypatch):
    import kdforge.losses.chunked as chunked_mod

    seen = []
    real = chunked_mod.chunked_distillation_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile_kernels"))
        return real(*args, **{**kwargs, "compile_kernels": False})  # the compiled kernels' own test is slow-marked

    monkeypatch.setattr(chunked_mod, "chunked_distillation_loss", spy)
    for flag in (False, True):
        teacher, student = tiny_llama(1), tiny_llama(2)
        objective = Objective([KD_TERMS["forward_kl"]], chunked=True, compile_kernels=flag)
        Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(), objective=objective,
                  config=TrainConfig(max_steps=1, batch_size=4, progress=False, log_every=1),
                  train_data=TokenDataset(n=4)).train()
    assert seen == [False, True]
