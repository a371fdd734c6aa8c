"""Do the role labellers find the synthetic task's true roles? And do the published thresholds suit it?

On the built-in model and the test split: generate greedy completions with online tracing (the
default probe: last layer, all heads), label their tokens with every labeller, and compare with the
ground truth of the task's grammar (`dyco_probe.task.alignment`). Writes to ``figures/``:

- ``labeller_validation.md`` / ``.csv``: precision, recall, F1 per role of every labeller, with neutral
  tokens excluded (only tokens whose true role is visual or text count) and included (three classes),
  macro F1 with a 95% bootstrap interval over examples; the same for each probed layer; and the share of
  ground-truth visual tokens whose image attention peaks on the relevant image token (the cell of the
  object the token names), against chance (1 / number of image tokens);
- ``labeller_threshold_sweep.csv`` and ``labeller_threshold_sweep.{png,pdf}``: macro F1 of the
  role rule (docs/method.md#token-roles) over a (tau_vis, tau_txt) grid, and of the ratio baseline over theta. To judge the published
  defaults without fooling ourselves, thresholds are chosen on one half of the examples and scored on
  the other (and vice versa); the defaults are scored on the same held-out halves;
- ``labeller_visual_peaks.csv``: the same peak shares over the tokens each labeller calls visual (ground
  truth, every distance's rule, the ratio baseline), counted over those that have a relevant image token,
  and how many of its visual tokens have none (they are not look-ups);
- ``labeller_validation.{png,pdf}``: F1 per role and macro F1 (95% bootstrap interval) of every labeller,
  neutral tokens excluded and included (`dyco_probe.viz.plot_labeller_validation`);
- ``labeller_delta_by_role.{png,pdf}``: the distribution of Δ = v_vis − v_txt by true role, and the
  attention-peak share per layer;
- ``labeller_dependency.md`` / ``.csv``, ``labeller_dependency_thresholds.csv`` and
  ``labeller_dependency_vs_delta.{png,pdf}``: the counterfactual labeller (``visual_dependency``) for each
  counterfactual image and divergence: P / R / F1 per role and macro F1 (95% CI) at the library's default
  thresholds, the AUROC of its score for visual tokens, thresholds chosen on this set and on one half
  scored on the other, how its visual tokens overlap the Fisher–Rao rule's, and per token the rule's Δ
  against the dependency score by true role. Its rows at the default thresholds (KL) also join the main
  table. ``--only dependency`` computes this part alone (no per-distance or per-layer traces); on the
  ``val`` split it is how the defaults were chosen.

Traces are cached in ``--runs``, keyed by the weights' hash, split, n and token budget (reruns reuse
them; ``api.trace`` resumes an interrupted generation).

    python -m analyses.validate_labellers                   # built-in model, 500 test examples
    python -m analyses.validate_labellers --model path/to/checkpoint --n 200
    python -m analyses.validate_labellers --only dependency --split val --n 300 --out runs/dependency-val
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DISTANCES = ("fisher_rao", "hellinger", "l2", "jensen_shannon", "symmetric_kl")
TAU_TXT_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# negative tau_vis moves the visual boundary below zero (allowed while tau_vis >= -tau_txt)
TAU_VIS_GRID = (-0.1, -0.05, -0.02, -0.01, -0.005) + TAU_TXT_GRID
THETA_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
DEFAULT_TAU = (0.0, 0.05)
BOOTSTRAP = 500
COUNTERFACTUALS = ("blank", "patches", "swap")
DIVERGENCES = ("kl", "k3")
# dependency thresholds (nats), for visual_above and text_below alike
DEPENDENCY_GRID = (0.0, 1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


# -- traces -------------------------------------------------------------------------------------------


def cached(path: Path, make):
    from dyco_probe.tracing import Trace

    if path.exists():
        return Trace.load(path)
    tr = make()
    tr.save(path)
    return tr


def collect(args) -> dict:
    """The online trace (with image rows) and teacher-forced traces of the same tokens per distance and layer."""
    from dyco_probe.api import trace, trace_completions
    from dyco_probe.data import synthetic_examples
    from dyco_probe.models.loading import load
    from dyco_probe.tracing import TraceConfig

    # traces depend on the weights and the data: one cache folder per (weights, split, n, budget)
    key = f"{fingerprint(args.model)}-{args.split}-{args.n}-{args.max_new_tokens}"
    runs = Path(args.runs) / key / args.completions
    runs.mkdir(parents=True, exist_ok=True)
    handle = load(args.model)
    examples = synthetic_examples(args.split, args.n)

    def online():
        if args.completions == "gold":  # the gold chains, teacher-forced
            gold = [ex.completion for ex in examples]
            config = TraceConfig(image_rows=True)
            return trace_completions(handle, examples, gold, config=config, batch_size=args.batch_size).trace
        return trace(
            handle,
            examples,
            config=TraceConfig(image_rows=True),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            parts=runs / "online.parts",
        ).trace

    main = cached(runs / "traced.parquet", online)
    if args.only == "dependency":
        return {"handle": handle, "examples": examples, "online": main, "runs": runs}
    ids = [main.token_ids[i][main.mask[i]].tolist() for i in range(main.batch_size)]

    def offline(config):
        return lambda: (
            trace_completions(handle, examples, ids, config=config, batch_size=args.batch_size).trace
        )

    by_distance = {
        d: cached(runs / f"offline_{d}.parquet", offline(TraceConfig(distance=d))) for d in DISTANCES
    }
    layers = range(handle.num_layers)
    by_layer = {
        layer: cached(
            runs / f"offline_layer{layer}.parquet", offline(TraceConfig(layers=(layer,), image_rows=True))
        )
        for layer in layers
    }
    by_layer["all"] = cached(
        runs / "offline_layer_all.parquet", offline(TraceConfig(layers="all", image_rows=True))
    )
    last = handle.num_layers - 1
    for head in range(handle.num_heads):  # the heads of the probed (last) layer, one at a time
        by_layer[f"{last}/h{head}"] = cached(
            runs / f"offline_layer{last}_head{head}.parquet",
            offline(TraceConfig(layers=(last,), heads=(head,), image_rows=True)),
        )
    return {
        "handle": handle,
        "examples": examples,
        "online": main,
        "runs": runs,
        "by_distance": by_distance,
        "by_layer": by_layer,
    }


# -- metrics ------------------------------------------------------------------------------------------


def bootstrap_macro(pred, truth, mask, neutral: str, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the macro F1 over examples resampled with replacement."""
    from dyco_probe.labellers import compare_roles

    g = torch.Generator().manual_seed(seed)
    b = pred.shape[0]
    values = []
    for _ in range(BOOTSTRAP):
        idx = torch.randint(0, b, (b,), generator=g)
        values.append(compare_roles(pred[idx], truth[idx], mask[idx], neutral=neutral)["macro_f1"])
    values = sorted(v for v in values if not math.isnan(v))
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def score_rows(name: str, setting: str, pred, truth, mask) -> list[dict]:
    from dyco_probe.labellers import compare_roles

    rows = []
    for neutral in ("excluded", "included"):
        res = compare_roles(pred, truth, mask, neutral=neutral)
        lo, hi = bootstrap_macro(pred, truth, mask, neutral)
        for role, v in res["roles"].items():
            rows.append(
                {
                    "labeller": name,
                    "setting": setting,
                    "neutral": neutral,
                    "role": role,
                    **{k: v[k] for k in ("precision", "recall", "f1", "support", "predicted")},
                    "macro_f1": res["macro_f1"],
                    "macro_f1_lo": lo,
                    "macro_f1_hi": hi,
                    "accuracy": res["accuracy"],
                    "tokens": res["tokens"],
                }
            )
    return rows


