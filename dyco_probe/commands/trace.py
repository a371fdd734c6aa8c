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

from dyco_probe.commands import add_command, add_data_args, add_model_args, emit, load_examples, load_model


def parse_indices(text: str | None):
    """``None`` -> None, ``"all"`` -> "all", ``"0,2,-1"`` -> (0, 2, -1)."""
    if text is None or text == "":
        return None
    if text == "all":
        return "all"
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected 'all' or comma-separated integers, got {text!r}") from None


def read_completions(path: str, examples: list) -> tuple[list, list[str]]:
    """Examples and completion texts from a jsonl of ``{"id", "completion"}`` records (``eval --out``)."""
    by_id = {str(ex.id): ex for ex in examples}
    rows, texts = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
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
        "roles (SPEC 4 rule, tau_vis 0, tau_txt 0.05): "
        + ", ".join(f"{name} {frac:.3f}" for name, frac in roles.items()),
    ]
    if "accuracy" in summary:
        lines.append(f"accuracy {summary['accuracy']:.3f}, format {summary['format_rate']:.3f}")
    return "\n".join(lines)


def run(args) -> int:
    from dyco_probe.api import trace, trace_completions
    from dyco_probe.tracing import TraceConfig

    heads = parse_indices(args.heads)
    config = TraceConfig(
        layers=parse_indices(args.layers),
        heads=None if heads == "all" else heads,
        per_layer=args.per_layer,
        text_span=args.text_span,
        distance=args.distance,
        image_rows=args.image_rows,
    )
    handle = load_model(args)
    examples = load_examples(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    if args.gold or args.completions:
        if args.gold:
            missing = [ex.id for ex in examples if ex.completion is None]
            if missing:
                raise ValueError(f"example {missing[0]!r} has no gold completion")
            rows, texts = examples, [ex.completion for ex in examples]
        else:
            rows, texts = read_completions(args.completions, examples)
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
    result.save(out)
    shutil.rmtree(parts, ignore_errors=True)
    summary = {**result.summary(), "out": str(out)}
    emit(args, summary, summary_text(summary, str(out)))
    return 0


def register(sub) -> None:
    p = add_command(
        sub, "trace", run, "generate and trace completions (per-token cross-modal attention signals)"
    )
    add_model_args(p)
    add_data_args(p, n_default=64)
    p.add_argument("--out", default="runs/trace.parquet", help="parquet trace to write")
    g = p.add_argument_group("tracing")
    g.add_argument("--layers", help="probed layers: 'all' or comma-separated indices (default: the last)")
    g.add_argument("--heads", help="probed heads: comma-separated indices (default: all)")
    g.add_argument("--per-layer", action="store_true", help="also keep each probed layer's signals")
    g.add_argument("--text-span", default="post_image", choices=["post_image", "all_text"])
    g.add_argument(
        "--distance",
        default="fisher_rao",
        choices=["fisher_rao", "hellinger", "l2", "jensen_shannon", "symmetric_kl"],
        help="distance of the dynamics v_vis, v_txt",
    )
    g.add_argument(
        "--image-rows", action="store_true", help="keep each token's attention over the image tokens"
    )
    g.add_argument(
        "--backend",
        choices=["native", "eager", "nnsight", "transformer_lens"],
        help="trace teacher-forced with this backend (default: online during generation; native for --gold/--completions)",
    )
    s = p.add_argument_group("completions")
    s.add_argument(
        "--gold", action="store_true", help="trace the examples' gold completions (teacher-forced)"
    )
    s.add_argument(
        "--completions", help="trace the completions of a jsonl of {id, completion} (e.g. eval --out)"
    )
    s.add_argument("--max-new-tokens", type=int, default=96)
    s.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--num-samples", type=int, default=1, help="completions per example (with --sample)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--image-mode", default="normal", choices=["normal", "blank", "swap"])
