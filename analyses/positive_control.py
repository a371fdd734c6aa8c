"""The positive control: does each signal see the failure planted in the built-in model?

The built-in model trusts notes in the question (``dyco_probe.task.problems``): at the look-up of a
noted object it sometimes copies the note's value (``triangle note blue``) instead of reading the image
(``triangle red``), and a false note then gives a wrong answer. Which look-ups were copied is known
exactly, so every signal of the toolkit can be tested against a known effect:

1. **look-up tokens**: noted test problems (true and false notes), ``--samples`` completions each at
   temperature 1, traced online (last layer, all heads). For every value token of a noted look-up:
   copied or read. For each per-token signal, the AUROC for telling read from copied (higher signal
   = read; 0.5 = blind; below 0.5 = inverted) with a 95% bootstrap interval over prompts (the samples
   of one prompt are resampled together), and the share of prompts with both forms where the signal's
   mean is higher for the read ones.
2. **trajectories**: greedy completions of ``--n-greedy`` test problems (every subset), scored with the
   Fisher–Rao roles: the AUROC of each trajectory feature for correctness (sequence score, mean
   ``s_t``, visual-role fraction, switch rate), with stratified bootstrap intervals.
3. **interventions** at the noted look-up of fixed chains (each noted problem once reading the image,
   once copying the note): the note knocked out at the value token and at the token that decides the
   look-up's form (does the model then read the image and recover?), and the image knocked out at
   the value token (does a read look-up need the image, and a copied one not?);
4. **RL**: the repair measured by ``analyses/rl_comparison.py`` (read from its JSON, if present).

Writes ``figures/positive_control.{md,json}`` and ``figures/positive_control_signals.{png,pdf}``.

    python -m analyses.positive_control                     # built-in model; about 10 min on 1 core
    python -m analyses.positive_control --n-noted 40 --samples 4 --n-greedy 60   # quick look
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dyco_probe.studies.positive_control import PositiveControl, positive_control

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    d = PositiveControl(rl="", out="")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument(
        "--n-noted", type=int, default=d.n_noted, help="noted test problems (true and false notes)"
    )
    ap.add_argument("--samples", type=int, default=d.samples, help="sampled completions per noted problem")
    ap.add_argument("--n-greedy", type=int, default=d.n_greedy, help="test problems decoded greedily")
    ap.add_argument(
        "--n-interventions", type=int, default=d.n_interventions, help="noted problems for the knockouts"
    )
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--n-boot", type=int, default=d.n_boot)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--rl", default=str(ROOT / "figures" / "rl_comparison.json"))
    ap.add_argument("--out", default=str(ROOT / "figures" / "positive_control"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="re-read --rl and rewrite the report from the stored JSON (no model runs)",
    )
    args = ap.parse_args(argv)
    if not args.report_only:
        import matplotlib

        matplotlib.use("Agg")
        import torch

        torch.set_num_threads(args.threads)
    settings = vars(args)
    settings.pop("threads")
    print(positive_control(PositiveControl(**settings)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