def macro(pred, truth, mask, neutral: str) -> float:
    from dyco_probe.labellers import compare_roles

    return compare_roles(pred, truth, mask, neutral=neutral)["macro_f1"]


def sweep(trace, truth, rows_subset=None) -> list[dict]:
    """Macro F1 of the role rule (docs/method.md#token-roles) over the (tau_vis, tau_txt) grid (on `rows_subset` of the samples)."""
    from dyco_probe.roles import label_roles

    idx = torch.arange(trace.batch_size) if rows_subset is None else rows_subset
    v_vis, v_txt, mask, t = trace.v_vis[idx], trace.v_txt[idx], trace.mask[idx], truth[idx]
    out = []
    for tau_vis in TAU_VIS_GRID:
        for tau_txt in TAU_TXT_GRID:
            if tau_vis < -tau_txt:
                continue
            pred = label_roles(v_vis, v_txt, mask, tau_vis=tau_vis, tau_txt=tau_txt)
            out.append(
                {
                    "rule": "dynamics",
                    "tau_vis": tau_vis,
                    "tau_txt": tau_txt,
                    "macro_f1_excluded": macro(pred, t, mask, "excluded"),
                    "macro_f1_included": macro(pred, t, mask, "included"),
                    "visual_fraction": float((pred[mask] == 1).float().mean()),
                    "text_fraction": float((pred[mask] == 2).float().mean()),
                }
            )
    return out


def theta_sweep(trace, truth, rows_subset=None) -> list[dict]:
    from dyco_probe.labellers import ratio_threshold

    idx = torch.arange(trace.batch_size) if rows_subset is None else rows_subset
    sub = trace.select(idx.tolist())
    out = []
    for theta in THETA_GRID:
        pred = ratio_threshold(sub, theta=theta)
        out.append(
            {
                "rule": "ratio",
                "theta": theta,
                "macro_f1_excluded": macro(pred, truth[idx], sub.mask, "excluded"),
                "macro_f1_included": macro(pred, truth[idx], sub.mask, "included"),
            }
        )
    return out


