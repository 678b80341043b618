"""Run under torchrun (2 CPU processes): the guard rails take the same branch on every process.

usage: torchrun --nproc_per_node 2 _guard_worker.py OUT_DIR

Rows are handed out round-robin (rank r gets rows r, r+2, ...; batch size 2 per process), so:
batch 1 is empty on rank 1 only (kept: rank 0 has positions), batch 2 is empty on both (that step
is dropped on both), and at step 3 rank 1's loss turns NaN (``on_nonfinite: skip``: both skip).
Each rank writes what it saw to ``OUT_DIR/rank<R>.json``.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train._tiny import tiny_llama  # noqa: E402

from kdforge.train import CausalLMTask, Distiller, TrainConfig  # noqa: E402
from kdforge.train.objective import ObjectiveValue  # noqa: E402
from kdforge.train.sampler import EpochSampler  # noqa: E402

EMPTY_ON_RANK1 = {5, 7}  # batch 1 of rank 1
EMPTY_ON_BOTH = {8, 9, 10, 11}  # batch 2 of both
NAN_STEP = 3


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        self.ids = torch.randint(3, 64, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        empty = i in EMPTY_ON_BOTH or i in EMPTY_ON_RANK1
        labels = torch.full_like(self.ids[i], -100) if empty else self.ids[i].clone()
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    compute = Distiller.compute_loss

    def nan_on_rank1(self, batch, normalizer):  # a loss that overflows on one process only
        value = compute(self, batch, normalizer)
        if rank == 1 and self.state.step + 1 == NAN_STEP:
            nan = torch.tensor(float("nan"))
            value = ObjectiveValue(value.total * nan, {k: v * nan for k, v in value.terms.items()})
        return value

    Distiller.compute_loss = nan_on_rank1
    data = Rows()
    d = Distiller(tiny_llama(seed=1, vocab=64), None, task=CausalLMTask(),
                  objective=[{"name": "cross_entropy", "weight": 1.0}],
                  config=TrainConfig(max_steps=4, batch_size=2, lr=1e-2, progress=False, on_nonfinite="skip"),
                  train_data=data, sampler=EpochSampler(len(data), shuffle=False, num_replicas=2, rank=rank))
    state = d.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in d.unwrapped_student.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "step": state.step, "batch_in_epoch": state.batch_in_epoch, "positions_seen": state.positions_seen,
        "empty_skipped": d.empty_batches.skipped, "nonfinite_skipped": d.finite_guard.skipped,
        "weights": digest.hexdigest(), "finite": all(bool(torch.isfinite(p).all()) for p in d.student.parameters()),
    }))


if __name__ == "__main__":
    main()
