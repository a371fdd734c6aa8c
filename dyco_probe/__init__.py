"""dyco_probe: per-token cross-modal attention tracing, role labelling, alignment scoring and causal
interventions for vision-language models, after DyCo-RL (arXiv 2606.08035).

The top-level names are imported lazily, so ``import dyco_probe`` stays cheap::

    import dyco_probe as dp
    handle = dp.load("builtin")
    trace = dp.trace(handle, dp.synthetic_examples("test", 16))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models and data
    "load": "dyco_probe.models.loading",
    "ModelHandle": "dyco_probe.models.loading",
    "CheckpointError": "dyco_probe.models.loading",
    "Example": "dyco_probe.data",
    "read_jsonl": "dyco_probe.data",
    "write_jsonl": "dyco_probe.data",
    "synthetic_examples": "dyco_probe.data",
    "TaskConfig": "dyco_probe.task.problems",
    # generation and evaluation
    "generate": "dyco_probe.generation",
    "evaluate": "dyco_probe.evaluation",
    "accuracy_reward": "dyco_probe.rewards",
    "format_reward": "dyco_probe.rewards",
    "extract_answer": "dyco_probe.rewards",
    # tracing
    "TraceConfig": "dyco_probe.tracing",
    "Trace": "dyco_probe.tracing",
    "Tracer": "dyco_probe.tracing",
    "trace_generate": "dyco_probe.tracing",
    "trace_offline": "dyco_probe.tracing",
    "trace": "dyco_probe.api",
    "trace_completions": "dyco_probe.api",
    # roles and scoring
    "Role": "dyco_probe.roles",
    "label_roles": "dyco_probe.roles",
    "fisher_rao_distance": "dyco_probe.distances",
    "ScorerConfig": "dyco_probe.scoring",
    "score_tokens": "dyco_probe.scoring",
    "alignment_scores": "dyco_probe.scoring",
    "reweight_advantages": "dyco_probe.scoring",
    "dyco_advantages": "dyco_probe.scoring",
    "get_labeller": "dyco_probe.labellers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dyco_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
