"""austen-chat: chat rows derived from the Austen novels (the derivation, on synthetic text)."""

from __future__ import annotations

import json

from kdforge.assets import austen_chat


def _para(i: int, words: int) -> str:
    return " ".join(f"p{i}w{j}" for j in range(words))


def test_conversations_pair_consecutive_paragraphs_of_bounded_length():
    paragraphs = [_para(0, 30), _para(1, 25), _para(2, 5), _para(3, 40), _para(4, 200), _para(5, 22), _para(6, 21)]
    # hard-wrapped lines inside a paragraph are rejoined (the package .txt rule)
    text = "\n\n".join(p.replace(" p", "\np", 3) for p in paragraphs)
    rows = austen_chat.conversations("emma", "Emma", text)
    kept = [_para(i, n) for i, n in [(0, 30), (1, 25), (3, 40), (5, 22)]]  # 5 and 200 words are dropped
    assert [r["messages"][1]["content"] for r in rows] == [kept[1], kept[3]]
    assert [r["messages"][0]["content"] for r in rows] == [
        f"Continue this passage from Jane Austen's Emma:\n\n{kept[0]}",
        f"Continue this passage from Jane Austen's Emma:\n\n{kept[2]}"]
    assert {r["book"] for r in rows} == {"emma"}
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    json.dumps(rows)  # rows are plain JSON
