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
