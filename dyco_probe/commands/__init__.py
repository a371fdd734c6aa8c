"""Subcommands of ``dyco-probe``; shared argument helpers."""

from __future__ import annotations

import json


def add_command(sub, name: str, func, help_: str):
    """A subparser with the options every command has (``--json``, ``--quiet``)."""
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=func)
    return p


def add_model_args(p) -> None:
    p.add_argument("--model", default="builtin", help="'builtin' or a local checkpoint directory")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)


def add_data_args(p, n_default: int | None = 200) -> None:
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="synthetic split")
    p.add_argument("--data", help="a VLM-R1 jsonl file instead of the synthetic task")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad jsonl lines")
    p.add_argument("--n", type=int, default=n_default, help="number of examples")


def load_model(args):
    from dyco_probe.models.loading import load

    return load(args.model, device=args.device, dtype=args.dtype)


def load_examples(args):
    """Examples from ``--data`` (a VLM-R1 jsonl) or the synthetic ``--split``."""
    from dyco_probe.data import read_jsonl, synthetic_examples

    if getattr(args, "data", None):
        examples = read_jsonl(args.data, skip_bad=args.skip_bad)
        return examples[: args.n] if args.n else examples
    return synthetic_examples(args.split, args.n or 200)


def emit(args, result: dict, text: str | None = None) -> None:
    """Print the human summary, then (with ``--json``) one JSON object as the last line."""
    if text:
        print(text)
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
