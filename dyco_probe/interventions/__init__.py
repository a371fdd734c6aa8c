"""Causal interventions on attention and activations, readouts, statistics and sweeps (docs/method.md#interventions).

    from dyco_probe.interventions import Intervention, intervene, token_columns, select_tokens

    spec = Intervention.knockout("image", layers=[1, 2])          # or Intervention.scaling(0.5, "text")
    visual = select_tokens("visual", roles, completion_mask)       # [B, T] completion tokens
    control = select_tokens("random:visual", roles, completion_mask, seed=0, sample_keys=ids)
    with intervene(model, spec, token_columns(visual, prompt_length)):
        logits = model(**teacher_forced_inputs).logits

Token `t` of a completion (0-based, `o_{t+1}`, the indexing of a `Trace`) is intervened on at the
query that produces it: the column of `o_t` (`prompt_length - 1 + t`), the same query whose
attention row the tracer records for that token (see `queries`).

Modules, one concern each:

- `spec`: `Intervention` (knockout / scale λ, key span, layers, heads), layer windows;
- `queries`: token selections (roles from any labeller or ground truth, matched random controls,
  neutral, all, positions) and their query columns;
- `attention`: `intervene`, the context manager on the shared attention hook;
- `patching`: record and patch image-token states or attention outputs (donor runs, restore-style);
- `readouts`: teacher-forced log-probabilities, free-running regeneration;
- `trajectories`: reference trajectories of a batch and per-sample effects against them;
- `stats`: bootstrap CIs, paired tests against controls, effect sizes;
- `conditions`, `store`, `sweep`: sweep files, resumable storage, the runner (`dyco-probe sweep`).
"""

from .attention import InterventionLog, intervene
from .conditions import Condition, GridSpec, SliceSpec, SweepConfig, expand_conditions
from .patching import (
    Recording,
    patch_attention_output,
    patch_image_states,
    record_attention_output,
    record_image_states,
)
from .queries import (
    TARGETS,
    all_tokens,
    ground_truth_roles,
    matched_random,
    role_tokens,
    select_tokens,
    token_columns,
    token_positions,
)
from .readouts import generate_greedy, regenerate, teacher_forced_inputs, token_logprobs
from .spec import KEY_SPANS, Intervention, KeyLayout, layer_windows, parse_layers
from .stats import (
    READOUT_LABELS,
    ROLE_SOURCE_LABELS,
    PairedComparison,
    bootstrap_ci,
    cohens_d,
    compare_to_control,
    paired_comparison,
    summarize,
)
from .store import ResultStore
from .sweep import SweepSummary, load_sweep_model, merge_sweep, run_sweep, summarize_sweep, sweep_examples
from .trajectories import ROLE_SOURCES, Trajectories, prepare_trajectories

__all__ = [
    "KEY_SPANS",
    "READOUT_LABELS",
    "ROLE_SOURCE_LABELS",
    "ROLE_SOURCES",
    "TARGETS",
    "Condition",
    "GridSpec",
    "Intervention",
    "InterventionLog",
    "KeyLayout",
    "PairedComparison",
    "Recording",
    "ResultStore",
    "SliceSpec",
    "SweepConfig",
    "SweepSummary",
    "Trajectories",
    "all_tokens",
    "bootstrap_ci",
    "cohens_d",
    "compare_to_control",
    "expand_conditions",
    "generate_greedy",
    "ground_truth_roles",
    "intervene",
    "layer_windows",
    "load_sweep_model",
    "matched_random",
    "merge_sweep",
    "paired_comparison",
    "parse_layers",
    "patch_attention_output",
    "patch_image_states",
    "prepare_trajectories",
    "record_attention_output",
    "record_image_states",
    "regenerate",
    "role_tokens",
    "run_sweep",
    "select_tokens",
    "summarize",
    "summarize_sweep",
    "sweep_examples",
    "teacher_forced_inputs",
    "token_columns",
    "token_logprobs",
    "token_positions",
]
