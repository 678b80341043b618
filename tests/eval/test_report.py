"""Report generation from synthetic run folders: files, numbers, headline, edge cases."""

from __future__ import annotations

import json

import pytest

from kdforge.cli.main import main
from kdforge.errors import DataError
from kdforge.eval.report import build_report
from kdforge.eval.report.runs import load_run, merge_runs
from kdforge.eval.report.summary import hacking_onsets, headline

from ._runs import write_run


def test_report_writes_html_markdown_and_figures_with_the_expected_numbers(built):
    _, paths = built
    html = paths.html.read_text()
    md = paths.markdown.read_text()
    for text in (html, md):
        assert "83.7% ± 0.2" in text  # best student, mean ± std over seeds
        assert "82.0% ± 0.2" in text  # baseline
        assert "+1.7 pts over labels only" in text
        assert "40× smaller than the teacher" in text
        assert "8.0× faster" in text
        assert "T-shirt" in text  # per-class breakdown
    assert {p.name for p in paths.figures} == {"tradeoff.png", "curves.png", "reliability.png",
                                                "breakdown-0.png"}
    for p in paths.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{p.name}" in md
    assert html.count("data:image/svg+xml;base64,") == 4


def test_html_is_self_contained(built):
    html = built[1].html.read_text()
    for needle in ('src="http', "src='http", 'href="http', "url(http", "@import", "<link"):
        assert needle not in html


def test_headline_picks_best_student_and_judges_seed_noise(tmp_path):
    run = load_run(write_run(tmp_path / "fm"))
    h = headline(run)
    assert h is not None and h.best.name == "KD T=2 a=0.5"
    assert "exceeds 2 standard errors" in (h.verdict or "")
    # make the gain tiny: now it is within noise
    for m in run.models:
        if m.role == "student":
            m.metrics["accuracy"] = 0.8199
    h2 = headline(run)
    assert "within seed noise" in (h2.verdict or "")


def test_lower_is_better_primary_metric_picks_the_smallest(tmp_path):
    root = tmp_path / "lm"
    root.mkdir()
    (root / "results.json").write_text(json.dumps({
        "primary_metric": "perplexity", "higher_is_better": False, "models": [
            {"name": "teacher", "role": "teacher", "params": 134_500_000, "metrics": {"perplexity": 62.0}},
            {"name": "CE only", "role": "baseline", "params": 49_600_000, "metrics": {"perplexity": 304.6}},
            {"name": "KD top-64", "role": "student", "params": 49_600_000, "metrics": {"perplexity": 244.2}},
            {"name": "bad KD", "role": "student", "params": 49_600_000, "metrics": {"perplexity": 400.0}},
        ]}))
    h = headline(load_run(root))
    assert h.best.name == "KD top-64"
    assert "19.8% lower perplexity than CE only" in h.text
    assert "2.7× smaller than the teacher" in h.text


def test_teacher_hacking_is_detected_from_curves_and_shown(built, tmp_path):
    run, paths = built
    assert hacking_onsets(load_run(run)) == {"KD T=2 a=0.5": 200}
    assert "Possible teacher hacking" in paths.html.read_text()
    assert "Possible teacher hacking" in paths.markdown.read_text()
    assert hacking_onsets(load_run(write_run(tmp_path / "clean"))) == {}


def test_logged_teacher_hacking_flags_are_used(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    recs = [{"step": 1, "split": "train", "loss": 2.0},
            {"step": 5, "split": "eval", "eval/kl_to_teacher": 1.0, "eval/teacher_hacking": 0.0},
            {"step": 9, "split": "eval", "eval/kl_to_teacher": 0.9, "eval/teacher_hacking": 1.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert hacking_onsets(load_run(d)) == {"bare": 9}


def test_curves_only_run_without_results_json_and_torn_last_line(tmp_path):
    d = tmp_path / "live"
    (d / "seed0").mkdir(parents=True)
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / (s + 1)}) for s in range(5)]
    (d / "seed0" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "spl')
    paths = build_report([d], tmp_path / "r.html")
    assert paths.html.name == "r.html" and paths.markdown.name == "r.md"
    assert "curves only" in paths.html.read_text()
    assert [p.name for p in paths.figures] == ["curves.png"]


def test_several_run_folders_sharing_a_metric_merge_into_one_table(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    groups = merge_runs([load_run(a), load_run(b)])
    assert len(groups) == 1
    names = [m.name for m in groups[0].models]
    assert names.count("teacher CNN") == 1  # identical teacher kept once
    assert "KD T=2 a=0.5 (b)" in names


def test_missing_or_empty_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither results.json"):
        build_report([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_run(bad)


def test_cli_report_prints_the_output_path(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run / "report" / "report.html") in out
    assert (run / "report" / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runs_with_different_primary_metrics_stay_separate_sections(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "results.json").write_text(json.dumps({
        "primary_metric": "perplexity", "higher_is_better": False, "models": [
            {"name": "s", "role": "student", "metrics": {"perplexity": float("nan"), "nll": None}}]}))
    groups = merge_runs([load_run(write_run(tmp_path / "fm")), load_run(lm)])
    assert [g.primary_metric for g in groups] == ["accuracy", "perplexity"]
    student = groups[1].models[0]
    assert student.value("perplexity") is None  # NaN is "no value", shown as a dash
    assert headline(groups[1]) is None


def test_augmentation_grids_saved_beside_students_are_shown(tmp_path):
    import base64
    import re

    from kdforge.train.hard import save_augmentation_grid

    root = write_run(tmp_path / "fm")
    import torch

    for seed in (1, 0):  # only the lowest seed's grid is shown
        save_augmentation_grid(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8),
                               root / "students" / "hard-search" / f"seed-{seed}" / "hard_grid.png", columns=4)
    paths = build_report([root], tmp_path / "out")
    assert "image-0.png" in {p.name for p in paths.figures}
    html, md = paths.html.read_text(), paths.markdown.read_text()
    assert "hard-search: hard_grid.png" in html and "figures/image-0.png" in md
    svgs = [base64.b64decode(s).decode() for s in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", html)]
    shown = [s for s in svgs if "data:image/png;base64," in s]
    assert len(shown) == 1
    png = (root / "students" / "hard-search" / "seed-0" / "hard_grid.png").read_bytes()
    assert base64.b64encode(png).decode() in shown[0]


def test_a_reference_model_is_shown_as_such_and_never_marked_best(tmp_path, caplog):
    """``role: reference`` (an off-the-shelf model, the untrained student): listed after the
    students with its own role, no "unknown role" warning, and not a contender for best/headline."""
    root = write_run(tmp_path / "fm")
    res = json.loads((root / "results.json").read_text())
    res["models"].append({"name": "off-the-shelf", "role": "reference", "params": 20_490,
                          "metrics": {"accuracy": 0.95, "ece": 0.001}})
    (root / "results.json").write_text(json.dumps(res))
    with caplog.at_level("WARNING"):
        run = load_run(root)
    assert "unknown role" not in caplog.text
    assert [m.role for m in run.models][-1] == "reference"
    assert headline(run).best.name == "KD T=2 a=0.5"  # 0.95 is higher, but it was not trained here
    paths = build_report([root], tmp_path / "rep")
    html = paths.html.read_text()
    assert '<span class="role reference">reference</span>' in html
    row = html[html.index('<td data-v="off-the-shelf">'):]
    row = row[: row.index("</tr>")]
    assert 'class="best"' not in row  # its 0.95 accuracy is not marked best
    assert 'class="best"' in html
