"""``dyco-probe eval``: answer accuracy under normal, blank or swapped images."""

from __future__ import annotations

import json
from pathlib import Path

from dyco_probe.commands import add_command, add_data_args, add_model_args, emit, load_examples, load_model


def run(args) -> int:
    from dyco_probe.evaluation import evaluate

    handle = load_model(args)
    res = evaluate(
        handle,
        load_examples(args),
        image_mode=args.image_mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    summary = res.summary()
    lo, hi = res.accuracy_ci
    text = (
        f"accuracy {res.accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {res.n} examples, image mode {args.image_mode}; "
        f"format {res.format_rate:.3f}; {res.samples_per_second:.1f} samples/s"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r in res.records:
                f.write(json.dumps(r) + "\n")
        summary["records"] = args.out
    emit(args, summary, text)
    return 0


def register(sub) -> None:
    p = add_command(sub, "eval", run, "answer accuracy of a model on the synthetic task or a jsonl file")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--image-mode", default="normal", choices=["normal", "blank", "swap"])
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", help="write per-example records (jsonl) here")
