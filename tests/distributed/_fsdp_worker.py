"""FSDP2 (``fully_shard``) on CPU with gloo: checkpoint through kdforge's writer, resume, compare.

Usage (2 processes): ``python -m torch.distributed.run --nproc_per_node 2 _fsdp_worker.py PHASE OUT``

* ``save``: train 3 AdamW steps, write ``OUT/ckpt/step-3`` with :class:`CheckpointWriter` from
  :func:`gather_model_state` / :func:`gather_optimizer_state` (collectives), also keep rank 0's
  own ``optimizer.state_dict()`` (what a rank-0-only writer saves) in ``OUT/rank0-local-optim.pt``;
  train 3 more steps; write the full final weights to ``OUT/final-save.safetensors``.
* ``resume`` (new processes): a fresh, differently initialised sharded model and optimizer;
  restore ``step-3`` with :func:`restore_model_state` / :func:`restore_optimizer_state`; train the
  same 3 steps; write ``OUT/final-resume.safetensors``. Then the control, in fresh modules again:
  the same but with the rank-0-only optimizer state loaded on every rank -> ``final-naive``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(48, 8, generator=g), torch.randn(48, 4, generator=g)
    rank, world = dist.get_rank(), dist.get_world_size()
    for i in steps:
        x, y = x_all[i * 8: (i + 1) * 8], y_all[i * 8: (i + 1) * 8]
        x, y = x[rank::world], y[rank::world]
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> int:
    from kdforge.train.checkpoint import (
        CheckpointWriter,
        LoadedCheckpoint,
        gather_model_state,
        gather_optimizer_state,
        is_fully_sharded,
        restore_model_state,
        restore_optimizer_state,
    )

    torch.set_num_threads(1)
    phase, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if phase == "resume":  # the real resume, then the control, each in fresh modules
        for variant in ("resume", "naive"):
            model, opt = build(seed=123)
            ckpt = LoadedCheckpoint(out / "ckpt" / "step-3")
            restore_model_state(model, ckpt.student_state())
            if variant == "resume":
                restore_optimizer_state(model, opt, ckpt.optimizer_state(), ckpt.optimizer_format)
            else:  # every rank loads the optimizer state rank 0 alone would have saved
                opt.load_state_dict(torch.load(out / "rank0-local-optim.pt", weights_only=False))
            train(model, opt, range(3, 6))
            final = gather_model_state(model)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in final.items()}, out / f"final-{variant}.safetensors")
            dist.barrier()
        dist.destroy_process_group()
        return 0
    model, opt = build(seed=0)
    assert is_fully_sharded(model)
    if phase == "save":
        train(model, opt, range(0, 3))
        writer = CheckpointWriter(out / "ckpt", 3)
        if rank == 0:
            writer.begin()
        dist.barrier()
        writer.write_rng(rank)
        weights = gather_model_state(model)
        fmt, optim_state = gather_optimizer_state(model, opt)
        local = opt.state_dict()
        if rank == 0:
            torch.save(local, out / "rank0-local-optim.pt")
            writer.write_main(student_state=weights, extras_state=None, optimizer=opt, scheduler=None, scaler=None,
                              trainer_state={"step": 3, "optimizer_format": fmt}, optimizer_state=optim_state)
            writer.publish()
            shapes = {name: {k: list(v.shape) for k, v in s.items() if torch.is_tensor(v) and v.ndim}
                      for name, s in optim_state["state"].items()}
            local_shapes = {str(i): {k: list(v.to_local().shape) for k, v in s.items()
                                     if hasattr(v, "to_local") and v.ndim}
                            for i, s in local["state"].items()}
            (out / "saved.json").write_text(json.dumps({"format": fmt, "full_shapes": shapes,
                                                        "rank0_local_shapes": local_shapes}))
        dist.barrier()
    train(model, opt, range(3, 6))
    final = gather_model_state(model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in final.items()}, out / f"final-{phase}.safetensors")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from _teardown import (
        exit_without_native_teardown,  # the launched script's folder is on sys.path
    )

    exit_without_native_teardown(main())