def held_out(trace, truth, key: str) -> dict:
    """Thresholds chosen on one half of the samples, scored on the other half, both ways; the published
    defaults scored on the same halves."""
    from dyco_probe.roles import label_roles

    b = trace.batch_size
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0))
    halves = (perm[: b // 2], perm[b // 2 :])
    tuned, default, chosen = [], [], []
    neutral = key.rsplit("_", 1)[-1]
    for fit, test in (halves, halves[::-1]):
        best = max(sweep(trace, truth, fit), key=lambda r: r[key])
        chosen.append((best["tau_vis"], best["tau_txt"]))
        v_vis, v_txt, mask, t = trace.v_vis[test], trace.v_txt[test], trace.mask[test], truth[test]
        tuned.append(macro(label_roles(v_vis, v_txt, mask, *chosen[-1]), t, mask, neutral))
        default.append(macro(label_roles(v_vis, v_txt, mask, *DEFAULT_TAU), t, mask, neutral))
    return {"chosen": chosen, "tuned": sum(tuned) / 2, "default": sum(default) / 2}


def visual_token_peaks(trace, relevant, objects, predictions, truth) -> list[dict]:
    """For each `(labeller, setting, roles)`: how many tokens it calls visual, how many of those have a
    relevant image token (a look-up: only ground-truth visual tokens have one), and, over those, the share
    whose image attention peaks on a relevant image token (`attention_peak_share`) and on any object's cell.
    The labeller's other visual tokens name no object, so their peak says nothing about a look-up: they
    are counted (with their true roles), not scored."""
    from dyco_probe.labellers import attention_peak_share
    from dyco_probe.roles import Role

    has_relevant = relevant.any(-1)
    objects = objects & has_relevant[..., None]  # the same tokens as the relevant-token share
    out = []
    for name, setting, pred in predictions:
        called = trace.mask.bool() & (pred == int(Role.VISUAL))
        unrelated = called & ~has_relevant
        peak = attention_peak_share(trace, relevant, pred)
        on_object = attention_peak_share(trace, objects, pred)
        out.append(
            {
                "labeller": name,
                "setting": setting,
                "visual_tokens": int(called.sum()),
                "with_relevant": int((called & has_relevant).sum()),
                "without_relevant": int(unrelated.sum()),
                "without_relevant_share": float(unrelated.sum() / called.sum())
                if called.any()
                else float("nan"),
                "without_relevant_text": int((unrelated & (truth == int(Role.TEXT))).sum()),
                "without_relevant_neutral": int((unrelated & (truth == int(Role.NEUTRAL))).sum()),
                "peak_share": peak["share"],
                "chance": peak["chance"],
                "object_share": on_object["share"],
                "object_chance": on_object["chance"],
                "tokens": peak["tokens"],
            }
        )
    return out


# -- visual dependency (counterfactual labeller) ------------------------------------------------------


def counterfactual_name(cf: str, args) -> str:
    return f"patches {args.mask_fraction}" if cf == "patches" else cf


def dependency_scores(args, data) -> dict:
    """`{(counterfactual, divergence): [B, T] score}` of the online trace's tokens, cached in the runs folder."""
    from dyco_probe.counterfactual import visual_dependency_scores

    online, out = data["online"], {}
    for cf in args.counterfactuals:
        for div in args.divergences:
            extra = f"_{args.mask_fraction}" if cf == "patches" else ""
            path = data["runs"] / f"dependency_{cf}{extra}_{div}.pt"
            if not path.exists():
                score = visual_dependency_scores(
                    data["handle"],
                    data["examples"],
                    online.token_ids,
                    online.mask,
                    counterfactual=cf,
                    divergence=div,
                    mask_fraction=args.mask_fraction,
                    batch_size=args.batch_size,
                )
                torch.save(score, path)
            out[(cf, div)] = torch.load(path)
    return out


def dependency_setting(cf: str, div: str, args, thresholds) -> str:
    return f"{counterfactual_name(cf, args)}, {div}, {thresholds[0]:g} / {thresholds[1]:g}"


def overlap(pred_a, pred_b, truth, mask) -> dict:
    """How two labellers' visual tokens overlap, among true visual and other tokens."""
    from dyco_probe.roles import Role

    a, b = pred_a == int(Role.VISUAL), pred_b == int(Role.VISUAL)
    out = {}
    for name, group in (("true_visual", truth == int(Role.VISUAL)), ("other", truth != int(Role.VISUAL))):
        g = mask.bool() & group
        out[name] = {
            "tokens": int(g.sum()),
            "both": int((g & a & b).sum()),
            "only_first": int((g & a & ~b).sum()),
            "only_second": int((g & ~a & b).sum()),
            "neither": int((g & ~a & ~b).sum()),
        }
    return out


def dependency_section(args, data, truth, out: Path) -> tuple[list, list[str]]:
    """The counterfactual labeller against the ground truth; writes its files, returns its predictions
    for the main table (KL, default thresholds: `(labeller, setting, roles)`) and its Markdown."""
    import pandas as pd

    from dyco_probe.analysis import auroc_ci
    from dyco_probe.dependency import best_thresholds, dependency_roles, held_out_thresholds
    from dyco_probe.labellers import DEPENDENCY_DEFAULTS, get_labeller
    from dyco_probe.roles import Role
    from dyco_probe.viz import plot_dependency_vs_delta, save_figure

    online = data["online"]
    mask = online.mask
    defaults = (DEPENDENCY_DEFAULTS["visual_above"], DEPENDENCY_DEFAULTS["text_below"])
    default_cf, default_div = DEPENDENCY_DEFAULTS["counterfactual"], DEPENDENCY_DEFAULTS["divergence"]
    scores = dependency_scores(args, data)
    fr = get_labeller("fisher_rao")(online)
    rows = score_rows("fisher_rao", "tau 0 / 0.05 (published)", fr, truth, mask)
    summary, main_predictions, preds = [], [], {}
    for (cf, div), score in scores.items():
        setting = dependency_setting(cf, div, args, defaults)
        pred = dependency_roles(score, mask, *defaults)
        preds[(cf, div)] = pred
        rows += score_rows("visual_dependency", setting, pred, truth, mask)
        if div == "kl":
            main_predictions.append(("visual_dependency", setting, pred))
        auc = auroc_ci(
            score[mask].double().numpy(), (truth[mask] == int(Role.VISUAL)).numpy(), n_boot=BOOTSTRAP
        )
        best = best_thresholds(score, truth, mask, DEPENDENCY_GRID, neutral="excluded")
        held = {
            n: held_out_thresholds(score, truth, mask, DEPENDENCY_GRID, neutral=n)
            for n in ("excluded", "included")
        }
        default_f1 = {n: macro(pred, truth, mask, n) for n in ("excluded", "included")}
        summary.append(
            {
                "counterfactual": counterfactual_name(cf, args),
                "divergence": div,
                "auroc_visual": auc["auroc"],
                "auroc_visual_lo": auc["ci_low"],
                "auroc_visual_hi": auc["ci_high"],
                "median_visual": float(score[mask & (truth == int(Role.VISUAL))].median()),
                "median_other": float(score[mask & (truth != int(Role.VISUAL))].median()),
                "best_visual_above": best["visual_above"],
                "best_text_below": best["text_below"],
                "best_macro_f1_excluded": best["macro_f1"],
                "default_macro_f1_excluded": default_f1["excluded"],
                "default_macro_f1_included": default_f1["included"],
                "held_out_macro_f1_excluded": held["excluded"]["macro_f1"],
                "held_out_chosen_excluded": held["excluded"]["chosen"],
                "held_out_macro_f1_included": held["included"]["macro_f1"],
                "held_out_chosen_included": held["included"]["chosen"],
            }
        )
    pd.DataFrame(rows).to_csv(out / "labeller_dependency.csv", index=False)
    pd.DataFrame(summary).to_csv(out / "labeller_dependency_thresholds.csv", index=False)

    key = (default_cf, default_div) if (default_cf, default_div) in scores else next(iter(scores))
    fig = plot_dependency_vs_delta(online.v_vis - online.v_txt, scores[key], truth, mask, thresholds=defaults)
    save_figure(fig, out / "labeller_dependency_vs_delta", close=True)
    both = overlap(fr, preds[key], truth, mask)
    md = dependency_markdown(args, data, truth, rows, summary, both, key, defaults, scores[key])
    (out / "labeller_dependency.md").write_text("\n".join(md))
    return main_predictions, md


def dependency_markdown(args, data, truth, rows, summary, both, key, defaults, score) -> list[str]:
    from dyco_probe.analysis import auroc
    from dyco_probe.roles import Role

    online = data["online"]
    mask = online.mask.bool()
    text, neutral = mask & (truth == int(Role.TEXT)), mask & (truth == int(Role.NEUTRAL))
    tn = torch.cat([score[text], score[neutral]]).double().numpy()
    text_over_neutral = auroc(tn, [True] * int(text.sum()) + [False] * int(neutral.sum()))
    between = mask & (score <= defaults[0]) & (score >= defaults[1])
    n_tokens = int(mask.sum())
    cf_key = counterfactual_name(key[0], args)
    fr = next(r for r in rows if r["labeller"] == "fisher_rao" and r["neutral"] == "excluded")
    default = next(
        r
        for r in rows
        if r["labeller"] == "visual_dependency"
        and r["setting"] == dependency_setting(*key, args, defaults)
        and r["neutral"] == "excluded"
    )
    tv, other = both["true_visual"], both["other"]
    what = "greedy completions" if args.completions == "generated" else "gold chains"
    return [
        "# Visual dependency (counterfactual labeller) against the synthetic task's ground truth",
        "",
        f"Model `{args.model}` (weights sha256 {fingerprint(args.model)}…), {online.batch_size} `{args.split}` "
        f"examples, {what}; {n_tokens} completion tokens, ground truth visual {int((truth[mask] == 1).sum())}, "
        f"text {int((truth[mask] == 2).sum())}, neutral {int((truth[mask] == 0).sum())}.",
        "",
        "`visual_dependency` (`dyco_probe.labellers`, docs/visual_dependency.md): each token's divergence between "
        "the next-token distributions with the real image and with a counterfactual one (teacher-forced on the "
        "same tokens), visual above `visual_above`, text below `text_below`, neutral between. Counterfactuals: "
        f"`blank` (background colour), `patches` (a random {args.mask_fraction:g} of the 28-px squares, one image "
        "token each, blacked out), `swap` (the next example's image); divergences: `kl` (full distributions), "
        f"`k3` (the generated token's log-probabilities). Library defaults: `{key[0]}`, `{key[1]}`, "
        f"visual_above {defaults[0]:g}, text_below {defaults[1]:g} nats.",
        "",
        "## At the default thresholds (neutral tokens excluded)",
        "",
        *table(rows, "excluded"),
        "",
        "## At the default thresholds (neutral tokens included)",
        "",
        *table(rows, "included"),
        "",
        "## The score, and thresholds chosen on data",
        "",
        "AUROC: the score of true visual tokens against all others (95% bootstrap interval over tokens). "
        "Best on this set: the grid pair with the highest macro F1 (neutral excluded) on these examples. Held out: "
        "chosen on one half of the examples, scored on the other, both ways, averaged (the pairs chosen in "
        f"brackets). Grid: {', '.join(f'{x:g}' for x in DEPENDENCY_GRID)} nats, text_below <= visual_above.",
        "",
        "| counterfactual | divergence | AUROC visual [95% CI] | median score: visual / other | best on this set "
        "(F1) | default (F1 excl. / incl.) | held out, excl. | held out, incl. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['counterfactual']} | {r['divergence']} | {f3(r['auroc_visual'])} [{f3(r['auroc_visual_lo'])}, "
            f"{f3(r['auroc_visual_hi'])}] | {r['median_visual']:.3g} / {r['median_other']:.3g} | "
            f"{r['best_visual_above']:g} / {r['best_text_below']:g} ({f3(r['best_macro_f1_excluded'])}) | "
            f"{f3(r['default_macro_f1_excluded'])} / {f3(r['default_macro_f1_included'])} | "
            f"{f3(r['held_out_macro_f1_excluded'])} {_pairs(r['held_out_chosen_excluded'])} | "
            f"{f3(r['held_out_macro_f1_included'])} {_pairs(r['held_out_chosen_included'])} |"
            for r in summary
        ],
        "",
        "## Two notions of visual",
        "",
        "![Fisher–Rao Δ against visual dependency, per token, by true role](labeller_dependency_vs_delta.png)",
        "",
        f"`labeller_dependency_vs_delta.png` (`.pdf`): per token (the first of each completion left out: it has no "
        f"Δ), the Fisher–Rao rule's Δ = v_vis − v_txt against the `{cf_key}`/`{key[1]}` dependency score "
        "(symmetric-log scale), coloured by true role; dashed lines: the visual thresholds (tau_vis = 0; "
        f"visual_above = {defaults[0]:g}), dotted: the text thresholds (−tau_txt; text_below). Corners: tokens per "
        "quadrant (split at tau_vis and visual_above) and how many are truly visual.",
        "",
        f"Of the {tv['tokens']} true visual tokens, both call {tv['both']} visual, only the Fisher–Rao rule "
        f"{tv['only_first']}, only the dependency score {tv['only_second']}, neither {tv['neither']}. Of the "
        f"{other['tokens']} other tokens, both call {other['both']} visual, only the rule {other['only_first']}, "
        f"only the dependency score {other['only_second']}.",
        "",
        "## Conclusion",
        "",
        f"- Visual vs text (neutral excluded), `{cf_key}`/`{key[1]}` at the defaults: macro F1 "
        f"{f3(default['macro_f1'])} [{f3(default['macro_f1_lo'])}, {f3(default['macro_f1_hi'])}], visual F1 "
        f"{f3(default['f1'])} (precision {f3(default['precision'])}, recall {f3(default['recall'])}); "
        f"{verdict(default, fr)} the Fisher–Rao rule ({f3(fr['macro_f1'])} [{f3(fr['macro_f1_lo'])}, "
        f"{f3(fr['macro_f1_hi'])}]).",
        f"- Text vs neutral: median score of true text tokens {float(score[text].median()):.3g}, of neutral ones "
        f"{float(score[neutral].median()):.3g} nats; a text token scores above a neutral one with probability "
        f"{f3(text_over_neutral)} (AUROC), so low dependency "
        + (
            "marks neutral scaffolding more than text: the three-class score is limited by the neutral tokens it "
            "calls text. "
            if text_over_neutral > 0.5
            else "does mark text tokens. "
        )
        + f"The neutral band [{defaults[1]:g}, {defaults[0]:g}] holds {int(between.sum())} tokens "
        f"({int(between.sum()) / max(int(mask.sum()), 1):.1%}).",
        "",
    ]


def _pairs(chosen) -> str:
    return "(" + ", ".join(f"{a:g} / {b:g}" for a, b in chosen) + ")"


# -- report -------------------------------------------------------------------------------------------


def f3(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(rows: list[dict], neutral: str) -> list[str]:
    roles = ["visual", "text"] + (["neutral"] if neutral == "included" else [])
    head = (
        "| labeller | setting | "
        + " | ".join(f"{r} P / R / F1" for r in roles)
        + " | macro F1 [95% CI] | accuracy |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    keys = list(dict.fromkeys((r["labeller"], r["setting"]) for r in rows))
    for name, setting in keys:
        sel = {
            r["role"]: r
            for r in rows
            if (r["labeller"], r["setting"]) == (name, setting) and r["neutral"] == neutral
        }
        first = next(iter(sel.values()))
        cells = [f"{f3(sel[r]['precision'])} / {f3(sel[r]['recall'])} / {f3(sel[r]['f1'])}" for r in roles]
        ci = f"{f3(first['macro_f1'])} [{f3(first['macro_f1_lo'])}, {f3(first['macro_f1_hi'])}]"
        lines.append(f"| {name} | {setting} | " + " | ".join(cells) + f" | {ci} | {f3(first['accuracy'])} |")
    return lines


def plot(sweep_rows, theta_rows, delta_by_role, peaks, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nv, nt = len(TAU_VIS_GRID), len(TAU_TXT_GRID)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, key, title in zip(
        axes[:2],
        ("macro_f1_excluded", "macro_f1_included"),
        ("macro F1, neutral tokens excluded", "macro F1, neutral tokens included"),
    ):
        grid = np.full((nv, nt), np.nan)
        for r in sweep_rows:
            grid[TAU_VIS_GRID.index(r["tau_vis"]), TAU_TXT_GRID.index(r["tau_txt"])] = r[key]
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(nt), [str(x) for x in TAU_TXT_GRID], rotation=45)
        ax.set_yticks(range(nv), [str(x) for x in TAU_VIS_GRID])
        ax.set_xlabel("tau_txt (text if Δ < −tau_txt)")
        ax.set_ylabel("tau_vis (visual if Δ > tau_vis)")
        ax.set_title(title)
        bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
        di, dj = TAU_VIS_GRID.index(DEFAULT_TAU[0]), TAU_TXT_GRID.index(DEFAULT_TAU[1])
        ax.scatter(
            [dj], [di], marker="o", s=120, facecolors="none", edgecolors="red", label="published default"
        )
        ax.scatter([bj], [bi], marker="x", s=80, color="magenta", label="best on this set")
        for i in range(nv):
            for j in range(nt):
                if np.isnan(grid[i, j]):
                    continue
                light = grid[i, j] > np.nanmin(grid) + 0.6 * (np.nanmax(grid) - np.nanmin(grid))
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="k" if light else "w",
                )
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, fontsize=7)
    ax = axes[2]
    for key, label in (("macro_f1_excluded", "neutral excluded"), ("macro_f1_included", "neutral included")):
        ax.plot([r["theta"] for r in theta_rows], [r[key] for r in theta_rows], marker=".", label=label)
    ax.set_xlabel("theta (visual if normalised visual ratio > theta)")
    ax.set_ylabel("macro F1")
    ax.set_title("ratio-threshold baseline")
    ax.legend()
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"labeller_threshold_sweep.{ext}", dpi=150)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    values = torch.cat(list(delta_by_role.values()))
    lo, hi = float(values.quantile(0.005)), float(values.quantile(0.995))
    bins = np.linspace(lo, hi, 60)
    for role, d in delta_by_role.items():
        if not len(d):
            continue
        ax.hist(
            d.numpy(), bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{role} ({len(d)})"
        )
    ax.axvline(DEFAULT_TAU[0], color="k", linestyle="--", linewidth=0.8)
    ax.axvline(-DEFAULT_TAU[1], color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("Δ = v_vis − v_txt (Fisher–Rao, last layer)")
    ax.set_ylabel("density")
    ax.set_title("Δ by ground-truth role (dashed: tau_vis, dotted: −tau_txt)")
    ax.legend()
    ax = axes[1]
    names = list(peaks)
    x = np.arange(len(names))
    ax.bar(
        x - 0.2, [peaks[k]["share"] for k in names], width=0.4, color="tab:blue", label="on the named object"
    )
    ax.bar(
        x + 0.2, [peaks[k]["object_share"] for k in names], width=0.4, color="tab:gray", label="on any object"
    )
    ax.scatter(x - 0.2, [peaks[k]["chance"] for k in names], color="red", marker="_", s=200, label="chance")
    ax.scatter(x + 0.2, [peaks[k]["object_chance"] for k in names], color="red", marker="_", s=200)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_xlabel("probed layer (L/hK: head K of layer L alone)")
    ax.set_ylabel("share of ground-truth visual tokens")
    ax.set_title("image attention peaks on the named object's cell")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"labeller_delta_by_role.{ext}", dpi=150)
    plt.close(fig)


