"""Subcommands of ``dyco-probe``; shared argument helpers."""

from __future__ import annotations

import json
import sys


def add_command(sub, name: str, func, help_: str):
    """A subparser with the options every command has (``--json``, ``--quiet``)."""
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars (dyco_probe's and the libraries' it uses)"
    )
    p.set_defaults(func=func)
    return p


def add_model_args(p, batch_size: int = 32) -> None:
    p.add_argument(
        "--model", default="builtin", help="'builtin' or a local checkpoint directory (default: builtin)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype (default: float32)",
    )
    p.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"examples per forward (default: {batch_size})"
    )


def add_data_args(p, n_default: int = 200) -> None:
    """``--split``/``--n`` for the synthetic task, or ``--data FILE`` (all of it unless ``--n``)."""
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="synthetic split (default: test)"
    )
    p.add_argument("--data", help="a VLM-R1 jsonl file instead of the synthetic task (default: none)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad jsonl lines (bad JSON, missing or unreadable image, ...) and list them (default: a bad line is an error)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"number of examples (default: {n_default} of the synthetic split; with --data, every line of the file)",
    )
    p.set_defaults(n_default=n_default)


def quiet_libraries() -> None:
    """Hide the progress bars of transformers and huggingface_hub (weight loading, shard writing)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_model(args):
    from dyco_probe.models.loading import load

    return load(args.model, device=args.device, dtype=args.dtype)


def load_examples(args) -> tuple[list, dict]:
    """Examples from ``--data`` (a VLM-R1 jsonl: every usable line unless ``--n``) or the synthetic
    ``--split`` (``--n``, default per command), and a record of what was used: ``source``, ``n``,
    ``available`` and, with ``--skip-bad``, the ``skipped`` lines. Skipped lines, and a file cut to
    ``--n``, are reported on stderr."""
    from dyco_probe.data import read_jsonl, synthetic_examples

    n = getattr(args, "n", None)
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not getattr(args, "data", None):
        n = n or getattr(args, "n_default", 200)
        return synthetic_examples(args.split, n), {"source": f"synthetic:{args.split}", "n": n}
    skipped: list[str] = []
    examples = read_jsonl(args.data, skip_bad=args.skip_bad, skipped=skipped)
    info = {"source": str(args.data), "n": len(examples), "available": len(examples)}
    if skipped:
        info["skipped"] = skipped
        print(f"skipped {len(skipped)} bad line(s) of {args.data}:", file=sys.stderr)
        for message in skipped:
            print(f"  {message}", file=sys.stderr)
    if n is not None and n < len(examples):
        examples = examples[:n]
        info["n"] = n
        print(
            f"using the first {n} of the {info['available']} usable examples of {args.data} (--n {n})",
            file=sys.stderr,
        )
    return examples, info


def data_text(info: dict) -> str:
    """One line on the data a command used, for its summary."""
    text = f"data: {info['source']}, {info['n']} examples"
    if info.get("available", info["n"]) != info["n"]:
        text += f" (the first {info['n']} of {info['available']}: --n)"
    if info.get("skipped"):
        text += f"; {len(info['skipped'])} bad line(s) skipped"
    return text


def emit(args, result: dict, text: str | None = None) -> None:
    """Print the human summary, then (with ``--json``) one JSON object as the last line."""
    if text:
        print(text)
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
