"""Knowledge elicitation: make a teacher generate, label, expand, curate and explain data.

* :mod:`~kdforge.elicit.engine`: resumable, sharded generation over any backend.
* :mod:`~kdforge.elicit.backends`: local transformers, OpenAI-compatible HTTP, vLLM offline.
* :mod:`~kdforge.elicit.labeling`, :mod:`~kdforge.elicit.expansion`,
  :mod:`~kdforge.elicit.curation`, :mod:`~kdforge.elicit.rationales`: recipes on top.

See ``docs/elicitation.md``.
"""

from kdforge.elicit.engine import GenerationEngine, GenerationSummary, collect, generate
from kdforge.elicit.store import ShardedStore, read_records, recover_journal
from kdforge.elicit.types import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    build_requests,
    request_id,
)

__all__ = [
    "GenerationEngine",
    "GenerationRequest",
    "GenerationResult",
    "GenerationSummary",
    "SamplingParams",
    "ShardedStore",
    "build_requests",
    "collect",
    "generate",
    "read_records",
    "recover_journal",
    "request_id",
]
