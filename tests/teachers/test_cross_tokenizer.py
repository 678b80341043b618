"""Cross-tokenizer distillation end to end: two tokenizers trained here (different BPE merges),
two tiny models, the CrossTokenizerTeacher source, the collator and the fallback re-tokenization,
the vocabulary policy, and a few Distiller steps that lower the loss and raise agreement."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ConfigError, VocabMismatchError
from kdforge.losses import LOSSES
from kdforge.losses.uld import CrossVocabTeacher, shared_top1_agreement
from kdforge.teachers import (
    CrossTokenizerCollator,
    CrossTokenizerTeacher,
    OnlineTeacher,
    encode_texts,
)
from kdforge.teachers.crosstok import retokenize
from kdforge.teachers.vocab import align_signal
from kdforge.train import CausalLMTask, Distiller, LossTerm, TrainConfig

from .conftest import tiny_llama

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
    "some of the best blessings of existence.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood.",
    "She had lived nearly twenty-one years in the world with very little to distress or vex her.",
]


def _bpe(vocab_size: int, seed_text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([seed_text, *TEXTS] * 5, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizers():
    student = _bpe(300, "Mr. Darcy of Pemberley and Elizabeth Bennet walked on.")
    teacher = _bpe(420, "A very different text shapes very different merges of the letters.")
    return student, teacher


def test_the_two_tokenizers_really_differ(tokenizers):
    student, teacher = tokenizers
    s, t = student(TEXTS[0])["input_ids"], teacher(TEXTS[0])["input_ids"]
    assert len(s) != len(t)
    with pytest.raises(VocabMismatchError, match="CrossTokenizerTeacher"):
        from kdforge.teachers import check_vocab

        check_vocab(len(teacher), len(student), teacher_tokenizer=teacher, student_tokenizer=student)


def test_signal_is_the_teacher_gathered_at_aligned_student_positions(tokenizers):
    student_tok, teacher_tok = tokenizers
    teacher = tiny_llama(vocab_size=len(teacher_tok), seed=1)
    source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, span_policy="skip")
    batch = encode_texts(TEXTS[:2], student_tok, teacher_tok)
    sig = source.signal(batch, CausalLMTask())
    cross = sig.cross
    assert sig.kind == "cross" and isinstance(sig.distribution, CrossVocabTeacher)
    assert cross.logits.shape[:2] == batch["input_ids"][:, 1:].shape and cross.vocab_size == len(teacher_tok)
    full = OnlineTeacher(teacher).logits(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    a = source.last_alignment
    for b, p in torch.nonzero(a.mask).tolist():  # each compared position holds the paired teacher row
        assert torch.equal(cross.logits[b, p], full[b, a.teacher_pos[b, p]])
        # skip: both next tokens are the same text
        s_span = batch["student_offsets"][b, p + 1].tolist()
        t_span = batch["teacher_offsets"][b, a.teacher_pos[b, p] + 1].tolist()
        assert s_span == t_span
    assert a.mask.sum() >= 10


def test_merge_scale_is_the_teachers_probability_of_the_rest_of_the_span(tokenizers):
    student_tok, teacher_tok = tokenizers
    teacher = tiny_llama(vocab_size=len(teacher_tok), seed=1)
    source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, span_policy="merge")
    batch = encode_texts(TEXTS[:1], student_tok, teacher_tok)
    cross = source.signal(batch, CausalLMTask()).cross
    a = source.last_alignment
    lp = torch.log_softmax(OnlineTeacher(teacher).logits(batch["teacher_input_ids"]).float(), -1)[0, :-1]
    t_next = batch["teacher_input_ids"][0, 1:]
    checked = 0
    for p in torch.nonzero(a.mask[0]).flatten().tolist():
        u = a.teacher_pos[0, p].item()
        later = torch.nonzero(a.teacher_merge[0] == u).flatten()
        expected = lp[later, t_next[later]].sum()
        assert cross.log_scale[0, p].item() == pytest.approx(expected.item(), abs=1e-5)
        checked += len(later) > 0
    assert checked >= 1  # some span really was merged on the teacher side


def test_retokenize_recovers_the_collators_offsets_and_flags_lossy_rows(tokenizers, caplog):
    student_tok, teacher_tok = tokenizers
    batch = encode_texts(TEXTS[:3], student_tok, teacher_tok)
    again = retokenize(batch["input_ids"], batch["attention_mask"], student_tok, teacher_tok)
    for key in ("student_offsets", "teacher_input_ids", "teacher_offsets"):
        assert torch.equal(again[key], batch[key]), key
    # a row of ids the tokenizer would never produce for its own decoded text (split merges)
    odd = torch.tensor([[student_tok.convert_tokens_to_ids(c) for c in "truth"]])
    lossy = retokenize(odd, None, student_tok, teacher_tok)
    assert "do not re-encode" in caplog.text and lossy["student_offsets"].abs().sum() == 0


def test_vocab_policy_cross_tokenizer_refuses_a_plain_teacher_and_names_the_fix(tokenizers):
    from kdforge.teachers.signal import TeacherSignal

    sig = TeacherSignal(logits=torch.randn(1, 3, 7))
    with pytest.raises(ConfigError, match="CrossTokenizerTeacher"):
        align_signal(sig, vocab_size=5, positions=(1, 3), device=torch.device("cpu"), dtype=torch.float32,
                     policy="cross_tokenizer")
    with pytest.raises(VocabMismatchError, match="CrossTokenizerTeacher"):
        align_signal(sig, vocab_size=5, positions=(1, 3), device=torch.device("cpu"), dtype=torch.float32)


def _agreement(student, source, batch, loss: str) -> tuple[float, float]:
    task = CausalLMTask()
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        cross = source.signal(batch, task).cross
        loss = LOSSES.get(loss)(logits, cross, mask=batch["labels"][:, 1:] != -100).item()
    agree, counted = shared_top1_agreement(logits, cross, mask=source.last_alignment.one_to_one)
    return loss, agree / max(counted, 1)


@pytest.mark.parametrize("loss", ["gold", "uld"])
def test_distiller_steps_lower_the_loss_and_raise_agreement(tokenizers, tmp_path, loss):
    student_tok, teacher_tok = tokenizers
    teacher = tiny_llama(vocab_size=len(teacher_tok), seed=1)
    student = tiny_llama(vocab_size=len(student_tok), seed=2)
    source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, span_policy="merge")
    collate = CrossTokenizerCollator(student_tok, teacher_tok, max_length=48)
    batch = collate(TEXTS)
    loss0, agree0 = _agreement(student, source, batch, loss)
    cfg = TrainConfig(max_steps=30, batch_size=4, lr=1e-2, progress=False, log_every=10, seed=0,
                      output_dir=str(tmp_path))
    Distiller(student, source, task=CausalLMTask(), objective=[LossTerm(loss, 1.0)], config=cfg,
              train_data=TEXTS, collate_fn=collate, vocab_policy="cross_tokenizer").train()
    loss1, agree1 = _agreement(student, source, batch, loss)
    assert loss1 < (0.7 if loss == "gold" else 0.9) * loss0  # ULD matches only the sorted spectrum: slower
    if loss == "gold":  # the exact part pulls the student toward the teacher's tokens
        assert agree1 > agree0 + 0.2
