"""``kdforge generate RECIPE.yaml``: one validated config for every elicitation task.

A recipe names its ``task`` (``generate``, ``label``, ``expand``, ``curate``,
``rationales``), the teacher ``backend``, the input ``data``, the ``prompt`` template, the
``sampling`` parameters, and the task's own section. Example (``configs/generate_label_rt.yaml``)::

    task: label
    output_dir: outputs/label_rt
    backend: {type: openai, base_url: "http://127.0.0.1:8000/v1", model: teacher, concurrency: 8}
    data: {asset: rotten-tomatoes, split: validation, limit: 200}
    sampling: {n: 5, temperature: 0.7, max_tokens: 8, seed: 0}
    labeling: {labels: [fresh, rotten], text_field: text, gold_field: label}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.config import StrictModel
from kdforge.elicit.backends.config import BackendConfig, build_backend
from kdforge.elicit.curation import CurationConfig
from kdforge.elicit.data import DataConfig, PromptConfig, load_rows, render_prompt
from kdforge.elicit.expansion import ExpansionConfig
from kdforge.elicit.labeling import LabelingConfig
from kdforge.elicit.rationales import RationalesConfig
from kdforge.elicit.types import SamplingParams
from kdforge.errors import ConfigError
from kdforge.io import write_json_atomic

log = logging.getLogger(__name__)

Task = Literal["generate", "label", "expand", "curate", "rationales"]


class OutputConfig(StrictModel):
    shard_size: int = Field(1000, ge=1)
    format: Literal["jsonl", "parquet"] = "jsonl"
    on_error: Literal["raise", "skip"] = "raise"
    price_per_1k_prompt: float | None = Field(None, ge=0, description="USD per 1000 prompt tokens")
    price_per_1k_completion: float | None = Field(None, ge=0)


class GenerateJobConfig(StrictModel):
    """Everything ``kdforge generate`` needs (unknown keys are rejected)."""

    task: Task = "generate"
    output_dir: str = "outputs/generate"
    backend: BackendConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    output: OutputConfig = Field(default_factory=OutputConfig)
    progress: bool = True
    labeling: LabelingConfig | None = None
    expansion: ExpansionConfig | None = None
    curation: CurationConfig | None = None
    rationales: RationalesConfig | None = None

    @model_validator(mode="after")
    def _task_section(self) -> GenerateJobConfig:
        section = {"label": "labeling", "expand": "expansion", "curate": "curation",
                   "rationales": "rationales"}.get(self.task)
        if section and getattr(self, section) is None:
            if section == "labeling":
                raise ValueError("task 'label' needs a 'labeling' section (at least `labels: [...]`)")
            setattr(self, section, {"expansion": ExpansionConfig, "curation": CurationConfig,
                                    "rationales": RationalesConfig}[section]())
        needs_backend = self.task != "curate" or (self.curation is not None and self.curation.judge is not None)
        if needs_backend and self.backend is None:
            raise ValueError(f"task {self.task!r} needs a 'backend' section (the teacher)")
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        o = self.output
        return {"shard_size": o.shard_size, "fmt": o.format, "on_error": o.on_error,
                "progress": self.progress, "price_per_1k_prompt": o.price_per_1k_prompt,
                "price_per_1k_completion": o.price_per_1k_completion}


def run_job(cfg: GenerateJobConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run a generation/elicitation job; returns (and writes to ``results.json``) its summary."""
    out = Path(output_dir or cfg.output_dir)
    rows = load_rows(cfg.data)  # before anything is written: a data mistake leaves no output folder
    backend = build_backend(cfg.backend) if cfg.backend is not None else None
    if cfg.task == "generate":
        prompts = [render_prompt(r, cfg.prompt) for r in rows]
        if prompts and backend is not None and hasattr(backend, "render"):
            backend.render(prompts[0])  # e.g. chat prompts for a tokenizer without a chat template
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    from kdforge.io import write_text_atomic

    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ekw = cfg.engine_kwargs()
    if cfg.task == "generate":
        from kdforge.elicit.engine import generate

        assert backend is not None
        ids = _ids(rows, cfg.data.id_field)
        summary, _ = generate(prompts, backend, out / "generations",
                              cfg.sampling, ids=ids, metas=rows, **ekw)
        result: dict[str, Any] = {"task": "generate", **summary.to_dict()}
    elif cfg.task == "label":
        from kdforge.elicit.labeling import label_rows

        assert backend is not None and cfg.labeling is not None
        _, result = label_rows(rows, backend, out, labeling=cfg.labeling, prompt=cfg.prompt,
                               params=cfg.sampling, id_field=cfg.data.id_field, **ekw)
    elif cfg.task == "expand":
        from kdforge.elicit.expansion import expand_rows

        assert backend is not None and cfg.expansion is not None
        _, result = expand_rows(rows, backend, out, expansion=cfg.expansion, prompt=cfg.prompt,
                                params=cfg.sampling, **ekw)
    elif cfg.task == "curate":
        from kdforge.elicit.curation import curate_rows

        assert cfg.curation is not None
        _, result = curate_rows(rows, cfg.curation, backend=backend, output_dir=out, prompt=cfg.prompt,
                                params=cfg.sampling, **ekw)
    elif cfg.task == "rationales":
        from kdforge.elicit.rationales import rationale_rows

        assert backend is not None and cfg.rationales is not None
        _, result = rationale_rows(rows, backend, out, rationales=cfg.rationales, prompt=cfg.prompt,
                                   params=cfg.sampling, id_field=cfg.data.id_field, **ekw)
    else:  # pragma: no cover - Literal guards this
        raise ConfigError(f"unknown task {cfg.task!r}", "use generate, label, expand, curate or rationales")
    write_json_atomic(out / "results.json", result)
    return result


def _ids(rows: list[dict[str, Any]], id_field: str | None) -> list[str] | None:
    if id_field is None:
        return None
    try:
        return [str(r[id_field]) for r in rows]
    except KeyError:
        raise ConfigError(f"data.id_field {id_field!r} is missing from some rows",
                          "name a column every row has, or drop data.id_field") from None
