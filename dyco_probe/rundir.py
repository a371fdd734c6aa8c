"""Where results live: the run directory that the demo and the commands write and the report reads,
and the directory of one training run.

A run directory (every part optional; the commands named write them when pointed inside)::

    runs/<name>/
      run.json                     what made the run: settings and stage timings (python -m dyco_probe.demo)
      trace.parquet                dyco-probe trace --image-rows --out runs/<name>/trace.parquet
      roles.json                   labellers against the synthetic ground truth
                                   (dyco_probe.studies.labellers.role_agreement; the demo, or the report)
      labellers/                   python -m analyses.validate_labellers --out runs/<name>/labellers
                                   (labeller_validation.{md,csv}, threshold sweep, figures)
      interventions/<sweep>/       dyco-probe sweep FILE.toml --out runs/<name>/interventions/<sweep>
                                   (results.parquet, manifest.json, parts/; effects.json: the report's
                                   summary, dyco_probe.studies.run_summary)
      interventions/*.{md,png}     python -m analyses.interventions_headline --runs runs/<name>/interventions
                                   --figures runs/<name>/interventions
      rl/<label>/                  dyco-probe train --out runs/<name>/rl/<label> (a `TrainingRun`)
      figures/                     token-analysis figures and tables (PNG + PDF, .md, .json;
                                   dyco_probe.studies.run_summary, or the demo)
      report.html                  dyco-probe report --run runs/<name>

A training run (``dyco-probe train --out``, ``dyco_probe.rl.train``)::

    config.json      the run's settings (RLConfig.to_dict)
    metrics.jsonl    one record per step ("train") and per evaluation ("eval"); metrics.csv, eval.csv
    checkpoint.pt    model, optimiser, scheduler, RNG states, step and data position
    model/           the final policy (save_pretrained)
    done.json        written by analyses/rl_comparison.py once the run has all its steps
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDirectory", "TrainingRun", "read_rl_run"]


@dataclass(frozen=True)
class RunDirectory:
    """Paths of a run directory (see the module docstring for what writes each)."""

    root: Path

    def __init__(self, root):
        object.__setattr__(self, "root", Path(root))

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def trace(self) -> Path:
        return self.root / "trace.parquet"

    @property
    def roles(self) -> Path:
        return self.root / "roles.json"

    @property
    def labellers(self) -> Path:
        return self.root / "labellers"

    @property
    def interventions(self) -> Path:
        return self.root / "interventions"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def token_analysis(self) -> Path:
        """`figures/token_analysis` (`.md`, `.json`; the figures are `token_analysis_*.png/.pdf`)."""
        return self.figures / "token_analysis"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @staticmethod
    def effects(sweep: Path) -> Path:
        """A sweep's effects as the report draws them (`dyco_probe.studies.run_summary`)."""
        return Path(sweep) / "effects.json"

    def sweeps(self) -> list[Path]:
        """Sweep directories under `interventions/` (those with a manifest or merged results)."""
        if not self.interventions.is_dir():
            return []
        return sorted(
            p
            for p in self.interventions.iterdir()
            if p.is_dir() and ((p / "results.parquet").exists() or (p / "manifest.json").exists())
        )

    def rl_runs(self) -> list[Path]:
        """Training run directories under `rl/` (those with `metrics.jsonl`)."""
        if not self.rl.is_dir():
            return []
        return sorted(p for p in self.rl.iterdir() if TrainingRun(p).metrics.exists())

    def settings(self) -> dict:
        """`run.json`, or `{}`."""
        return json.loads(self.run_json.read_text()) if self.run_json.exists() else {}


@dataclass(frozen=True)
class TrainingRun:
    """Paths of one training run's directory."""

    root: Path
    CSV = {"train": "metrics.csv", "eval": "eval.csv"}  # exports of metrics.jsonl's records, by kind

    def __init__(self, root):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    def records(self) -> list[dict]:
        """Every record of `metrics.jsonl`, in order."""
        return [json.loads(x) for x in self.metrics.read_text().splitlines() if x.strip()]


def read_rl_run(path) -> dict:
    """A training run directory (`dyco-probe train --out`) as `{"config", "train", "eval", "steps_done"}`,
    `train` and `eval` as DataFrames of `metrics.jsonl` (skipped steps dropped)."""
    import pandas as pd

    run = TrainingRun(path)
    records = run.records()
    config = json.loads(run.config.read_text()) if run.config.exists() else {}
    train = pd.DataFrame([r for r in records if r.get("kind") == "train" and not r.get("skipped")])
    evals = pd.DataFrame([r for r in records if r.get("kind") == "eval"])
    if len(train):
        train = train.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    if len(evals):
        evals = evals.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    steps = int(train["step"].max()) if len(train) else 0
    return {"config": config, "train": train, "eval": evals, "steps_done": steps}
