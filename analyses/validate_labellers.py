"""Do the role labellers find the synthetic task's true roles? And do the published thresholds suit it?

On the built-in model and the test split: generate greedy completions with online tracing (the
default probe: last layer, all heads), label their tokens with every labeller, and compare with the
ground truth of the task's grammar (`dyco_probe.task.alignment`). Writes to ``figures/``:

- ``labeller_validation.md`` / ``.csv``: precision, recall, F1 per role of every labeller, with neutral
  tokens excluded (only tokens whose true role is visual or text count) and included (three classes),
  macro F1 with a 95% bootstrap interval over examples; the same for each probed layer; and the share of
  ground-truth visual tokens whose image attention peaks on the relevant image token (the cell of the
  object the token names), against chance (1 / number of image tokens);
- ``labeller_threshold_sweep.csv`` and ``labeller_threshold_sweep.{png,pdf}``: macro F1 of the
  role rule (docs/method.md#token-roles) over a (tau_vis, tau_txt) grid, and of the ratio baseline over theta. To judge the published
  defaults without fooling ourselves, thresholds are chosen on one half of the examples and scored on
  the other (and vice versa); the defaults are scored on the same held-out halves;
- ``labeller_visual_peaks.csv``: the same peak shares over the tokens each labeller calls visual (ground
  truth, every distance's rule, the ratio baseline), counted over those that have a relevant image token,
  and how many of its visual tokens have none (they are not look-ups);
- ``labeller_validation.{png,pdf}``: F1 per role and macro F1 (95% bootstrap interval) of every labeller,
  neutral tokens excluded and included (`dyco_probe.viz.plot_labeller_validation`);
- ``labeller_delta_by_role.{png,pdf}``: the distribution of Δ = v_vis − v_txt by true role, and the
  attention-peak share per layer;
- ``labeller_dependency.md`` / ``.csv``, ``labeller_dependency_thresholds.csv`` and
  ``labeller_dependency_vs_delta.{png,pdf}``: the counterfactual labeller (``visual_dependency``) for each
  counterfactual image and divergence: P / R / F1 per role and macro F1 (95% CI) at the library's default
  thresholds, the AUROC of its score for visual tokens, thresholds chosen on this set and on one half
  scored on the other, how its visual tokens overlap the Fisher–Rao rule's, and per token the rule's Δ
  against the dependency score by true role. Its rows at the default thresholds (KL) also join the main
  table. ``--only dependency`` computes this part alone (no per-distance or per-layer traces); on the
  ``val`` split it is how the defaults were chosen.

Traces are cached in ``--runs``, keyed by the weights' hash, split, n and token budget (reruns reuse
them; ``api.trace`` resumes an interrupted generation).

    python -m analyses.validate_labellers                   # built-in model, 500 test examples
    python -m analyses.validate_labellers --model path/to/checkpoint --n 200
    python -m analyses.validate_labellers --only dependency --split val --n 300 --out runs/dependency-val
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from dyco_probe.studies.labeller_validation import LabellerValidation, validate_labellers
    from dyco_probe.studies.labellers import COUNTERFACTUALS, DIVERGENCES

    d = LabellerValidation(runs="", out="")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--split", default=d.split)
    parser.add_argument("--n", type=int, default=d.n)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument(
        "--completions",
        default=d.completions,
        choices=["generated", "gold"],
        help="the model's greedy completions (traced online) or the gold chains (teacher-forced)",
    )
    parser.add_argument("--runs", default=str(ROOT / "runs" / "validate_labellers"))
    parser.add_argument("--out", default=str(ROOT / "figures"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only",
        default=d.only,
        choices=["all", "dependency"],
        help="dependency: the counterfactual labeller alone",
    )
    parser.add_argument(
        "--counterfactuals", nargs="+", default=list(COUNTERFACTUALS), choices=COUNTERFACTUALS
    )
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    parser.add_argument("--mask-fraction", type=float, default=None, help="patches (default: the library's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = vars(args)
    settings.pop("threads")
    print(validate_labellers(LabellerValidation(**settings)))


if __name__ == "__main__":
    main()
