"""The derived parts of a run directory: what the report shows beyond what the commands wrote.

`summarise_run(run)` reads the run directory (`dyco_probe.rundir.RunDirectory`) and writes next to
what it read:

- `figures/token_analysis_*.png` / `.pdf`, `token_analysis.md` / `.json`: correct vs incorrect
  trajectories (`dyco_probe.analysis.analyse_tokens`), when the trace records correctness;
- `roles.json`: the labellers against the synthetic ground truth (`studies.labellers.role_agreement`),
  when it is missing and the trace is of the synthetic task;
- `interventions/<sweep>/effects.json`: per readout, the mean effect of each condition with its
  bootstrap 95% interval, and why the conditions without one have none.

It returns, per report section, why a part could not be made (shown on the page).
"""

from __future__ import annotations

import json
from pathlib import Path

from dyco_probe.files import write_text_atomic
from dyco_probe.interventions.stats import READOUT_LABELS
from dyco_probe.rundir import RunDirectory

__all__ = ["REPORT_READOUTS", "summarise_run"]

REPORT_READOUTS = ("dacc", "dlogp_answer")  # the readouts the report draws
# Condition columns the effects are grouped by (slices and heads of one condition are pooled).
_CONDITION = ("kind", "keys", "strength", "role_source", "donor", "direction", "layers", "target")


def summarise_run(run, *, trace=None, model: str | None = None, n_boot: int = 1000) -> dict[str, str]:
    """Write the derived parts of the run directory `run` (see the module docstring), the token
    analysis and the roles from `trace` (default: the run's `trace.parquet`); `model` names the
    tokenizer for the ground truth (default: the trace's model). Returns `{section: why not}`."""
    run = RunDirectory(run)
    notes: dict[str, str] = {}
    trace_path = Path(trace) if trace is not None else run.trace
    if trace_path.exists():
        notes.update(_from_trace(run, trace_path, model, n_boot))
    for sweep in run.sweeps():
        if (sweep / "results.parquet").exists():
            effects = sweep_effects(sweep, n_boot)
            write_text_atomic(RunDirectory.effects(sweep), json.dumps(effects, indent=1) + "\n")
    return notes


def _from_trace(run: RunDirectory, trace_path: Path, model: str | None, n_boot: int) -> dict[str, str]:
    from dyco_probe import viz
    from dyco_probe.analysis import analyse_tokens
    from dyco_probe.tracing import Trace

    trace = Trace.load(trace_path)
    notes = {}
    if trace.samples and all("correct" in s for s in trace.samples):
        analysis = analyse_tokens(trace, n_boot=n_boot)
        viz.save_token_analysis_figures(analysis, run.figures)
        run.token_analysis.with_suffix(".md").write_text(analysis.to_markdown())
        run.token_analysis.with_suffix(".json").write_text(json.dumps(analysis.headline(), indent=2) + "\n")
    if run.roles.exists():
        return notes
    if trace.samples and all(s.get("synthetic") for s in trace.samples):
        from dyco_probe.models.loading import load_tokenizer
        from dyco_probe.studies.labellers import role_agreement

        source = model or (trace.metadata or {}).get("model_source")
        try:
            agreement = role_agreement(trace, load_tokenizer(source))
        except Exception as e:  # noqa: BLE001 - an unreadable tokenizer only costs this section
            notes["roles"] = f"could not compute it ({type(e).__name__}: {e}); pass --model"
        else:
            write_text_atomic(run.roles, json.dumps(agreement, indent=2) + "\n")
    else:
        notes["roles"] = "the trace is not of the synthetic task, whose ground-truth roles are known"
    return notes


def sweep_effects(sweep: Path, n_boot: int = 1000) -> dict:
    """A merged sweep's effects as the report draws them: counts of items, conditions, rows and
    errors, and per readout (`REPORT_READOUTS` present in the results) the mean effect of each
    condition (bootstrap 95% CI; `dyco_probe.interventions.summarize`) and, for the conditions without
    one, why (`{reason: [condition labels]}`)."""
    import pandas as pd

    from dyco_probe.interventions import summarize
    from dyco_probe.viz import condition_label

    frame = pd.read_parquet(sweep / "results.parquet")
    ok = frame[frame["status"] == "ok"]
    by = [c for c in _CONDITION if c in ok.columns]
    out = {
        "items": int(ok["item_index"].nunique()),
        "conditions": int(frame["condition_id"].nunique()),
        "rows": len(frame),
        "errors": int((frame["status"] != "ok").sum()),
        "readouts": {},
    }
    for value in REPORT_READOUTS:
        if value not in frame.columns:
            continue
        summary = summarize(ok, value, by, n_boot=n_boot) if len(ok) else pd.DataFrame()
        reasons: dict[str, list[str]] = {}
        for _, rows in frame.groupby("condition_id", sort=False):
            why = _why_not_drawn(rows, value)
            if why is not None:
                reasons.setdefault(why, []).append(condition_label({c: rows[c].iloc[0] for c in by}))
        out["readouts"][value] = {
            "label": READOUT_LABELS[value],
            "effects": json.loads(summary.to_json(orient="records")) if len(summary) else [],
            "not_drawn": {why: sorted(set(names)) for why, names in reasons.items()},
        }
    return out


def _why_not_drawn(rows, value: str) -> str | None:
    """Why a condition's rows (all its items) give no effect to draw for `value`; None if they do."""
    ok = rows[rows["status"] == "ok"]
    if ok[value].notna().any():
        return None
    if ok.empty:
        return "every item failed (see the error rows of results.parquet)"
    if str(ok["kind"].iloc[0]).startswith("patch_") and value in ("dacc",):
        return "activation patching has no free-running readout (patched values exist along the reference trajectory only)"
    if "n_targets" in ok and (ok["n_targets"].fillna(0) == 0).all():
        return "no item had a target token (none of the completions has a token of that role)"
    return "this readout was not run (see [readouts] in the sweep file)"
