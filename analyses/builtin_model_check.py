"""Does the built-in model truly look at the image?

Measures, on the synthetic test split:

- answer accuracy (free-running, greedy) with the real, blank and swapped images;
- per look-up accuracy (teacher-forced on the gold chain: is the word read from the image right?)
  with the real image and with a blank one, against two guesses that do not read the pairing off
  the image: the best guess without the image (uniform over the values the chain has not named yet)
  and the majority-attribute guess (the value most frequent in the image, ties broken at random;
  every value appears once per scene, so it is chance);
- how often the probed layer's attention (last layer, mean over heads, restricted to image tokens)
  from each look-up query peaks on the relevant image token, and the attention share there, against
  chance (one over the number of image tokens);
- by subset of the questions (no note, true note, false note: the planted failure): answer accuracy
  and how often the chain copies the noted look-up from the note instead of reading the image.
  Look-up statistics are given for un-noted look-ups and, teacher-forced to read, for noted ones.

Writes ``figures/builtin_model_check.{md,json}``.

    python analyses/builtin_model_check.py --model builtin --n 500
"""

from __future__ import annotations

import argparse

from dyco_probe.studies.model_check import ModelCheck, model_check


def main(argv=None) -> int:
    d = ModelCheck()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--n", type=int, default=d.n)
    ap.add_argument("--out", default=d.out)
    args = ap.parse_args(argv)
    print(model_check(ModelCheck(**vars(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
