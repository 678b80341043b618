"""Bad-input rows: the operating system refuses (issue 16, item 3).

No permission, a read-only file system, a full disk or quota, a folder where a file belongs and the
reverse, too many open files: each must come out as a :class:`~kdforge.errors.FileSystemError`
(:class:`~kdforge.errors.DiskFullError` for a full disk) naming the path and the fix, from the
Python API and from the CLI (one line, exit 2), with earlier outputs byte-identical.

Faults are real where the machine allows it: a folder in place of ``results.json``, a file in
place of a folder, an ``RLIMIT_NOFILE`` lowered to the files already open, a ``chmod``'ed folder
when not running as root. The rest (tests often run as root, who ignores permissions; no
read-only mount is at hand) replace one ``os`` function with one that raises the ``OSError`` the
kernel would, with its errno, for the paths of interest only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kdforge.io as kio
from kdforge.errors import DiskFullError, FileSystemError

from ._corpus import Case, World, cli_case, distiller

# words each kind of fix must contain
PERMISSION = ("write permission", "chmod")
READ_ONLY = ("writable disk", "read-write")
FILES = ("ulimit", "num_workers")


def os_refuses(w: World, name: str, code: int, where: Callable[[str], bool] = lambda p: True,
               arg: int = 0) -> None:
    """From now on ``os.<name>`` raises ``OSError(code)`` (the kernel's subclass) when ``where`` holds
    for its ``arg``-th argument (a path; ``os.replace``'s destination is ``arg=1``)."""
    real = getattr(os, name)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        path = os.fspath(args[arg]) if len(args) > arg and isinstance(args[arg], str | os.PathLike) else ""
        if where(path):
            raise OSError(code, os.strerror(code), path)
        return real(*args, **kwargs)

    w.mp.setattr(os, name, refuse)


@contextlib.contextmanager
def open_file_limit_reached() -> Iterator[None]:
    """A real EMFILE: the soft ``RLIMIT_NOFILE`` lowered to the descriptors already open."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # the kernel hands out the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _previous_results(w: World) -> Path:
    return w.write("run/results.json", json.dumps({"accuracy": 0.91}) + "\n")


def _json_write_refused(name: str, code: int, arg: int = 0, match: str = "results.json"):
    """``write_json_atomic`` over an earlier ``results.json`` while ``os.<name>`` refuses."""

    def setup(w: World):
        results = _previous_results(w)

        def act():
            os_refuses(w, name, code, lambda p: match in p, arg)
            kio.write_json_atomic(results, {"accuracy": 0.12})

        return act, [results.parent]

    return setup


def _case_results_is_a_folder(w: World):
    (w.tmp / "run" / "results.json").mkdir(parents=True)  # real: EISDIR on rename
    earlier = w.write("run/results.md", "# earlier\n")
    return (lambda: kio.write_json_atomic(w.tmp / "run" / "results.json", {"a": 1})), [earlier]


def _case_parent_is_a_file(w: World):
    blocker = w.write("run", "a file, not a folder\n")  # real: ENOTDIR / EEXIST
    return (lambda: kio.write_json_atomic(w.tmp / "run" / "sub" / "results.json", {"a": 1})), [blocker]


def _case_output_folder_is_a_file(w: World):
    blocker = w.write("out", "a file, not a folder\n")
    return (lambda: kio.ensure_dir(blocker)), [blocker]


def _case_real_emfile(w: World):
    results = _previous_results(w)

    def act():
        with open_file_limit_reached():
            kio.write_json_atomic(results, {"accuracy": 0.12})

    return act, [results.parent]


def _case_chmod_read_only(w: World):
    """``chmod a-w`` on the folder (real when not root; as root, the kernel's EACCES is simulated)."""
    results = _previous_results(w)
    folder = results.parent

    def act():
        os.chmod(folder, 0o555)
        try:
            if os.geteuid() == 0:  # root writes anyway: make the OS answer as it would for a user
                os_refuses(w, "open", errno.EACCES, lambda p: p.startswith(str(folder)))
            kio.write_json_atomic(results, {"accuracy": 0.12})
        finally:
            os.chmod(folder, 0o755)

    return act, [results]


def _checkpoint_refused(name: str, code: int, match: str, arg: int = 0):
    """A run with a checkpoint at step 2 resumes to step 4; from step 3 on, ``os.<name>`` refuses."""

    def setup(w: World):
        from kdforge.train import Callback

        class RefuseAfterStep3(Callback):
            def on_step_end(self, state: Any, logs: Any) -> None:
                if state.step == 3:
                    os_refuses(w, name, code, lambda p: match in p, arg)

        out = w.tmp / "run"
        distiller(w, out=out, max_steps=2).train()
        d = distiller(w, out=out, max_steps=4, save_every=2, callbacks=[RefuseAfterStep3()])
        return (lambda: d.train(resume=True)), [out / "checkpoints" / "step-2"]

    return setup


def _metrics_log_refused(w: World):
    out = w.tmp / "run"
    distiller(w, out=out, max_steps=2).train()
    d = distiller(w, out=out, max_steps=4, save_every=2, log_every=1)
    log = out / "metrics.jsonl"
    real_open = open

    def act():
        import builtins

        def guarded(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            if "a" in mode and os.fspath(file) == str(log):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
            return real_open(file, mode, *a, **kw)

        w.mp.setattr(builtins, "open", guarded)
        try:
            d.train(resume=True)
        finally:
            w.mp.setattr(builtins, "open", real_open)

    return act, [out / "checkpoints" / "step-2"]


def _cache_shard_refused(code: int):
    """A cache build resumed after shard 0; writing shard 1 is refused."""

    def setup(w: World):
        from kdforge.teachers import build_teacher_cache

        out = w.tmp / "cache"

        class Stop(Exception):
            pass

        def stop_after_first(index: int, entry: dict) -> None:
            raise Stop

        with pytest.raises(Stop):
            build_teacher_cache(w.shared.teacher, w.shared.sequences, out, k=4, shard_size=4, batch_size=4,
                                on_shard=stop_after_first)

        def act():
            os_refuses(w, "replace", code, lambda p: p.endswith("shard-00001.kdc"), arg=1)
            try:
                build_teacher_cache(w.shared.teacher, w.shared.sequences, out, k=4, shard_size=4, batch_size=4)
            finally:
                assert not (out / ".build.lock").exists(), "a failed build must not leave its lock behind"

        return act, [out / "manifest.json", out / "shard-00000.kdc"]

    return setup


def _run_dir(w: World) -> str:
    """A finished run folder (metrics.jsonl only) that ``kdforge report`` can render."""
    w.write("run/metrics.jsonl", json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    return str(w.tmp / "run")


def _report_refused(name: str, code: int, match: str, arg: int = 0):
    def argv(w: World):
        run = _run_dir(w)
        os_refuses(w, name, code, lambda p: match in p, arg)
        return ["report", run, "-o", str(w.tmp / "rep")], [w.tmp / "run" / "metrics.jsonl"]

    return argv


def _report_into_a_file(w: World):
    run = _run_dir(w)
    blocker = w.write("rep", "a file\n")
    return ["report", run, "-o", str(blocker / "sub")], [blocker]


def _report_html_is_a_folder(w: World):
    run = _run_dir(w)
    (w.tmp / "rep" / "report.html").mkdir(parents=True)
    return ["report", run, "-o", str(w.tmp / "rep")], [w.tmp / "run" / "metrics.jsonl"]


def _report_emfile(w: World):
    run = _run_dir(w)
    os_refuses(w, "open", errno.EMFILE, lambda p: "rep" in p and p.endswith(".tmp"))
    return ["report", run, "-o", str(w.tmp / "rep")], [w.tmp / "run" / "metrics.jsonl"]


OS_CASES: list[Case] = [
    # ---- atomic writes (Python API): the previous file stays, no temp file is left ----------
    Case("os-permission-denied-on-rename", "os", FileSystemError, ("permission denied", "results.json"),
         PERMISSION, _json_write_refused("replace", errno.EACCES, arg=1)),
    Case("os-permission-denied-creating-temp", "os", FileSystemError, ("permission denied", "results.json"),
         PERMISSION, _json_write_refused("open", errno.EACCES, match="run")),
    Case("os-operation-not-permitted", "os", FileSystemError, ("not permitted", "results.json"), PERMISSION,
         _json_write_refused("replace", errno.EPERM, arg=1)),
    Case("os-read-only-file-system-on-rename", "os", FileSystemError, ("read-only file system", "results.json"),
         READ_ONLY, _json_write_refused("replace", errno.EROFS, arg=1)),
    Case("os-read-only-file-system-creating-temp", "os", FileSystemError, ("read-only", "results.json"),
         READ_ONLY, _json_write_refused("open", errno.EROFS, match="run")),
    Case("os-read-only-file-system-creating-folder", "os", FileSystemError, ("read-only", "creating the folder"),
         READ_ONLY, lambda w: ((lambda: (os_refuses(w, "mkdir", errno.EROFS),
                                         kio.write_json_atomic(w.tmp / "new" / "r.json", {}))), [])),
    Case("os-permission-denied-creating-folder", "os", FileSystemError, ("permission denied", "new"),
         PERMISSION, lambda w: ((lambda: (os_refuses(w, "mkdir", errno.EACCES),
                                          kio.ensure_dir(w.tmp / "new" / "deeper"))), [])),
    Case("os-chmod-read-only-folder", "os", FileSystemError, ("permission denied", "results.json"), PERMISSION,
         _case_chmod_read_only),
    Case("os-disk-quota-exceeded", "os", DiskFullError, ("quota", "results.json", "intact"), ("free disk space",),
         _json_write_refused("fsync", errno.EDQUOT, match="")),
    Case("os-disk-full-on-fsync", "os", DiskFullError, ("disk full", "results.json", "intact"),
         ("free disk space",), _json_write_refused("fsync", errno.ENOSPC, match="")),
    Case("os-results-path-is-a-folder", "os", FileSystemError, ("a folder is where a file", "results.json"),
         ("remove or rename the folder",), _case_results_is_a_folder),
    Case("os-parent-folder-is-a-file", "os", FileSystemError, ("a file is where a folder", "run"),
         ("remove or rename",), _case_parent_is_a_file),
    Case("os-output-folder-is-a-file", "os", FileSystemError, ("a file is where a folder", "out"),
         ("remove or rename the file",), _case_output_folder_is_a_file),
    Case("os-too-many-open-files-real", "os", FileSystemError, ("too many open files", "results.json"), FILES,
         _case_real_emfile),
    Case("os-too-many-open-files-system", "os", FileSystemError, ("too many open files on this system",),
         ("file-max",), _json_write_refused("open", errno.ENFILE, match="run")),
    # ---- checkpoints and training logs: the previous checkpoint stays usable ----------------
    Case("os-checkpoint-folder-permission-denied", "os", FileSystemError, ("permission denied", ".tmp-step-4"),
         PERMISSION, _checkpoint_refused("mkdir", errno.EACCES, ".tmp-step-4")),
    Case("os-checkpoint-publish-read-only", "os", FileSystemError, ("read-only", "step-4"), READ_ONLY,
         _checkpoint_refused("replace", errno.EROFS, "/step-4", arg=1)),
    Case("os-checkpoint-file-too-many-open-files", "os", FileSystemError, ("too many open files", "step-4"),
         FILES, _checkpoint_refused("open", errno.EMFILE, ".tmp-step-4")),
    Case("os-checkpoint-disk-quota", "os", DiskFullError, ("quota", "step-4"), ("free disk space",),
         _checkpoint_refused("fsync", errno.EDQUOT, "")),
    Case("os-metrics-log-read-only", "os", FileSystemError, ("read-only", "metrics.jsonl"), READ_ONLY,
         _metrics_log_refused),
    # ---- teacher caches: finished shards and the manifest stay; the lock goes ---------------
    Case("os-cache-shard-permission-denied", "os", FileSystemError, ("permission denied", "shard-00001.kdc"),
         PERMISSION, _cache_shard_refused(errno.EACCES)),
    Case("os-cache-shard-read-only", "os", FileSystemError, ("read-only", "shard-00001.kdc"), READ_ONLY,
         _cache_shard_refused(errno.EROFS)),
    # ---- the CLI: one line, exit 2 --------------------------------------------------------
    cli_case("os-cli-report-permission-denied", "os", FileSystemError, ("permission denied", "rep"), PERMISSION,
             _report_refused("mkdir", errno.EACCES, "rep")),
    cli_case("os-cli-report-read-only", "os", FileSystemError, ("read-only", "report.html"), READ_ONLY,
             _report_refused("replace", errno.EROFS, "report.html", arg=1)),
    cli_case("os-cli-report-disk-full", "os", DiskFullError, ("disk full", "curves.png"), ("free disk space",),
             _report_refused("fsync", errno.ENOSPC, "")),
    cli_case("os-cli-report-into-a-file", "os", FileSystemError, ("a file is where a folder", "rep"),
             ("remove or rename",), _report_into_a_file),
    cli_case("os-cli-report-html-is-a-folder", "os", FileSystemError, ("a folder is where a file", "report.html"),
             ("remove or rename the folder",), _report_html_is_a_folder),
    cli_case("os-cli-report-too-many-open-files", "os", FileSystemError, ("too many open files",), FILES,
             _report_emfile),
]
