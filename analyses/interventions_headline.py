"""Does looking matter, does staying grounded matter? The headline intervention experiment (docs/method.md#interventions).

Runs the sweep `analyses/sweeps/interventions_headline.toml` on the built-in model
(`dyco_probe.studies.interventions`) (resumable: a
rerun skips finished conditions; one sweep directory per weights hash, so a retrained checkpoint
starts afresh) and writes to `figures/`:

- `interventions_headline.csv` / `.md`: per experiment (image knockout on visual-role tokens /
  text-history knockout on text-role tokens: the text the query reads, its own column excluded),
  role source (ground truth / Fisher–Rao), layer window and target: the mean free-running accuracy
  change and teacher-forced log-probability changes (gold answer tokens; the intervened tokens
  themselves) with bootstrap 95% CIs, and the paired difference to the matched random control and to
  the other role's tokens (t-test p, Cohen's d_z); the `.md` opens with what the tables show, written
  from them;
- `interventions_headline.png` / `.pdf`: the same effects against the layer window.

An intervention on token `t` acts on the query that produces it (the position of `o_{t-1}`,
docs/method.md#attention-signals). The regenerated (free-running) completions keep the trajectory up to the first intervened token.

    python -m analyses.interventions_headline                 # n = 48, about 5 min of CPU
    python -m analyses.interventions_headline --n 16          # a quick look
    python -m analyses.interventions_headline --report-only   # redraw from stored results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from dyco_probe.studies.interventions import HeadlineSettings

    d = HeadlineSettings(runs="", figures="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="builtin (default) or a checkpoint directory")
    p.add_argument("--n", type=int, default=d.n, help="test problems")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument(
        "--trajectory", default=d.trajectory, choices=["greedy", "gold"], help="reference trajectories"
    )
    p.add_argument("--runs", default=str(ROOT / "runs" / "interventions_headline"), help="sweep output root")
    p.add_argument("--figures", default=str(ROOT / "figures"), help="where the figure and tables go")
    p.add_argument("--n-boot", type=int, default=d.n_boot)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="only redraw from stored results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import torch

    from dyco_probe.studies.interventions import headline

    torch.set_num_threads(args.threads)
    settings = vars(args)
    settings.pop("threads")
    out = headline(HeadlineSettings(**settings))
    print(f"wrote {out}.csv, .md, .png, .pdf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
