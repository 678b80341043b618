"""Token alignment through character offsets: hand-made tokenizations with known offsets, an
invariant property over random segmentations, and two real tokenizers trained here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, ShapeError
from kdforge.teachers.alignment import align_offsets

BOS = (0, 0)
# "hello world": student cuts "hello" | " world", teacher "hel" | "lo" | " world"
STUDENT = [BOS, (0, 5), (5, 11)]
TEACHER = [BOS, (0, 3), (3, 5), (5, 11)]


def test_hand_made_merge_pairs_group_starts_and_folds_the_split_token():
    a = align_offsets(STUDENT, TEACHER, policy="merge")
    # student loss positions: 0 predicts "hello", 1 predicts " world"
    # teacher loss positions: 0 predicts "hel", 1 "lo", 2 " world"
    assert a.mask.tolist() == [[True, True]]
    assert a.teacher_pos.tolist() == [[0, 2]]
    assert a.one_to_one.tolist() == [[False, True]]
    assert a.student_merge.tolist() == [[-1, -1]]
    assert a.teacher_merge.tolist() == [[-1, 0, -1]]  # "lo" (predicted at 1) folds into "hel"'s position 0


def test_hand_made_skip_keeps_only_one_to_one_groups():
    a = align_offsets(STUDENT, TEACHER, policy="skip")
    assert a.mask.tolist() == [[False, True]]
    assert a.teacher_pos[0, 1].item() == 2
    assert a.teacher_merge.tolist() == [[-1, -1, -1]]


def test_crossing_cuts_make_one_group_on_both_sides():
    # "abcdef": student "ab" | "cdef", teacher "abc" | "def" -> one group, two tokens each side
    s = [BOS, (0, 2), (2, 6)]
    t = [BOS, (0, 3), (3, 6)]
    a = align_offsets(s, t, policy="merge")
    assert a.mask.tolist() == [[True, False]]
    assert a.teacher_pos[0, 0].item() == 0
    assert a.student_merge.tolist() == [[-1, 0]]
    assert a.teacher_merge.tolist() == [[-1, 0]]
    assert align_offsets(s, t, policy="skip").mask.sum().item() == 0


def test_wordpiece_gaps_and_byte_pieces_and_padding():
    # "hi yo": student WordPiece-like (spaces uncovered), teacher byte-level with two pieces of "yo"
    # sharing the character offsets of one character, plus right padding on the student side
    s = [BOS, (0, 2), (3, 5), (0, 0), (0, 0)]
    s_mask = [1, 1, 1, 0, 0]
    t = [BOS, (0, 2), (2, 4), (4, 5), (4, 5)]
    a = align_offsets(s, t, student_mask=[s_mask], policy="merge")
    # groups: "hi"<->"hi" (end 2), "yo"<->" y","o","o" (end 5: only the last byte piece closes it)
    assert a.mask.tolist() == [[True, True, False, False]]
    assert a.teacher_pos[0, :2].tolist() == [0, 1]
    assert a.one_to_one[0, :2].tolist() == [True, False]
    assert a.teacher_merge.tolist() == [[-1, -1, 1, 1]]


def test_first_text_token_needs_a_context_on_both_sides():
    s = [BOS, (0, 5), (5, 11)]
    t = [(0, 5), (5, 11)]  # the teacher has no BOS: nothing predicts its first token
    a = align_offsets(s, t, policy="skip")
    assert a.mask.tolist() == [[False, True]] and a.teacher_pos[0, 1].item() == 0


def test_tail_beyond_the_last_shared_boundary_is_unpaired():
    # the teacher's text was truncated inside the last student token
    a = align_offsets([BOS, (0, 5), (5, 11)], [BOS, (0, 5), (5, 8)], policy="merge")
    assert a.mask.tolist() == [[True, False]]


def test_errors_name_the_fix():
    with pytest.raises(ConfigError, match="span_policy"):
        align_offsets(STUDENT, TEACHER, policy="average")
    with pytest.raises(ShapeError, match="backwards"):
        align_offsets([BOS, (3, 5), (0, 3)], TEACHER)
    with pytest.raises(ShapeError, match=r"\[B, T, 2\]"):
        align_offsets(torch.zeros(2, 3, 2), torch.zeros(1, 4, 2))


def _segment(n: int, cuts: set[int], bos: bool) -> list[tuple[int, int]]:
    edges = [0, *sorted(c for c in cuts if 0 < c < n), n]
    return ([BOS] if bos else []) + [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _context_end(offsets: list[tuple[int, int]], pos: int) -> int:
    return max(e for _, e in offsets[: pos + 1])


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 30), s_cuts=st.sets(st.integers(1, 29)), t_cuts=st.sets(st.integers(1, 29)),
       policy=st.sampled_from(["merge", "skip"]))
def test_property_pairs_share_their_context_and_targets(n, s_cuts, t_cuts, policy):
    s, t = _segment(n, s_cuts, True), _segment(n, t_cuts, True)
    a = align_offsets(s, t, policy=policy)
    shared = ({c for c in s_cuts if c < n} & {c for c in t_cuts if c < n}) | {n}
    pairs = [(p, a.teacher_pos[0, p].item()) for p in range(len(s) - 1) if a.mask[0, p]]
    for p, u in pairs:  # same text before, and the next span starts at the same character
        assert _context_end(s, p) == _context_end(t, u)
        assert s[p + 1][0] == t[u + 1][0]
    ones = [(p, u) for p, u in pairs if a.one_to_one[0, p]]
    for p, u in ones:
        assert s[p + 1] == t[u + 1]
    if policy == "merge":
        assert len(pairs) == len(shared)  # one pair per group
        for side, merge in ((s, a.student_merge[0]), (t, a.teacher_merge[0])):
            firsts = set(merge[merge >= 0].tolist())
            for q in np.flatnonzero(merge.numpy() >= 0):  # a later token folds into its group's start
                first = merge[q].item()
                assert first < q and first in firsts
                assert not any(side[first + 1][1] <= c < side[q + 1][1] for c in shared)  # same group
        assert int((a.student_merge[0] >= 0).sum()) == len(s) - 1 - len(shared)
    else:
        assert len(pairs) == len(ones)


def _bpe_and_wordpiece():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.", "Emma Woodhouse, handsome, clever, and rich."] * 10
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"],
                                                      show_progress=False))
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.Lowercase()
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=90, special_tokens=["[UNK]", "[BOS]"],
                                                           show_progress=False))
    return (PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>"),
            PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", bos_token="[BOS]"))


def test_real_bpe_and_wordpiece_tokenizers_pair_identical_words():
    bpe, wp = _bpe_and_wordpiece()
    text = "It is a truth universally acknowledged, that a single man must be in want of a wife."
    s = bpe(text, return_offsets_mapping=True, add_special_tokens=False)
    t = wp(text, return_offsets_mapping=True, add_special_tokens=False)
    s_off, t_off = [BOS, *s["offset_mapping"]], [BOS, *t["offset_mapping"]]
    a = align_offsets(s_off, t_off, policy="merge")
    assert a.num_groups >= 10  # every word boundary both tokenizers agree on
    for p in torch.nonzero(a.one_to_one[0]).flatten().tolist():
        u = a.teacher_pos[0, p].item()
        s_span, t_span = s_off[p + 1], t_off[u + 1]
        assert text[slice(*s_span)].strip().lower() == text[slice(*t_span)].strip().lower()
    assert a.one_to_one.sum() >= 1 and (a.mask & ~a.one_to_one).sum() >= 1
