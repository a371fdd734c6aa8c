"""``dyco-probe export``: a synthetic split as VLM-R1 jsonl with PNG images."""

from __future__ import annotations

import json

from dyco_probe.commands import add_command, emit


def run(args) -> int:
    from dyco_probe.data import synthetic_examples, write_jsonl
    from dyco_probe.task.problems import TaskConfig

    config = TaskConfig.from_dict(json.loads(args.task_config)) if args.task_config else TaskConfig()
    path = write_jsonl(synthetic_examples(args.split, args.n, config), args.out)
    emit(args, {"jsonl": str(path), "n": args.n, "split": args.split}, f"wrote {args.n} examples to {path}")
    return 0


def register(sub) -> None:
    p = add_command(sub, "export", run, "export a synthetic split in VLM-R1 jsonl format with PNG images")
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="synthetic split (default: test)"
    )
    p.add_argument("--n", type=int, default=200, help="number of examples (default: 200)")
    p.add_argument(
        "--out", required=True, help="jsonl path; images go next to it, in <stem>_images/ (required)"
    )
    p.add_argument(
        "--task-config",
        help="JSON object of TaskConfig knobs, e.g. '{\"max_hops\": 2}' (default: the task's defaults)",
    )
