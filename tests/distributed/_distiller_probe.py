"""Launch probe for the trainer: build a ``Distiller`` with its *own* accelerator and train 2 steps.

Usage: ``python tests/distributed/_distiller_probe.py OUT_DIR`` under any launcher. Writes
``OUT_DIR/rank<R>-pid<PID>.json`` with the group the Distiller's accelerator formed, or the
``DeviceError`` it raised (exit status 3).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


class Points(Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


def main() -> int:
    from kdforge.errors import DeviceError
    from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    info: dict = {"error": None}
    code = 0
    try:
        d = Distiller(nn.Linear(4, 3), nn.Linear(4, 3), task=ClassificationTask(),
                      objective=[LossTerm("forward_kl", 1.0)],
                      config=TrainConfig(max_steps=2, batch_size=2, progress=False, output_dir=str(out / "run")),
                      train_data=Points())
        d.train()
        acc = d.accelerator
        info.update(num_processes=acc.num_processes, rank=acc.process_index, steps=d.state.step,
                    backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)
    except DeviceError as exc:
        info["error"] = str(exc)
        code = 3
    (out / f"rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.json").write_text(json.dumps(info))
    return code


if __name__ == "__main__":
    from _teardown import (
        exit_without_native_teardown,  # the launched script's folder is on sys.path
    )

    exit_without_native_teardown(main())
