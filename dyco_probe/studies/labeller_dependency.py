"""The counterfactual labeller (`visual_dependency`) against the synthetic task's ground truth: a part of
the labeller validation (`dyco_probe.studies.labeller_validation`), and on its own with
`analyses/validate_labellers.py --only dependency` (on the `val` split: how its defaults were chosen).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dyco_probe.models.loading import weights_digest
from dyco_probe.studies.labellers import (
    BOOTSTRAP,
    DEPENDENCY_GRID,
    PUBLISHED_SETTING,
    counterfactual_name,
    dependency_scores,
    dependency_setting,
    f3,
    macro,
    overlap,
    score_rows,
    table,
    verdict,
)


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
    rows = score_rows("fisher_rao", PUBLISHED_SETTING, fr, truth, mask)
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
        f"Model `{args.model}` (weights sha256 {weights_digest(args.model)}…), {online.batch_size} `{args.split}` "
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
