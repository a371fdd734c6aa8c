"""The ``dyco-probe`` command line. Thin: every command calls the library.

Every command takes ``--json``: it then prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_result(args, result: dict, text: str | None = None) -> None:
    if text:
        print(text)
    if args.json:
        print(json.dumps(result, default=str))


def _examples(args):
    """Examples from ``--data`` (a VLM-R1 jsonl) or the synthetic ``--split``."""
    from dyco_probe.data import read_jsonl, synthetic_examples

    if getattr(args, "data", None):
        examples = read_jsonl(args.data, skip_bad=args.skip_bad)
        return examples[: args.n] if args.n else examples
    return synthetic_examples(args.split, args.n or 200)


def _add_data_args(p, n_default=200):
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="synthetic split")
    p.add_argument("--data", help="a VLM-R1 jsonl file instead of the synthetic task")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad jsonl lines")
    p.add_argument("--n", type=int, default=n_default, help="number of examples")


def _add_model_args(p):
    p.add_argument("--model", default="builtin", help="'builtin' or a local checkpoint directory")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)


def _load(args):
    from dyco_probe.models.loading import load

    return load(args.model, device=args.device, dtype=args.dtype)


def cmd_eval(args) -> int:
    from dyco_probe.evaluation import evaluate

    handle = _load(args)
    examples = _examples(args)
    res = evaluate(
        handle,
        examples,
        image_mode=args.image_mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    s = res.summary()
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
        s["records"] = args.out
    _print_result(args, s, text)
    return 0


def cmd_export(args) -> int:
    from dyco_probe.data import synthetic_examples, write_jsonl
    from dyco_probe.task.problems import TaskConfig

    config = TaskConfig(**json.loads(args.task_config)) if args.task_config else TaskConfig()
    path = write_jsonl(synthetic_examples(args.split, args.n, config), args.out)
    _print_result(
        args, {"jsonl": str(path), "n": args.n, "split": args.split}, f"wrote {args.n} examples to {path}"
    )
    return 0


def cmd_pretrain(args) -> int:
    from dyco_probe.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr
    )
    if args.tiny:
        cfg = cfg.tiny()
    result = pretrain(cfg, resume=not args.no_resume, progress=not args.quiet)
    _print_result(args, result, f"saved the model to {result['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyco-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = command("eval", cmd_eval, "answer accuracy of a model on the synthetic task or a jsonl file")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--image-mode", default="normal", choices=["normal", "blank", "swap"])
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", help="write per-example records (jsonl) here")

    p = command("export", cmd_export, "export a synthetic split in VLM-R1 jsonl format with PNG images")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", required=True, help="jsonl path; images go next to it")
    p.add_argument("--task-config", help="JSON object of TaskConfig knobs, e.g. '{\"max_hops\": 2}'")

    p = command("pretrain", cmd_pretrain, "train the built-in model by supervised fine-tuning (resumable)")
    p.add_argument(
        "--out", default="runs/pretrain", help="output directory (checkpoints and the final model)"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (for tests)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    return parser


def _version() -> str:
    from dyco_probe import __version__

    return f"dyco-probe {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        print(f"dyco-probe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
