"""Fixtures shared by the eval tests."""

from __future__ import annotations

import pytest

from kdforge.eval.report import build_report

from ._runs import write_run


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One full report from a synthetic 3-seed run with teacher hacking in one student.

    Rendering the figures is the slow part, so the report tests and the browser tests share it.
    Returns ``(run_dir, ReportPaths)``.
    """
    root = tmp_path_factory.mktemp("report")
    run = write_run(root / "fm", hacking=True)
    return run, build_report([run], root / "out")
