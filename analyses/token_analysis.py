"""Token-level analysis of correct vs incorrect trajectories (the paper's token analyses).

Generates and traces greedy completions (or reads a saved trace), labels every token (the Fisher–Rao
rule by default, the synthetic task's ground truth, or the counterfactual visual dependency), and
compares correct with incorrect
trajectories: role fractions, distributions of the alignment score `s_t`, the normalised visual ratio
of visual-role tokens and text ratio of text-role tokens, the role-switch rate, and how well the
sample score tells correct from incorrect (AUROC with a bootstrap CI). Writes to ``--out``
(default ``figures/``):

- ``token_analysis_{overview,role_fractions,s_distributions,ratio_distributions,switch_rate,auroc,
  feature_auroc}.{png,pdf}``: the figures, in the paper style;
- ``token_analysis.md`` / ``.json``: the tables (means over trajectories, 95% CIs) and the headline
  numbers; ``token_analysis_samples.csv``: one row per trajectory;
- ``token_timelines.html``: interactive timelines of a few trajectories and the image heat-map
  (self-contained, opens offline).

    python -m analyses.token_analysis                                   # built-in model, 200 test problems
    python -m analyses.token_analysis --roles ground_truth              # the task's true roles instead
    python -m analyses.token_analysis --roles visual_dependency         # roles from the image counterfactual
    python -m analyses.token_analysis --trace runs/demo/trace.parquet   # a saved trace
    python -m analyses.token_analysis --model /models/Qwen2.5-VL-3B-Instruct --data my.jsonl \\
        --device cuda --dtype bfloat16 --n 500 --max-new-tokens 512     # a real checkpoint on a GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def get_trace(args):
    """The trace to analyse (cached in ``--runs``), and the tokenizer and examples ground truth needs."""
    import dyco_probe as dp
    from dyco_probe.models.loading import weights_digest

    if args.trace:
        return dp.Trace.load(args.trace), None, None
    examples = dp.read_jsonl(args.data)[: args.n] if args.data else dp.synthetic_examples(args.split, args.n)
    name = (
        Path(args.model).name
        + f"-{weights_digest(args.model, missing='nohash')}"  # a retrained checkpoint never reuses a stale trace
        + (f"-{Path(args.data).stem}" if args.data else f"-{args.split}")
        + f"-n{args.n}"
    )
    path = Path(args.runs) / f"{name}.parquet"
    handle = dp.load(args.model, device=args.device, dtype=args.dtype)
    if path.exists():
        return dp.Trace.load(path), examples, handle.tokenizer
    path.parent.mkdir(parents=True, exist_ok=True)
    result = dp.trace(
        handle,
        examples,
        config=dp.TraceConfig(image_rows=True),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        parts=path.with_name(path.name + ".parts"),
        progress=not args.quiet,
    )
    result.save(path)
    return result.trace, examples, handle.tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="builtin (default) or a checkpoint directory")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--split", default="test", help="synthetic split")
    p.add_argument("--data", help="a VLM-R1 jsonl instead of the synthetic task")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trace", help="analyse this saved trace instead of generating one")
    p.add_argument(
        "--roles", default="fisher_rao", choices=["fisher_rao", "ground_truth", "visual_dependency"]
    )
    p.add_argument("--out", default=str(ROOT / "figures"), help="where figures and tables go")
    p.add_argument("--runs", default=str(ROOT / "runs" / "token_analysis"), help="trace cache")
    p.add_argument("--prefix", default="token_analysis", help="file name prefix")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--timelines", type=int, default=4, help="trajectories in token_timelines.html")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import torch

    import dyco_probe as dp
    from dyco_probe import viz
    from dyco_probe.analysis import analyse_tokens

    torch.set_num_threads(args.threads)
    trace, examples, tokenizer = get_trace(args)
    roles = None
    if args.roles == "ground_truth":
        if tokenizer is None:
            from dyco_probe.models.loading import load_tokenizer

            tokenizer = load_tokenizer(trace.metadata.get("model_source") or args.model)
        roles = dp.get_labeller("ground_truth")(trace, examples=examples, tokenizer=tokenizer)
    elif args.roles == "visual_dependency":  # runs the trace's model, real and blank image (its defaults)
        handle = dp.load(
            trace.metadata.get("model_source") or args.model, device=args.device, dtype=args.dtype
        )
        roles = dp.get_labeller("visual_dependency")(trace, examples=examples, handle=handle)
    result = analyse_tokens(trace, roles=roles, roles_name=args.roles, n_boot=args.n_boot)

    out = Path(args.out)
    viz.save_token_analysis_figures(result, out, prefix=args.prefix)
    model = trace.metadata.get("model_source") or args.model
    text = f"# Token-level analysis\n\nModel `{model}`. " + result.to_markdown()
    (out / f"{args.prefix}.md").write_text(text)
    (out / f"{args.prefix}.json").write_text(json.dumps(result.headline(), indent=2) + "\n")
    result.samples.to_csv(out / f"{args.prefix}_samples.csv", index=False, float_format="%.6g")

    figures = []
    samples = trace.samples or []
    good = [i for i, s in enumerate(samples) if s.get("correct")]
    bad = [i for i, s in enumerate(samples) if not s.get("correct")]
    picked = [i for pair in zip(good, bad) for i in pair][: args.timelines] or list(
        range(min(args.timelines, len(trace)))
    )
    for i in picked:
        figures.append(viz.token_timeline(trace, i, roles=roles))
    if picked and trace.image_rows is not None:
        figures.append(viz.image_view(trace, picked[0], examples=examples, roles=roles))
    if figures:
        viz.save_html(figures, out / "token_timelines.html", title="dyco_probe token timelines")
    print(text)
    print(f"wrote {out}/{args.prefix}_*.png/.pdf, {args.prefix}.md/.json, token_timelines.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
