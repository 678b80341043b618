import torch
from safetensors.torch import load as st_load

from kdforge.train.checkpoint import (
    rng_state,
    set_rng_state,
    state_dict_from_bytes,
    state_dict_to_bytes,
)


def test_tied_weights_are_stored_once_and_restored_under_both_names():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    data = state_dict_to_bytes(model.state_dict())
    assert len(st_load(data)) == 1
    restored = state_dict_from_bytes(data)
    assert set(restored) == {"emb.weight", "head.weight"}
    fresh = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    fresh.load_state_dict(restored)
    assert torch.equal(fresh["head"].weight, emb.weight)


def test_rng_state_roundtrip_replays_python_numpy_and_torch_draws():
    import random

    import numpy as np

    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_deepspeed_student_with_save_every_is_refused_before_training():
    """ZeRO partitions the optimizer state inside the engine; a rank-0 checkpoint would resume wrong."""
    import pytest
    import torch
    from torch import nn

    from kdforge.errors import CheckpointError
    from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig

    class DeepSpeedEngine(nn.Module):  # matched by class name, like the real engine
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    class FakeAccelerator:
        num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

        def prepare(self, *objs):
            return (DeepSpeedEngine(objs[0]), *objs[1:])

    data = [{"inputs": torch.zeros(4), "labels": torch.tensor(0)}] * 4
    kwargs = dict(task=ClassificationTask(), objective=[LossTerm("cross_entropy", 1.0)], train_data=data,
                  accelerator=FakeAccelerator())
    with pytest.raises(CheckpointError, match="DeepSpeed") as err:
        Distiller(nn.Linear(4, 3), config=TrainConfig(max_steps=1, batch_size=2, save_every=1, progress=False),
                  **kwargs)
    assert "fsdp" in err.value.fix
    Distiller(nn.Linear(4, 3), config=TrainConfig(max_steps=1, batch_size=2, progress=False), **kwargs)
