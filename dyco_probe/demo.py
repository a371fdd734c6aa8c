"""``make demo``: the main job on the built-in model.

Loads the built-in model, evaluates it on the synthetic test split (normal, blank and swapped images)
and prints one worked example with its chain of thought.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyco_probe.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--n", type=int, default=200, help="test examples to evaluate")
    args = parser.parse_args(argv)

    import torch

    from dyco_probe.data import synthetic_examples
    from dyco_probe.evaluation import evaluate
    from dyco_probe.models.loading import load

    torch.manual_seed(0)
    t0 = time.perf_counter()
    handle = load(args.model)
    examples = synthetic_examples("test", args.n)
    print(f"dyco_probe demo: {args.model} on {args.n} synthetic test examples\n")
    results = {}
    for mode in ("normal", "blank", "swap"):
        res = evaluate(handle, examples, image_mode=mode, progress=True)
        lo, hi = res.accuracy_ci
        print(
            f"  {mode:6s} images: accuracy {res.accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}), {res.samples_per_second:.0f} samples/s"
        )
        results[mode] = res
    ex, rec = examples[0], results["normal"].records[0]
    print("\nworked example")
    print(f"  question : {ex.question}")
    print(f"  scene    : {', '.join(f'{o.colour} {o.shape}' for o in ex.problem.objects)}")
    print(f"  model    : {rec['completion']}")
    print(f"  gold     : {ex.completion}")
    print(f"  correct  : {rec['correct']}")
    summary = {m: r.summary() for m, r in results.items()}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
