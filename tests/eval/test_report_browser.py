"""The HTML report in a real headless browser (Debian's Chromium): renders, runs its script
without console errors, loads every figure, shows the expected numbers, fits a phone screen.

Needs ``/usr/bin/chromium`` (``apt-get update && apt-get install -y chromium``); set
``KDFORGE_SKIP_BROWSER_TESTS=1`` to skip where no browser can be installed. Chromium is driven
by its command line (``--dump-dom``, ``--screenshot``, console messages on stderr), so no extra
Python dependency is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("KDFORGE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
         "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def chromium() -> str:
    if os.environ.get("KDFORGE_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("KDFORGE_SKIP_BROWSER_TESTS=1")
    path = shutil.which(CHROMIUM)
    if path is None:
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it with "
            "`apt-get update && apt-get install -y chromium` (or set KDFORGE_CHROMIUM to its path, "
            "or KDFORGE_SKIP_BROWSER_TESTS=1 to skip the browser tests)"
        )
    return path


def _run(chromium: str, tmp_path: Path, html: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_without_console_errors_and_shows_the_numbers(chromium, built, tmp_path):
    _, paths = built
    proc = _run(chromium, tmp_path, paths.html, "--window-size=1280,900", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert _console_lines(proc.stderr) == []
    assert 'data-report-ready="1"' in dom  # the inline script ran to the end
    assert 'data-images-loaded="4/4"' in dom  # every embedded figure decoded
    text = re.sub(r"<[^>]+>", " ", dom)
    for needle in ("83.7% ± 0.2", "82.0% ± 0.2", "+1.7 pts over labels only",
                   "40× smaller than the teacher", "Possible teacher hacking", "T-shirt"):
        assert needle in text


def test_report_fits_a_phone_screen_without_page_level_horizontal_scroll(chromium, built, tmp_path):
    proc = _run(chromium, tmp_path, built[1].html, "--window-size=390,844", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-page-overflow="0"' in proc.stdout
    assert _console_lines(proc.stderr) == []


def test_console_errors_would_be_caught(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><p>x</p><script>undefinedFunction();</script>")
    proc = _run(chromium, tmp_path, page, "--dump-dom")
    assert any("undefinedFunction" in line for line in _console_lines(proc.stderr))


def test_screenshot_shows_a_non_blank_page(chromium, built, tmp_path):
    shot = tmp_path / "report.png"
    proc = _run(chromium, tmp_path, built[1].html, "--window-size=1280,2000", f"--screenshot={shot}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2000)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels[..., :3].std() > 0.05  # not a blank page
