"""DAC-KL with a learned clipping sub-network, end to end on a tiny causal LM (dense online teacher)."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses import DACClipNet, chunked_distillation_loss, cross_entropy, dac_kl
from kdforge.recipes.learned_terms import attach_clip_nets
from kdforge.train import CausalLMTask, Distiller, TrainConfig
from kdforge.train.objective import Objective

from ._tiny import TokenDataset, pad_collate, tiny_llama

TERMS = [{"name": "dac_kl", "weight": 1.0, "params": {"learned": True, "mass": 0.8, "temperature": 2.0}},
         {"name": "cross_entropy", "weight": 0.5}]


def _loss(student, teacher, batch, net):
    """The trained objective on a fixed batch (labels shifted as CausalLMTask does), net in eval mode."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        y = batch["labels"][:, 1:]
        mask = y != -100
        was = net.training
        net.eval()
        value = dac_kl(s, t, clip_net=net, labels=y, mask=mask, temperature=2.0) + 0.5 * cross_entropy(s, None, labels=y, mask=mask)
        net.train(was)
    return float(value)


def test_learned_region_trains_with_the_student_and_the_loss_falls():
    student, teacher = tiny_llama(0), tiny_llama(1, head_scale=3.0)
    objective = Objective(TERMS)
    extras = attach_clip_nets(objective)
    net = objective.terms[0].params["clip_net"]
    assert isinstance(net, DACClipNet) and list(extras.values()) == [net]
    assert float(net(torch.tensor([[0.5, 0.3, 0.2]]))[1].detach()) == pytest.approx(0.8)  # u starts at the mass
    data = TokenDataset(n=16)
    batch = pad_collate()([data[i] for i in range(8)])
    before_loss = _loss(student, teacher, batch, net)
    before = [p.detach().clone() for p in net.parameters()]
    Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(), objective=objective, train_data=data,
              extra_modules=extras,
              config=TrainConfig(max_steps=25, batch_size=8, lr=1e-2, progress=False, log_every=5)).train()
    assert _loss(student, teacher, batch, net) < 0.9 * before_loss
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the sub-network moved


def test_the_chunked_path_refuses_a_learned_region():
    with pytest.raises(ConfigError, match="learned module"):
        Objective(TERMS, chunked=True)
    hidden, weight = torch.randn(6, 8), torch.randn(10, 8)
    with pytest.raises(ConfigError, match="chunked: false"):
        chunked_distillation_loss(hidden, weight, torch.randn(6, 10), loss="dac_kl", labels=torch.randint(0, 10, (6,)),
                                  clip_net=DACClipNet())
    assert not Objective(TERMS)._chunkable_by_kernel()  # auto keeps the plain path


def test_multi_process_recipes_refuse_the_learned_region():
    with pytest.raises(ConfigError, match="single-process"):
        attach_clip_nets(Objective(TERMS), world_size=2)
