"""kdforge.errors.from_os_error and the CLI's last line of defence against OSError.

The bad-input corpus (``_cases_os.py``) provokes each refusal through real writes; here the
mapping itself is checked for every errno (hypothesis), and an OSError that no kdforge code
caught (a library's own file access) still reaches the user as one error line and exit 2.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdforge.errors import DiskFullError, FileSystemError, KdforgeError, from_os_error
from kdforge.io import MAPPED_ERRNOS, os_errors

PATHS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-./", min_size=1, max_size=40)


@given(code=st.sampled_from(sorted(errno.errorcode)), path=PATHS, doing=st.sampled_from(["writing", "reading"]))
def test_every_os_error_becomes_a_file_system_error_naming_the_path_and_a_fix(code, path, doing):
    err = from_os_error(OSError(code, os.strerror(code), path), doing=doing)
    assert isinstance(err, FileSystemError) and isinstance(err, KdforgeError)
    assert type(err) is (DiskFullError if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else FileSystemError)
    assert path in err.problem and f"while {doing}" in err.problem
    assert err.fix and err.path == path and err.errno == code


@pytest.mark.parametrize(("code", "words"), [
    (errno.EACCES, ("permission denied", "write permission")), (errno.EPERM, ("not permitted", "chmod")),
    (errno.EROFS, ("read-only", "writable disk")), (errno.EISDIR, ("a folder is where a file", "rename the folder")),
    (errno.ENOTDIR, ("a file is where a folder", "file in the way")), (errno.EMFILE, ("too many open files", "ulimit")),
    (errno.ENFILE, ("on this system", "file-max")), (errno.ENOSPC, ("disk full", "free disk space")),
])
def test_each_refusal_has_its_own_words(code, words):
    err = from_os_error(OSError(code, os.strerror(code)), "out/results.json")
    text = f"{err.problem} {err.fix}".lower()
    assert all(w in text for w in words), text


def test_os_errors_maps_only_the_environments_refusals():
    with pytest.raises(FileSystemError, match="read-only file system while testing x"), os_errors("testing", "x"):
        raise OSError(errno.EROFS, "Read-only file system")
    # a missing input is the caller's to explain
    with pytest.raises(FileNotFoundError), os_errors("testing", "x"):
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")
    assert errno.ENOENT not in MAPPED_ERRNOS


@pytest.mark.parametrize("exc", [PermissionError(errno.EACCES, "Permission denied", "/srv/data.txt"),
                                 OSError("a library's message without an errno")])
def test_an_os_error_no_kdforge_code_caught_is_one_line_and_exit_2(exc, monkeypatch, capsys):
    from kdforge.cli import main as cli_main
    from kdforge.cli import report

    def boom(args):
        raise exc

    monkeypatch.setattr(report, "handle", boom)
    assert cli_main.main(["report", "anything"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdforge: error: ") and "\n  Fix: " in err and "Traceback" not in err
    assert ("/srv/data.txt" in err) if exc.errno else ("a library's message" in err)
    with pytest.raises(type(exc)):  # --debug shows the real exception
        cli_main.main(["--debug", "report", "anything"])
