"""``dyco-probe trace``: generate and trace completions (or trace given ones), write a parquet trace.

    dyco-probe trace --model builtin --split test --n 64 --out runs/trace.parquet
    dyco-probe trace --gold --backend eager --out runs/gold.parquet          # teacher-forced gold chains
    dyco-probe trace --completions runs/eval.jsonl --out runs/eval_trace.parquet   # e.g. `eval --out`

Batches are written to ``<out>.parts/`` as they finish; rerunning the same command resumes there, and
the folder is removed once the trace is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dyco_probe.commands import (
    add_command,
    add_data_args,
    add_model_args,
    data_text,
    emit,
    load_examples,
    load_model,
)
from dyco_probe.files import check_writable
from dyco_probe.layers import parse_layer_choice
from dyco_probe.roles import TAU_TXT, TAU_VIS


def read_completions(path: str, examples: list) -> tuple[list, list[str]]:
    """Examples and completion texts from a jsonl of ``{"id", "completion"}`` records (``eval --out``).

    A missing file, a line that is not a JSON object, an unknown id or a record without a completion
    text is a ``ValueError`` naming the file and line.
    """
    by_id = {str(ex.id): ex for ex in examples}
    rows, texts = [], []
    try:
        f = open(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the completions file ({e.strerror or e})") from e
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            key = str(record.get("id"))
            if key not in by_id:
                raise ValueError(
                    f"{path}:{lineno}: id {key!r} is not among the loaded examples (check --split/--n/--data)"
                )
            if not isinstance(record.get("completion"), str):
                raise ValueError(f"{path}:{lineno}: no 'completion' text")
            rows.append(by_id[key])
            texts.append(record["completion"])
    if not rows:
        raise ValueError(f"{path}: no completions")
    return rows, texts


def summary_text(summary: dict, out: str) -> str:
    roles = summary["role_fractions"]
    lines = [
        f"traced {summary['samples']} completions ({summary['tokens']} tokens, mean {summary['mean_tokens']:.1f}) -> {out}",
        f"mean r_vis {summary['mean_r_vis']:.4f} (normalised {summary['mean_r_vis_norm']:.4f}); "
        f"mean v_vis {summary['mean_v_vis']:.4f}, v_txt {summary['mean_v_txt']:.4f} ({summary['distance']})",
        f"roles (Fisher–Rao rule, tau_vis {TAU_VIS:g}, tau_txt {TAU_TXT:g}; docs/method.md#token-roles): "
        + ", ".join(f"{name} {frac:.3f}" for name, frac in roles.items()),
    ]
    if "accuracy" in summary:
        lines.append(f"accuracy {summary['accuracy']:.3f}, format {summary['format_rate']:.3f}")
    if "data" in summary:
        lines.append(data_text(summary["data"]))
    return "\n".join(lines)


def check_output(out: Path, parts: Path, overwrite: bool) -> None:
    """Refuse to replace a finished trace unless ``--overwrite``; an unfinished run of the same
    command (``<out>.parts/``) resumes."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .parquet file")
    if out.exists() and not overwrite and not parts.exists():
        raise ValueError(
            f"{out} already exists (a finished trace); pass --overwrite to replace it, or choose another --out"
        )
    check_writable(out)


def run(args) -> int:
    from dyco_probe.api import trace, trace_completions
    from dyco_probe.tracing import TraceConfig

    heads = parse_layer_choice(args.heads)
    config = TraceConfig(
        layers=parse_layer_choice(args.layers),
        heads=None if heads == "all" else heads,
        per_layer=args.per_layer,
        text_span=args.text_span,
        distance=args.distance,
        image_rows=args.image_rows,
    )
    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")
    check_output(out, parts, args.overwrite)
    examples, data = load_examples(args)
    if args.gold:
        missing = [ex.id for ex in examples if ex.completion is None]
        if missing:
            raise ValueError(
                f"example {missing[0]!r} has no gold completion (--gold needs a 'completion' key)"
            )
        rows, texts = examples, [ex.completion for ex in examples]
    elif args.completions:
        rows, texts = read_completions(args.completions, examples)
    handle = load_model(args)
    if args.overwrite and parts.exists():
        shutil.rmtree(parts)  # asked to start over: an earlier run's batches are not reused
    if args.gold or args.completions:
        result = trace_completions(
            handle,
            rows,
            texts,
            config=config,
            backend=args.backend or "native",
            batch_size=args.batch_size,
            image_mode=args.image_mode,
            parts=parts,
            progress=not args.quiet,
        )
    else:
        result = trace(
            handle,
            examples,
            config=config,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            image_mode=args.image_mode,
            seed=args.seed,
            backend=args.backend,
            parts=parts,
            progress=not args.quiet,
        )
    result.trace.metadata["data"] = data
    result.save(out)
    shutil.rmtree(parts, ignore_errors=True)
    summary = {**result.summary(), "out": str(out), "data": data}
    emit(args, summary, summary_text(summary, str(out)))
    return 0


def register(sub) -> None:
    p = add_command(
        sub, "trace", run, "generate and trace completions (per-token cross-modal attention signals)"
    )
    add_model_args(p)
    add_data_args(p, n_default=64)
    p.add_argument(
        "--out", default="runs/trace.parquet", help="parquet trace to write (default: runs/trace.parquet)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out and start over (default: refuse; an interrupted run resumes)",
    )
    g = p.add_argument_group("tracing")
    g.add_argument("--layers", help="probed layers: 'all' or comma-separated indices (default: the last)")
    g.add_argument("--heads", help="probed heads: comma-separated indices (default: all)")
    g.add_argument(
        "--per-layer", action="store_true", help="also keep each probed layer's signals (default: off)"
    )
    g.add_argument(
        "--text-span",
        default="post_image",
        choices=["post_image", "all_text"],
        help="text positions r_txt counts (default: post_image, the question and completion so far)",
    )
    g.add_argument(
        "--distance",
        default="fisher_rao",
        choices=["fisher_rao", "hellinger", "l2", "jensen_shannon", "symmetric_kl"],
        help="distance of the dynamics v_vis, v_txt (default: fisher_rao)",
    )
    g.add_argument(
        "--image-rows",
        action="store_true",
        help="keep each token's attention over the image tokens, for heat-maps (default: off)",
    )
    g.add_argument(
        "--backend",
        choices=["native", "eager", "nnsight", "transformer_lens"],
        help="trace teacher-forced with this backend (default: online during generation; native for --gold/--completions)",
    )
    s = p.add_argument_group("completions")
    s.add_argument(
        "--gold",
        action="store_true",
        help="trace the examples' gold completions teacher-forced (default: generate)",
    )
    s.add_argument(
        "--completions",
        help="trace the completions of a jsonl of {id, completion}, e.g. eval --out (default: generate)",
    )
    s.add_argument(
        "--max-new-tokens", type=int, default=96, help="longest completion generated (default: 96)"
    )
    s.add_argument(
        "--sample", action="store_true", help="sample instead of greedy decoding (default: greedy)"
    )
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    s.add_argument(
        "--num-samples", type=int, default=1, help="completions per example, with --sample (default: 1)"
    )
    s.add_argument(
        "--seed", type=int, default=None, help="sampling seed; batch k uses seed + k (default: unseeded)"
    )
    s.add_argument(
        "--image-mode",
        default="normal",
        choices=["normal", "blank", "swap"],
        help="images shown: the example's own, blank, or the next example's (default: normal)",
    )
