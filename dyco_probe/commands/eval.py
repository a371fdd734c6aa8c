"""``dyco-probe eval``: answer accuracy under normal, blank or swapped images."""

from __future__ import annotations

import json

from dyco_probe.commands import (
    add_command,
    add_data_args,
    add_model_args,
    data_text,
    emit,
    load_examples,
    load_model,
)


def run(args) -> int:
    from dyco_probe.evaluation import evaluate
    from dyco_probe.files import check_writable, write_text_atomic

    if args.out:
        check_writable(args.out)
    examples, data = load_examples(args)
    handle = load_model(args)
    res = evaluate(
        handle,
        examples,
        image_mode=args.image_mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    summary = {**res.summary(), "data": data}
    lo, hi = res.accuracy_ci
    text = (
        f"accuracy {res.accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {res.n} examples, image mode {args.image_mode}; "
        f"format {res.format_rate:.3f}; {res.samples_per_second:.1f} samples/s\n{data_text(data)}"
    )
    if args.out:
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in res.records))
        summary["records"] = args.out
    emit(args, summary, text)
    return 0


def register(sub) -> None:
    p = add_command(sub, "eval", run, "answer accuracy of a model on the synthetic task or a jsonl file")
    add_model_args(p)
    add_data_args(p)
    p.add_argument(
        "--image-mode",
        default="normal",
        choices=["normal", "blank", "swap"],
        help="images shown: the example's own, blank, or the next example's (default: normal)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=96, help="longest completion generated (default: 96)"
    )
    p.add_argument(
        "--out",
        help="write one record per example here: id, answer, prediction, correct, format, completion (jsonl; default: none)",
    )