def verdict(a: dict, b: dict) -> str:
    """How row `a`'s macro F1 compares with row `b`'s, by their bootstrap intervals."""
    if a["macro_f1_lo"] > b["macro_f1_hi"]:
        return "above"
    if a["macro_f1_hi"] < b["macro_f1_lo"]:
        return "below"
    return "not distinguishable from"


def conclusion(
    rows: list[dict], held: dict, layer_rows: list[dict], facts: dict, peak_rows: list[dict] = ()
) -> str:
    """The findings in words, from the numbers (so a rerun on another model stays truthful)."""

    def pick(name, setting_start, neutral="excluded", role="visual"):
        """The row of one labeller, setting and role (macro F1 and its interval are per labeller)."""
        return next(
            r
            for r in rows
            if r["labeller"] == name
            and r["setting"].startswith(setting_start)
            and r["neutral"] == neutral
            and r["role"] == role
        )

    fr = pick("fisher_rao", "tau")
    ratio_half = pick("ratio_threshold", "theta 0.5")
    ratio = max(
        (
            r
            for r in rows
            if r["labeller"] == "ratio_threshold" and r["neutral"] == "excluded" and r["role"] == "visual"
        ),
        key=lambda r: r["macro_f1"],
    )
    text_only = pick("always text", "every")
    others = sorted(
        ((d, pick(d, "tau")["macro_f1"]) for d in DISTANCES[1:]),
        key=lambda x: -x[1] if not math.isnan(x[1]) else 0,
    )
    fr_inc = pick("fisher_rao", "tau", "included")
    dependency = [
        r
        for r in rows
        if r["labeller"] == "visual_dependency" and r["neutral"] == "excluded" and r["role"] == "visual"
    ]
    out = [
        f"- Visual vs text (neutral tokens excluded): the role rule (docs/method.md#token-roles) with Fisher–Rao dynamics and the published "
        f"thresholds reaches macro F1 {f3(fr['macro_f1'])} [{f3(fr['macro_f1_lo'])}, {f3(fr['macro_f1_hi'])}], "
        f"visual F1 {f3(fr['f1'])} (precision {f3(fr['precision'])}, recall {f3(fr['recall'])}). That is "
        f"{verdict(fr, text_only)} labelling every token text ({f3(text_only['macro_f1'])}), "
        f"{verdict(fr, ratio_half)} the ratio baseline at theta 0.5 ({f3(ratio_half['macro_f1'])}) and "
        f"{verdict(fr, ratio)} the ratio baseline at its best theta on this set ({ratio['setting'].split()[1]}: "
        f"{f3(ratio['macro_f1'])}; tuned on the test set, so optimistic).",
        f"- Neutral tokens (the template's scaffolding) are a role the dynamics do not see: with them included the "
        f"rule's macro F1 is {f3(fr_inc['macro_f1'])}; the dead zone [−tau_txt, tau_vis] holds "
        f"{facts['dead_zone']:.1%} of the tokens, whereas {facts['neutral_share']:.1%} are neutral in truth.",
        "- Other distances (same rule, same thresholds, in each distance's own units): "
        + ", ".join(f"{d} {f3(v)}" for d, v in others)
        + f" (Fisher–Rao {f3(fr['macro_f1'])}).",
    ]
    if dependency:
        out.append(
            "- Counterfactual labeller (`visual_dependency`, KL, default thresholds; `labeller_dependency.md`): "
            + "; ".join(
                f"{r['setting'].split(',')[0]} {f3(r['macro_f1'])} [{f3(r['macro_f1_lo'])}, {f3(r['macro_f1_hi'])}], "
                f"{verdict(r, fr)} the Fisher–Rao rule"
                for r in dependency
            )
            + "."
        )
    last = [r for r in layer_rows if r["layer"].isdigit()][-1]
    best = max((r for r in layer_rows if r["tokens"]), key=lambda r: r["peak_share"], default=None)
    best_f1 = max(layer_rows, key=lambda r: r["macro_f1_excluded"])
    if best is not None:
        out.append(
            f"- Where visual tokens look: at the probed (last) layer the image attention of "
            f"{f3(last['peak_share'])} of the ground-truth visual tokens peaks on the named object's cell (chance "
            f"{f3(last['chance'])}; on some object {f3(last['object_share'])}, chance {f3(last['object_chance'])}; "
            f"on the named one given an object {f3(last['relevant_given_object'])}, chance "
            f"{f3(last['relevant_given_object_chance'])}); highest: {best['layer']} ({f3(best['peak_share'])})."
            + (f" {facts['training_note']}" if facts.get("training_note") else "")
        )
    for r in peak_rows:
        if r["labeller"] == "fisher_rao":
            out.append(
                f"- Of the {r['visual_tokens']} tokens the rule calls visual, {r['without_relevant']} "
                f"({f3(r['without_relevant_share'])}) name no object and are not look-ups; the image attention of "
                f"{f3(r['peak_share'])} of the other {r['with_relevant']} peaks on the named object's cell (chance "
                f"{f3(r['chance'])})."
            )
    out.append(
        f"- Probed layer: the rule's macro F1 (neutral excluded) is highest when probing {best_f1['layer']} "
        f"({f3(best_f1['macro_f1_excluded'])}; last layer {f3(last['macro_f1_excluded'])})."
    )
    gain_exc = held["macro_f1_excluded"]["tuned"] - held["macro_f1_excluded"]["default"]
    gain_inc = held["macro_f1_included"]["tuned"] - held["macro_f1_included"]["default"]
    spread = facts["delta_spread"]
    out.append(
        f"- Thresholds: Δ spreads over {spread} (10th-90th percentile), against thresholds of 0 and 0.05, and "
        f"its distributions by true role overlap (medians: {facts['delta_medians']}). Chosen on one half of the "
        f"examples and scored on the other, the best grid thresholds gain {gain_exc:+.3f} macro F1 with neutral "
        f"tokens excluded (chosen {held['macro_f1_excluded']['chosen']}) and {gain_inc:+.3f} with them included "
        f"(chosen {held['macro_f1_included']['chosen']}) over the published (0, 0.05). "
        + (
            "For telling visual from text tokens the published defaults are as good as any threshold on the grid: "
            "they are kept."
            if gain_exc < 0.02
            else "Tuned thresholds tell visual from text tokens better on held-out examples; the library keeps the "
            "published defaults (the paper's, docs/method.md#token-roles) and analyses of this task may pass the tuned ones."
        )
        + (
            " A wider dead zone buys a little on the three-class score by calling more tokens neutral, which the "
            "scorer would then ignore; not a reason to move the defaults."
            if 0.02 <= gain_inc < 0.1 and gain_exc < 0.02
            else ""
        )
    )
    return "\n".join(out)


