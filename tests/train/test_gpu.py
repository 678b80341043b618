"""CUDA-only checks (skipped without a GPU): bf16 autocast, teacher in bf16, exact resume with CUDA RNG."""

import pytest
import torch

from kdforge.train import Callback, CausalLMTask, Distiller, LossTerm, TrainConfig

from ._tiny import TokenDataset, pad_collate, tiny_llama


def _run(out_dir, callbacks=(), max_steps=6):
    teacher = tiny_llama(1, head_scale=4.0).to("cuda", torch.bfloat16)
    student = tiny_llama(2)
    student.config.attention_dropout = 0.1
    return Distiller(student, teacher, task=CausalLMTask(), collate_fn=pad_collate(),
                     objective=[LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 0.1)],
                     config=TrainConfig(max_steps=max_steps, batch_size=4, grad_accum_steps=2, lr=1e-3,
                                        mixed_precision="bf16", save_every=3, output_dir=str(out_dir),
                                        progress=False, log_every=1),
                     train_data=TokenDataset(n=16), eval_data=TokenDataset(n=8), callbacks=callbacks)


@pytest.mark.gpu
def test_bf16_on_cuda_trains_with_a_bf16_teacher_and_resumes_exactly(tmp_path):
    ref = _run(tmp_path / "ref")
    before = ref.evaluate()["eval/kl_to_teacher"]
    ref.train()
    assert next(ref.unwrapped_student.parameters()).device.type == "cuda"
    assert next(ref.teacher.parameters()).dtype == torch.bfloat16
    assert ref.evaluate()["eval/kl_to_teacher"] < before

    class Stop(RuntimeError):
        pass

    class CrashAt4(Callback):
        def on_step_end(self, state, logs):
            if state.step == 4:
                raise Stop

    with pytest.raises(Stop):
        _run(tmp_path / "run", callbacks=[CrashAt4()]).train()
    resumed = _run(tmp_path / "run")
    resumed.train(resume=True)
    for a, b in zip(ref.unwrapped_student.parameters(), resumed.unwrapped_student.parameters()):
        assert torch.equal(a, b)
