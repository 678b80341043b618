"""Gradient accumulation normalises by the real positions of the whole accumulated batch."""

import torch

from kdforge.losses import forward_kl
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

from ._tiny import TokenDataset, pad_collate, tiny_llama


def _grads_of_first_step(batch_size, accum):
    teacher = tiny_llama(1, head_scale=4.0)
    student = tiny_llama(2)
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 0.8), LossTerm("cross_entropy", 0.2)],
                  config=TrainConfig(max_steps=1, batch_size=batch_size, grad_accum_steps=accum, lr=1e-3,
                                     max_grad_norm=None, progress=False, log_every=1),
                  train_data=TokenDataset(n=8, min_len=3, max_len=14))
    captured = {}

    def hook(opt, args, kwargs):
        for name, p in student.named_parameters():
            captured[name] = p.grad.detach().clone()

    d.optimizer.optimizer.register_step_pre_hook(hook)
    state = d.train()
    return captured, state


def test_accumulating_4x2_gives_the_same_gradient_as_1x8_with_uneven_token_counts():
    g_acc, s_acc = _grads_of_first_step(batch_size=2, accum=4)
    g_big, s_big = _grads_of_first_step(batch_size=8, accum=1)
    assert s_acc.positions_seen == s_big.positions_seen  # same 8 examples
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-7, msg=name)


def test_per_micro_batch_mean_would_differ_so_the_equivalence_test_has_power():
    """Control: averaging each micro-batch separately (the common bug) gives another loss here."""
    data = TokenDataset(n=8, min_len=3, max_len=14)
    collate = pad_collate()
    teacher, student = tiny_llama(1, head_scale=4.0), tiny_llama(2)
    task = CausalLMTask()
    micro = [collate([data[i], data[i + 1]]) for i in range(0, 8, 2)]
    counts = [task.count(b) for b in micro]
    assert len(set(counts)) > 1  # uneven real tokens per micro-batch
    with torch.no_grad():
        outs = [task.forward(student, teacher, b) for b in micro]
        naive = sum(forward_kl(o.student_logits, o.teacher, mask=o.mask) for o in outs) / 4
        exact = sum(forward_kl(o.student_logits, o.teacher, mask=o.mask, reduction="sum") for o in outs) / sum(counts)
        big = task.forward(student, teacher, collate([data[i] for i in range(8)]))
        reference = forward_kl(big.student_logits, big.teacher, mask=big.mask)
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-6)
    assert abs(float(naive - reference)) > 1e-4
