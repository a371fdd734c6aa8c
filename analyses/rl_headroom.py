"""How much can outcome-reward RL improve a checkpoint's greedy accuracy? (headroom diagnostic)

RL with a verifiable reward learns from groups whose completions disagree on the reward, and it can
raise *greedy* accuracy only where the greedy answer is wrong but the right one is sampled often
enough to be reinforced. This script measures both, on the synthetic test split:

- greedy answer accuracy;
- at each sampling temperature: sampled accuracy, pass@k, the share of prompts whose k samples
  disagree (the groups that give GRPO a gradient), and, for the prompts greedy gets wrong, how
  many have a correct sample at all and the mean share of correct samples;
- where greedy chains first leave the gold chain (a look-up read from the image, or a text step);
- teacher-forced on the gold chain, how confident the model is at the look-ups it gets wrong:
  the probability it gives the right value. Confident misreads (right value under 5%) are errors
  sampling almost never corrects, so RL has nothing to reinforce there.

Writes ``figures/rl_headroom.{md,json}``.

    python analyses/rl_headroom.py --model builtin --n 300 --k 8
"""

from __future__ import annotations

import argparse

import torch

from dyco_probe.studies.headroom import Headroom, headroom


def main(argv=None) -> int:
    d = Headroom()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--n", type=int, default=d.n)
    ap.add_argument("--k", type=int, default=d.k)
    ap.add_argument("--temperatures", type=float, nargs="+", default=d.temperatures)
    ap.add_argument("--batch-prompts", type=int, default=d.batch_prompts)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=d.out)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = vars(args)
    settings.pop("threads")
    print(headroom(Headroom(**settings)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
