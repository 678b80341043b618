"""Pre-flight of the ``pgkd`` recipe: the teacher backend (a local model that exists, vLLM
installed, an OpenAI-compatible endpoint's API key variable set), the data files, the output
folder. No estimate: the student is a small hashed n-gram classifier, the cost is the teacher's."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from kdforge.preflight.checks import check_device, check_model_ref, check_output_dir
from kdforge.preflight.problems import Problem, Problems

__all__ = ["check"]


def check(config: Any, output_dir: Path) -> list[Problem]:
    """Every problem of a ``pgkd`` config found without generating or training."""
    problems = Problems()
    _check_teacher(problems, config.teacher)
    d = config.data
    for key in ("train_path", "validation_path", "test_path"):
        path = getattr(d, key, None)
        if path is not None and not Path(path).expanduser().exists():
            problems.add(f"data.{key}", f"no file {path!r}", "fix the path (a csv/jsonl/parquet file or a folder)")
    check_output_dir(problems, "output_dir", output_dir)
    return problems.items


def _check_teacher(problems: Problems, teacher: Any) -> None:
    kind = teacher.type
    if kind == "transformers":
        model = teacher.model.removeprefix("asset:")
        check_model_ref(problems, "teacher.model", model, needs=() if teacher.gguf_file else ("config.json",))
        check_device(problems, "teacher.device", teacher.device)
    elif kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            problems.add("teacher.type", "the vllm backend needs the vllm package, which is not installed",
                         "pip install 'kdforge[vllm]' (a CUDA machine), or use type: transformers")
        check_model_ref(problems, "teacher.model", teacher.model)
    elif kind == "openai" and teacher.api_key_env and not os.environ.get(teacher.api_key_env):
        problems.add("teacher.api_key_env", f"the environment variable {teacher.api_key_env} (the API key) is not set",
                     f"export {teacher.api_key_env}=... before running, or remove api_key_env for a local server "
                     "without a key")
