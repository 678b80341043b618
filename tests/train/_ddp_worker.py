"""Run under torchrun (2 CPU processes) or plainly (1 process); saves the student after 2 steps.

usage: python _ddp_worker.py OUT.safetensors BATCH_SIZE
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402
from tests.train._tiny import BagLM, TokenDataset, pad_collate  # noqa: E402

from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig  # noqa: E402


def main() -> None:
    out, batch_size = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student, teacher = BagLM(), BagLM(scale=4.0)
    d = Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                  objective=[LossTerm("forward_kl", 0.8), LossTerm("cross_entropy", 0.2)],
                  config=TrainConfig(max_steps=2, batch_size=batch_size, lr=1e-2, max_grad_norm=None,
                                     progress=False, log_every=1),
                  train_data=TokenDataset(n=16, min_len=3, max_len=14))
    state = d.train()
    if d.accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in d.unwrapped_student.state_dict().items()}, out)
        Path(out + ".txt").write_text(f"{d.accelerator.num_processes} {state.positions_seen} {state.last_logs['loss']}")


if __name__ == "__main__":
    from tests.distributed._teardown import exit_without_native_teardown

    main()
    exit_without_native_teardown(0)  # gloo's native teardown aborts ~1 run in 2 here, after the files are written
