"""Does DyCo reweighting help RLVR? Baseline (off) vs DyCo token vs DyCo sequence, for GRPO and DAPO.

Trains every (algorithm, granularity, seed) combination with ``dyco_probe.rl.train`` from the same
initial model, then writes to ``figures/``:

- ``rl_comparison.md`` / ``rl_comparison.csv``: held-out accuracy before and after training, mean over
  seeds with a 95% t-interval, the gain, and the paired difference to the baseline of the same
  algorithm and seed (same data order);
- ``rl_learning_curves.png`` / ``.pdf``: held-out accuracy and training reward against steps, mean
  over seeds with the 95% t-band;
- on a task with notes (the built-in model's positive control), the same by subset (no note, true
  note, false note) and the share of noted look-ups copied from the note, and
  ``rl_comparison.json`` with the headline numbers (``rl_gain_points``: GRPO with DyCo off, overall,
  in points; ``rl_gain_by_subset``; every row).

Runs live in ``--runs`` (one directory each) and the script is resumable: finished runs are skipped,
interrupted ones resume from their last checkpoint, and ``--report-only`` just redraws. The budget
flags set the cost: with the defaults (18 runs) the whole comparison takes about 60-90 min of CPU on
the built-in model with ``--jobs 2`` on two cores.

    python -m analyses.rl_comparison                         # defaults: 3 seeds, RLConfig's steps, 300 eval examples
    python -m analyses.rl_comparison --steps 40 --n-eval 100 --seeds 0 1 2 --jobs 2
    python -m analyses.rl_comparison --report-only
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from dyco_probe.studies.rl_comparison import RLComparison

    d = RLComparison(runs="", out="")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "rl_comparison"), help="run directories")
    parser.add_argument("--out", default=str(ROOT / "figures"), help="where the table and figures go")
    parser.add_argument("--algos", nargs="+", default=d.algos)
    parser.add_argument("--seeds", nargs="+", type=int, default=d.seeds)
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: RLConfig's)"
    )
    parser.add_argument("--n-eval", type=int, default=d.n_eval, help="held-out examples per evaluation")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--prompts-per-step", type=int, default=None, help="default: RLConfig's")
    parser.add_argument("--num-generations", type=int, default=None, help="default: RLConfig's")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: RLConfig's")
    parser.add_argument("--lr", type=float, default=None, help="default: RLConfig's")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads per run")
    parser.add_argument("--report-only", action="store_true", help="skip training; table and figures only")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    from dyco_probe.studies.rl_comparison import compare

    text = compare(RLComparison(**vars(args)), say=lambda line: print(line, flush=True))
    if text is not None:
        print(text)


if __name__ == "__main__":
    main()
