"""``dyco-probe roles``: label a saved trace's tokens and summarise the roles (optionally against the
synthetic task's ground truth).

    dyco-probe roles --trace runs/trace.parquet --labeller fisher_rao
    dyco-probe roles --trace runs/trace.parquet --labeller ratio_threshold --theta 0.3 --against ground_truth
    dyco-probe roles --trace runs/trace.parquet --labeller visual_dependency --counterfactual patches

``visual_dependency`` runs the model (``--model``, default the trace's) on the trace's tokens with the real
and a counterfactual image; the examples are rebuilt from a synthetic trace, or read from ``--data``.
"""

from __future__ import annotations

from dyco_probe.commands import add_command, emit
from dyco_probe.roles import TAU_TXT, TAU_VIS


def run(args) -> int:
    import torch

    from dyco_probe.labellers import check_options, compare_roles, get_labeller
    from dyco_probe.models.loading import load_tokenizer
    from dyco_probe.roles import ROLE_NAMES
    from dyco_probe.tracing import Trace

    trace = Trace.load(args.trace)
    options = {}
    if args.labeller == "ratio_threshold":
        options = {"theta": args.theta, "theta_txt": args.theta_txt}
    elif args.labeller == "visual_dependency":
        names = ("visual_above", "text_below", "counterfactual", "divergence", "mask_fraction", "patch_size")
        options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
        options["batch_size"] = args.batch_size
    elif args.labeller != "ground_truth":
        options = {"tau_vis": args.tau_vis, "tau_txt": args.tau_txt}
    check_options(args.labeller, options)
    if args.against:
        get_labeller(args.against)
    used = (args.labeller, args.against)
    tokenizer = handle = examples = None
    if "ground_truth" in used or "visual_dependency" in used:
        source = args.model or trace.metadata.get("model_source")
        if not source:
            raise ValueError(
                f"{' and '.join(u for u in used if u)} need(s) the model or its tokenizer: pass --model"
            )
        if "visual_dependency" in used:
            from dyco_probe.models.loading import load

            handle = load(source, device=args.device)
            tokenizer = handle.tokenizer
        else:
            tokenizer = load_tokenizer(source)
    if args.data:
        from dyco_probe.data import read_jsonl

        examples = read_jsonl(args.data)
    context = {"tokenizer": tokenizer, "handle": handle, "examples": examples}
    roles = get_labeller(args.labeller)(trace, **context, **options)
    mask = trace.mask.bool()
    valid = roles[mask]
    result = {
        "trace": args.trace,
        "labeller": args.labeller,
        "options": options,
        "tokens": int(mask.sum()),
        "role_fractions": {n: round(float((valid == i).float().mean()), 4) for i, n in enumerate(ROLE_NAMES)},
        "mean_r_vis_norm_by_role": {
            n: (round(float(trace.r_vis_norm[mask][valid == i].mean()), 4) if (valid == i).any() else None)
            for i, n in enumerate(ROLE_NAMES)
        },
    }
    lines = [
        f"{args.labeller} on {result['tokens']} tokens of {trace.batch_size} completions: "
        + ", ".join(f"{n} {f:.3f}" for n, f in result["role_fractions"].items()),
        "mean normalised visual ratio by role: "
        + ", ".join(
            f"{n} {'-' if v is None else f'{v:.4f}'}" for n, v in result["mean_r_vis_norm_by_role"].items()
        ),
    ]
    if args.against:
        reference = get_labeller(args.against)(trace, **context)
        result["against"] = args.against
        for neutral in ("included", "excluded"):
            scores = compare_roles(roles, reference, trace.mask, neutral=neutral)
            result[f"neutral_{neutral}"] = scores
            lines.append(
                f"vs {args.against}, neutral tokens {neutral}: macro F1 {scores['macro_f1']:.3f}, accuracy "
                f"{scores['accuracy']:.3f}; "
                + "; ".join(
                    f"{n} P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f}"
                    for n, v in scores["roles"].items()
                )
            )
    if args.out:
        torch.save(
            {"roles": roles, "mask": trace.mask, "labeller": args.labeller, "options": options}, args.out
        )
        result["out"] = args.out
    emit(args, result, "\n".join(lines))
    return 0


def register(sub) -> None:
    p = add_command(sub, "roles", run, "label a saved trace's tokens with a role labeller and summarise")
    p.add_argument("--trace", required=True, help="a parquet trace, from dyco-probe trace --out (required)")
    from dyco_probe.counterfactual import COUNTERFACTUALS
    from dyco_probe.dependency import DIVERGENCES
    from dyco_probe.labellers import DEPENDENCY_DEFAULTS, LABELLERS

    d = DEPENDENCY_DEFAULTS
    p.add_argument(
        "--labeller", default="fisher_rao", help=f"one of {', '.join(LABELLERS)} (default: fisher_rao)"
    )
    p.add_argument(
        "--tau-vis",
        type=float,
        default=TAU_VIS,
        help=f"dynamics rules: visual if delta > tau_vis (default: {TAU_VIS})",
    )
    p.add_argument(
        "--tau-txt",
        type=float,
        default=TAU_TXT,
        help=f"dynamics rules: text if delta < -tau_txt (default: {TAU_TXT})",
    )
    p.add_argument(
        "--theta",
        type=float,
        default=0.5,
        help="ratio_threshold: visual if r_vis_norm > theta (default: 0.5)",
    )
    p.add_argument(
        "--theta-txt",
        type=float,
        default=None,
        help="ratio_threshold: text if r_vis_norm < this (default: theta)",
    )
    p.add_argument(
        "--visual-above",
        type=float,
        help=f"visual_dependency: visual if the score > this, in nats (default: {d['visual_above']})",
    )
    p.add_argument(
        "--text-below",
        type=float,
        help=f"visual_dependency: text if the score < this, in nats (default: {d['text_below']})",
    )
    p.add_argument(
        "--counterfactual",
        choices=COUNTERFACTUALS,
        help=f"visual_dependency: the image compared with the real one (default: {d['counterfactual']})",
    )
    p.add_argument(
        "--divergence",
        choices=DIVERGENCES,
        help=f"visual_dependency: kl (full distributions) or k3 (sampled token) (default: {d['divergence']})",
    )
    p.add_argument(
        "--mask-fraction",
        type=float,
        help=f"visual_dependency, patches: share of patches blacked out (default: {d['mask_fraction']})",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        help="visual_dependency, patches: patch side in pixels (default: one image token)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="visual_dependency: completions per forward (default: 32)"
    )
    p.add_argument("--against", help="compare with another labeller, e.g. ground_truth (default: none)")
    p.add_argument(
        "--model",
        help="the model (visual_dependency) or its tokenizer (ground truth); default: the trace's model",
    )
    p.add_argument("--device", help="visual_dependency: where the model runs (default cpu)")
    p.add_argument(
        "--data", help="a jsonl of the trace's examples (default: rebuilt from a synthetic trace's records)"
    )
    p.add_argument("--out", help="save the roles tensor here with torch.save (default: none)")