def fingerprint(model: str) -> str:
    """Short sha256 of the checkpoint's weights, to tell shipped versions apart."""
    from dyco_probe.models.loading import weights_sha256

    return (weights_sha256(model) or "unknown")[:12]


def training_note(model: str) -> str | None:
    """A caveat when the model's pretraining recipe supervised attention to the relevant image token."""
    import json

    from dyco_probe.models.builtin import BUILTIN_DIR

    path = (BUILTIN_DIR if model == "builtin" else Path(model)) / "recipe.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text()).get("config", {})
    if not config.get("attention_hint_weight"):
        return None
    return (
        f"Caveat: this model's pretraining asked head {config.get('attention_hint_head', 0)} of the last layer to "
        f"attend from each look-up query to this very token, with a weight fading to zero over the first "
        f"{config.get('attention_hint_until', 0):.0%} of the language steps; the last layer's peak share (and that "
        "head's) is partly trained in, so it validates the tracer's bookkeeping (rows, image-token order, cells) "
        "more than it discovers anything, while the other layers and heads were never supervised."
        + (
            f" Head {config['table_hint_head']} of the last layer got the same hint from each table look-up "
            "(the number copied from the question) to the question's entry, so the last layer's text attention "
            "at those text-role tokens is partly trained in as well."
            if config.get("table_hint_head") is not None
            else ""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--completions",
        default="generated",
        choices=["generated", "gold"],
        help="the model's greedy completions (traced online) or the gold chains (teacher-forced)",
    )
    parser.add_argument("--runs", default=str(ROOT / "runs" / "validate_labellers"))
    parser.add_argument("--out", default=str(ROOT / "figures"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only",
        default="all",
        choices=["all", "dependency"],
        help="dependency: the counterfactual labeller alone",
    )
    parser.add_argument(
        "--counterfactuals", nargs="+", default=list(COUNTERFACTUALS), choices=COUNTERFACTUALS
    )
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    parser.add_argument("--mask-fraction", type=float, default=None, help="patches (default: the library's)")
    args = parser.parse_args()
    if args.mask_fraction is None:
        from dyco_probe.labellers import DEPENDENCY_DEFAULTS

        args.mask_fraction = DEPENDENCY_DEFAULTS["mask_fraction"]
    torch.set_num_threads(args.threads)

    import pandas as pd

    from dyco_probe.labellers import (
        attention_peak_share,
        get_labeller,
        ground_truth_alignments,
        problems_for,
        ratio_threshold,
        relevant_image_tokens,
    )
    from dyco_probe.roles import ROLE_NAMES, Role
    from dyco_probe.task.alignment import cell_image_tokens
    from dyco_probe.task.render import cell_index
    from dyco_probe.viz import plot_labeller_validation, save_figure

    data = collect(args)
    tok, examples, online = data["handle"].tokenizer, data["examples"], data["online"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = get_labeller("ground_truth")(online, examples=examples, tokenizer=tok)
    dependency_predictions, dependency_md = dependency_section(args, data, truth, out)
    if args.only == "dependency":
        print("\n".join(dependency_md))
        return
    aligned = ground_truth_alignments(online, examples, tokenizer=tok)
    relevant = relevant_image_tokens(online, aligned)
    mask = online.mask
    # every object's cell, for every token: does attention go to objects at all, or to the named one?
    problems = problems_for(online, examples)
    objects = torch.zeros_like(relevant)
    for i, p in enumerate(problems):
        cells = [cell_index(o.row, o.col, p.config.grid) for o in p.objects]
        n_img = int(online.samples[i]["num_image_tokens"])
        objects[i, :, cell_image_tokens(cells, p.config.grid, n_img)] = True
    visual_rows = (truth == int(Role.VISUAL)).any(-1)
    object_count_chance = (
        float(
            sum(1 / len(p.objects) for p, v in zip(problems, visual_rows) if v)
            / max(int(visual_rows.sum()), 1)
        )
        if bool(visual_rows.any())
        else float("nan")
    )
    accuracy = sum(s["correct"] for s in online.samples) / online.batch_size

    # offline Fisher-Rao reproduces the online trace (same tokens): a sanity check on the pipeline
    fr_off = data["by_distance"]["fisher_rao"]
    online_gap = max(
        float((getattr(online, k) - getattr(fr_off, k))[mask].abs().max()) for k in ("v_vis", "v_txt")
    )

    # 1. labellers at their defaults, and tuned baselines
    theta_rows = theta_sweep(online, truth)
    best_theta = max(theta_rows, key=lambda r: r["macro_f1_excluded"])["theta"]
    predictions = [
        ("fisher_rao", "tau 0 / 0.05 (published)", get_labeller("fisher_rao")(online)),
        *[(d, "tau 0 / 0.05", get_labeller(d)(data["by_distance"][d])) for d in DISTANCES[1:]],
        ("ratio_threshold", "theta 0.5", ratio_threshold(online)),
        (
            "ratio_threshold",
            f"theta {best_theta} (best on this set)",
            ratio_threshold(online, theta=best_theta),
        ),
        ("always text", "every token text", torch.where(mask, int(Role.TEXT), 0)),
    ]
    predictions[-1:-1] = dependency_predictions  # the counterfactual labeller (KL, default thresholds)
    rows = [r for name, setting, pred in predictions for r in score_rows(name, setting, pred, truth, mask)]
    # where the tokens each labeller calls visual look, at the probed layer (the online trace)
    peak_rows = visual_token_peaks(
        online,
        relevant,
        objects,
        [("ground_truth", "grammar", truth)] + [p for p in predictions if p[0] != "always text"],
        truth,
    )

    # 2. probed layer: Fisher-Rao rule and attention peaks
    layer_rows, peaks = [], {}
    for layer, tr in data["by_layer"].items():
        pred = get_labeller("fisher_rao")(tr)
        peak = attention_peak_share(tr, relevant, truth)
        on_object = attention_peak_share(tr, objects, truth)
        peak["object_share"], peak["object_chance"] = on_object["share"], on_object["chance"]
        peaks[str(layer)] = peak
        layer_rows.append(
            {
                "layer": str(layer),
                "macro_f1_excluded": macro(pred, truth, mask, "excluded"),
                "macro_f1_included": macro(pred, truth, mask, "included"),
                "peak_share": peak["share"],
                "chance": peak["chance"],
                "object_share": on_object["share"],
                "object_chance": on_object["chance"],
                # of the tokens peaking on some object, the share peaking on the named one (chance 1/objects)
                "relevant_given_object": peak["share"] / on_object["share"]
                if on_object["share"]
                else float("nan"),
                "relevant_given_object_chance": object_count_chance,
                "tokens": peak["tokens"],
            }
        )

    # 3. threshold sweep, and held-out comparison of tuned vs published thresholds
    sweep_rows = sweep(online, truth)
    held = {k: held_out(online, truth, k) for k in ("macro_f1_excluded", "macro_f1_included")}
    default_row = next(r for r in sweep_rows if (r["tau_vis"], r["tau_txt"]) == DEFAULT_TAU)
    best_rows = {k: max(sweep_rows, key=lambda r, k=k: r[k]) for k in held}

    delta = online.v_vis - online.v_txt
    valid = mask.clone()
    valid[:, 0] = False
    delta_by_role = {
        ROLE_NAMES[r]: delta[valid & (truth == r)] for r in (Role.VISUAL, Role.TEXT, Role.NEUTRAL)
    }

    in_dead_zone = valid & (delta <= DEFAULT_TAU[0]) & (delta >= -DEFAULT_TAU[1])
    all_delta = delta[valid]
    facts = {
        "dead_zone": float(in_dead_zone.sum()) / max(int(mask.sum()), 1),
        "neutral_share": float((truth[mask] == int(Role.NEUTRAL)).float().mean()),
        "delta_spread": f"[{float(all_delta.quantile(0.1)):+.3f}, {float(all_delta.quantile(0.9)):+.3f}]",
        "delta_medians": ", ".join(
            f"{role} {float(d.median()):+.3f}" for role, d in delta_by_role.items() if len(d)
        ),
        "training_note": training_note(args.model),
    }
    pd.DataFrame(rows).to_csv(out / "labeller_validation.csv", index=False)
    pd.DataFrame(sweep_rows + theta_rows).to_csv(out / "labeller_threshold_sweep.csv", index=False)
    pd.DataFrame(layer_rows).to_csv(out / "labeller_layers.csv", index=False)
    pd.DataFrame(peak_rows).to_csv(out / "labeller_visual_peaks.csv", index=False)
    plot(sweep_rows, theta_rows, delta_by_role, peaks, out)
    save_figure(plot_labeller_validation(pd.DataFrame(rows)), out / "labeller_validation", close=True)

    quantiles = {
        role: [f"{float(d.quantile(q)):+.3f}" for q in (0.1, 0.5, 0.9)] if len(d) else ["–"] * 3
        for role, d in delta_by_role.items()
    }
    n_tokens = int(mask.sum())
    what = (
        "greedy completions traced online"
        if args.completions == "generated"
        else "gold chains teacher-forced"
    )
    md = [
        "# Role labellers against the synthetic task's ground truth",
        "",
        f"Model `{args.model}` (weights sha256 {fingerprint(args.model)}…), {online.batch_size} `{args.split}` "
        f"examples, {what} "
        f"(last layer, all heads, `text_span=post_image`); answer accuracy {accuracy:.3f}; {n_tokens} completion "
        f"tokens, of which ground truth visual {int((truth[mask] == 1).sum())}, text {int((truth[mask] == 2).sum())}, "
        f"neutral {int((truth[mask] == 0).sum())}. The other distances' rules read teacher-forced traces of the same "
        f"tokens with that distance (the offline Fisher–Rao trace reproduces the online one to {online_gap:.1e}). "
        "`visual_dependency` rows: the counterfactual labeller (KL, default thresholds) with each counterfactual "
        "image (`labeller_dependency.md`).",
        "",
        "Ground truth: every word of a completion gets its role from the task's grammar (`label_words`: the value "
        "read in a look-up is visual, keys, table values and arithmetic are text, scaffolding is neutral), aligned "
        "to tokens by the tokenizer's offsets. P / R / F1 per role; macro F1 with a 95% bootstrap interval over "
        "examples.",
        "",
        "![F1 of each labeller per role, and macro F1 with its 95% bootstrap interval, neutral tokens excluded "
        "and included](labeller_validation.png)",
        "",
        "`labeller_validation.png` (`.pdf`): F1 per role (markers) and macro F1 with its 95% bootstrap interval "
        "(bars) of each labeller, neutral tokens excluded (left) and included (right).",
        "",
        "## Neutral tokens excluded (only tokens whose true role is visual or text; predicting neutral is a miss)",
        "",
        *table(rows, "excluded"),
        "",
        "## Neutral tokens included (all tokens, three classes)",
        "",
        *table(rows, "included"),
        "",
        "## Probed layer and head: the Fisher–Rao rule, and where visual tokens look",
        "",
        "Peak share: of the ground-truth visual tokens, the share whose attention over the image tokens peaks on "
        "the relevant one (the cell of the object the token names); chance is 1 / number of image tokens. Rows "
        "`L/hK` probe head K of layer L alone (the other rows average all heads). Object "
        "cells differ from the empty background, so attention may favour objects without finding the named one: "
        "the share peaking on any object's cell (chance: objects / image tokens), and of those the share on the "
        "named object (chance: 1 / objects), separate the two.",
        "",
        "| layer | FR macro F1 (neutral excluded) | FR macro F1 (included) | peak on relevant image token (chance) "
        "| peak on any object (chance) | relevant, given an object (chance) | tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['layer']} | {f3(r['macro_f1_excluded'])} | {f3(r['macro_f1_included'])} | {f3(r['peak_share'])} "
            f"({f3(r['chance'])}) | {f3(r['object_share'])} ({f3(r['object_chance'])}) | "
            f"{f3(r['relevant_given_object'])} ({f3(r['relevant_given_object_chance'])}) | {r['tokens']} |"
            for r in layer_rows
        ],
        "",
        "## Where each labeller's visual tokens look (probed layer: last, all heads)",
        "",
        "The tokens each labeller calls visual, and the same peak shares as above over those of them that have a "
        "relevant image token (the cell of the object the token names). Only a look-up's value has one, i.e. only "
        "ground-truth visual tokens, so the scored tokens are the labeller's true positives; its other visual "
        "tokens name no object and are not look-ups: they are counted, with their true roles, but not scored. "
        "Chance as above (`labeller_visual_peaks.csv`).",
        "",
        "| labeller | setting | called visual | with a relevant image token | without one (share; true text / "
        "neutral) | peak on relevant image token (chance) | peak on any object (chance) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['labeller']} | {r['setting']} | {r['visual_tokens']} | {r['with_relevant']} | "
            f"{r['without_relevant']} ({f3(r['without_relevant_share'])}; {r['without_relevant_text']} / "
            f"{r['without_relevant_neutral']}) | {f3(r['peak_share'])} ({f3(r['chance'])}) | "
            f"{f3(r['object_share'])} ({f3(r['object_chance'])}) |"
            for r in peak_rows
        ],
        "",
        "## Threshold sweep (role rule of docs/method.md#token-roles, Fisher–Rao, last layer)",
        "",
        "Δ = v_vis − v_txt by true role (10th / 50th / 90th percentile): "
        + "; ".join(f"{role} {' / '.join(q)}" for role, q in quantiles.items())
        + ".",
        "",
        f"Grid tau_vis ∈ {{{', '.join(map(str, TAU_VIS_GRID))}}}, tau_txt ∈ {{{', '.join(map(str, TAU_TXT_GRID))}}} "
        "with tau_vis >= −tau_txt (`labeller_threshold_sweep.csv`, "
        "`labeller_threshold_sweep.png`). Published defaults (0, 0.05): macro F1 "
        f"{f3(default_row['macro_f1_excluded'])} (neutral excluded), {f3(default_row['macro_f1_included'])} (included); "
        f"best on this set: {f3(best_rows['macro_f1_excluded']['macro_f1_excluded'])} at "
        f"({best_rows['macro_f1_excluded']['tau_vis']}, {best_rows['macro_f1_excluded']['tau_txt']}) and "
        f"{f3(best_rows['macro_f1_included']['macro_f1_included'])} at "
        f"({best_rows['macro_f1_included']['tau_vis']}, {best_rows['macro_f1_included']['tau_txt']}).",
        "",
        "Held out (thresholds chosen on one half of the examples, scored on the other, both ways, averaged):",
        "",
        "| metric | published (0, 0.05) | tuned on the other half | thresholds chosen |",
        "| --- | --- | --- | --- |",
        *[
            f"| {k.replace('macro_f1_', 'macro F1, neutral ')} | {f3(h['default'])} | {f3(h['tuned'])} | "
            + ", ".join(f"({a}, {b})" for a, b in h["chosen"])
            + " |"
            for k, h in held.items()
        ],
        "",
        "## Conclusion",
        "",
        conclusion(rows, held, layer_rows, facts, peak_rows),
        "",
    ]
    text = "\n".join(md)
    (out / "labeller_validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
