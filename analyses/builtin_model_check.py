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
  chance (one over the number of image tokens).

Writes ``figures/builtin_model_check.{md,json}``.

    python analyses/builtin_model_check.py --model builtin --n 500
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from dyco_probe.data import example_from_problem
from dyco_probe.evaluation import evaluate, wilson_interval
from dyco_probe.models.loading import load
from dyco_probe.pretrain import forward_with_last_layer_attention, language_batch
from dyco_probe.task.problems import ROLE_VISUAL, make_split


@torch.no_grad()
def lookup_statistics(handle, problems, blank: bool = False, batch_size: int = 50) -> dict:
    """Teacher-forced look-up accuracy and last-layer attention on the relevant image token."""
    from dyco_probe.generation import blank_image

    hits = peaks = n = 0
    share = 0.0
    n_image_tokens = None
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        if blank:
            chunk = [_blanked(p, blank_image) for p in chunk]
        inputs, _, lookups, _ = language_batch(handle, chunk, 1.0)
        outputs, probs = forward_with_last_layer_attention(handle.model, inputs)
        ids = inputs["input_ids"]
        mean = probs.mean(1)
        for i, q, k in lookups:
            image_cols = (ids[i] == handle.image_token_id).nonzero().flatten()
            n_image_tokens = len(image_cols)
            row = mean[i, q, image_cols]
            hits += int(outputs.logits[i, q].argmax() == ids[i, q + 1])
            peaks += int(image_cols[row.argmax()] == k)
            share += float(row[(image_cols == k).nonzero()[0, 0]] / row.sum())
            n += 1
    return {
        "lookups": n,
        "lookup_accuracy": hits / n,
        "lookup_accuracy_ci95": wilson_interval(hits, n),
        "attention_peak_rate": peaks / n,
        "attention_peak_rate_ci95": wilson_interval(peaks, n),
        "attention_share_on_relevant": share / n,
        "chance": 1 / n_image_tokens,
    }


class _Blanked:
    """A problem whose rendered image is blank (same chain, same ground truth)."""

    def __init__(self, problem, blank):
        self._p, self._blank = problem, blank

    def __getattr__(self, name):
        return getattr(self._p, name)

    def render(self):
        return self._blank(self._p.render())


def _blanked(problem, blank):
    return _Blanked(problem, blank)


def guess_baselines(problems, seed: int = 0) -> dict:
    """Expected accuracy of the two image-free guesses, per look-up (exact expectation for the first,
    simulation with random tie-breaks for the second)."""
    rng = random.Random(seed)
    no_image, majority, n = 0.0, 0, 0
    for p in problems:
        value_attr = "colour" if p.key_attribute == "shape" else "shape"
        vocab = p.config.colours if value_attr == "colour" else p.config.shapes
        named = set()
        for w in p.chain:
            if w.role != ROLE_VISUAL:
                continue
            remaining = [v for v in vocab if v not in named]
            no_image += 1 / len(remaining)
            counts = {v: sum(getattr(o, value_attr) == v for o in p.objects) for v in remaining}
            top = max(counts.values())
            majority += int(rng.choice([v for v, c in counts.items() if c == top]) == w.text)
            named.add(w.text)
            n += 1
    return {"best_guess_without_image": no_image / n, "majority_attribute_guess": majority / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default="figures/builtin_model_check")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    handle = load(args.model)
    problems = make_split("test", args.n)
    examples = [example_from_problem(p) for p in problems]
    answer = {}
    for mode in ("normal", "blank", "swap"):
        res = evaluate(handle, examples, image_mode=mode, progress=True)
        answer[mode] = {
            "accuracy": res.accuracy,
            "ci95": res.accuracy_ci,
            "samples_per_second": res.samples_per_second,
        }
    report = {
        "model": args.model,
        "n": args.n,
        "answer_accuracy": answer,
        "lookups_real_image": lookup_statistics(handle, problems),
        "lookups_blank_image": lookup_statistics(handle, problems, blank=True),
        "guesses": guess_baselines(problems),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    a, r, b, g = answer, report["lookups_real_image"], report["lookups_blank_image"], report["guesses"]

    def ci(x):
        return f"{x[0]:.3f}-{x[1]:.3f}"

    lines = [
        f"# Does the built-in model look? ({args.model}, {args.n} test problems, {r['lookups']} look-ups)",
        "",
        "| answer accuracy | value | 95% CI |",
        "| --- | ---: | --- |",
        *[f"| {m} images | {a[m]['accuracy']:.3f} | {ci(a[m]['ci95'])} |" for m in a],
        "",
        "| per look-up (teacher-forced) | accuracy |",
        "| --- | ---: |",
        f"| model, real image | {r['lookup_accuracy']:.3f} ({ci(r['lookup_accuracy_ci95'])}) |",
        f"| model, blank image | {b['lookup_accuracy']:.3f} ({ci(b['lookup_accuracy_ci95'])}) |",
        f"| best guess without the image | {g['best_guess_without_image']:.3f} |",
        f"| majority-attribute guess | {g['majority_attribute_guess']:.3f} |",
        "",
        "| last-layer attention from the look-up query (mean over heads) | value | chance |",
        "| --- | ---: | ---: |",
        f"| peaks on the relevant image token | {r['attention_peak_rate']:.3f} ({ci(r['attention_peak_rate_ci95'])}) | {r['chance']:.3f} |",
        f"| share of image attention on the relevant token | {r['attention_share_on_relevant']:.3f} | {r['chance']:.3f} |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
