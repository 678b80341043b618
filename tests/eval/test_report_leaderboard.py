"""The compare recipe's leaderboard.json is shown in the HTML and Markdown report."""

from __future__ import annotations

import json

from kdforge.eval.report import build_report
from kdforge.eval.report.leaderboard import leaderboard_table
from kdforge.eval.report.runs import load_run

from ._runs import write_run

BOARD = {
    "metric": "accuracy", "higher_is_better": True, "baseline": "labels only", "reference": "KD T=2 a=0.5",
    "seeds": [0, 1, 2],
    "rows": [
        {"method": "KD T=2 a=0.5", "role": "student", "teacher": "cached", "mean": 0.8552, "std": 0.0047,
         "ece": 0.036, "ece_std": 0.0023, "cost": {"cpu_s_per_step": 0.017, "peak_rss_mb": 875.2},
         "vs_baseline": {"mean": 0.0147, "std": 0.0018, "wins": 3, "losses": 0, "ties": 0, "sign_p": 0.25},
         "vs_reference": None},
        {"method": "labels only", "role": "baseline", "teacher": "cached", "mean": 0.8406, "std": 0.003,
         "ece": 0.0484, "ece_std": 0.0037, "cost": {"cpu_s_per_step": 0.0175, "peak_rss_mb": 875.0},
         "vs_baseline": None,
         "vs_reference": {"mean": -0.0147, "std": 0.0018, "wins": 0, "losses": 3, "ties": 0, "sign_p": 0.25}},
    ],
}


def test_table_cells_by_hand():
    headers, rows = leaderboard_table(BOARD)
    assert headers[3] == "accuracy % (3 seeds)" and headers[4].startswith("Δ vs labels only")
    assert rows[0] == ["1", "KD T=2 a=0.5", "cached", "85.52 ± 0.47", "+1.47 ± 0.18 (3/0/0, p=0.25)", "–",
                       "3.60 ± 0.23", "17.0", "875"]
    assert rows[1][4] == "–" and rows[1][5] == "-1.47 ± 0.18 (0/3/0, p=0.25)"


def test_report_shows_the_leaderboard_of_a_compare_run(tmp_path):
    root = write_run(tmp_path / "cmp")
    (root / "leaderboard.json").write_text(json.dumps(BOARD))
    assert load_run(root).leaderboards == [BOARD]
    paths = build_report([root], tmp_path / "report")
    html, md = paths.html.read_text(), paths.markdown.read_text()
    for text in (html, md):
        assert "Leaderboard (paired over seeds)" in text
        assert "+1.47 ± 0.18 (3/0/0, p=0.25)" in text
    plain = write_run(tmp_path / "plain")
    assert load_run(plain).leaderboards == []
    assert "Leaderboard" not in build_report([plain], tmp_path / "r2").html.read_text()
