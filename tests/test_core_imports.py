"""kdforge imports with its core dependencies alone: every module of the package is imported in a
fresh interpreter where the optional extras (tensorboard, rouge-score, datasketch, openai,
fastapi/uvicorn, trl, peft, gguf, rdata, vllm, deepspeed) cannot be imported, as on a machine
that ran `pip install kdforge` without extras (a ``sys.meta_path`` blocker, and ``None`` in
``sys.modules`` for each top-level name so that ``importlib.util.find_spec`` probes, which
transformers and accelerate use, report them absent). A module that needs an extra imports it
where it is used."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: Top-level modules of the optional extras (pyproject.toml [project.optional-dependencies]).
OPTIONAL = ("tensorboard", "rouge_score", "datasketch", "openai", "fastapi", "uvicorn", "trl", "peft", "gguf",
            "rdata", "vllm", "deepspeed", "jsonschema", "hypothesis", "liger_kernel")

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys, traceback

    BLOCKED = set(json.loads(sys.argv[1]))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: optional extra)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    for top in BLOCKED:  # absent, as importlib.util.find_spec reports it: libraries probe with it
        sys.modules[top] = None
    import kdforge

    failed = {}
    names = ["kdforge"] + [m.name for m in pkgutil.walk_packages(kdforge.__path__, "kdforge.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed[name] = traceback.format_exc(limit=-3)
    try:
        import rouge_score  # noqa: F401  (installed in the test venv: the blocker must stop it)
        blocked = False
    except ModuleNotFoundError:
        blocked = True
    leaked = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in BLOCKED)
    print(json.dumps({"modules": len(names), "failed": failed, "leaked": leaked, "blocked": blocked}))
""")


def test_every_kdforge_module_imports_without_the_optional_extras():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(OPTIONAL)], capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["blocked"] and report["modules"] > 50
    assert not report["failed"], "\n\n".join(f"{k}:\n{v}" for k, v in report["failed"].items())
    assert not report["leaked"]
