"""The positive control: does each signal see the failure planted in the built-in model?

The built-in model trusts notes in the question (``dyco_probe.task.problems``): at the look-up of a
noted object it sometimes copies the note's value (``triangle note blue``) instead of reading the image
(``triangle red``), and a false note then gives a wrong answer. Which look-ups were copied is known
exactly, so every signal of the toolkit can be tested against a known effect:

1. **look-up tokens**: noted test problems (true and false notes), ``--samples`` completions each at
   temperature 1, traced online (last layer, all heads). For every value token of a noted look-up:
   copied or read. For each per-token signal, the AUROC for telling read from copied (higher signal
   = read; 0.5 = blind; below 0.5 = inverted) with a 95% bootstrap interval over prompts (the samples
   of one prompt are resampled together), and the share of prompts with both forms where the signal's
   mean is higher for the read ones.
2. **trajectories**: greedy completions of ``--n-greedy`` test problems (every subset), scored with the
   Fisher–Rao roles: the AUROC of each trajectory feature for correctness (sequence score, mean
   ``s_t``, visual-role fraction, switch rate), with stratified bootstrap intervals.
3. **interventions** at the noted look-up of fixed chains (each noted problem once reading the image,
   once copying the note): the note knocked out at the value token and at the token that decides the
   look-up's form (does the model then read the image and recover?), and the image knocked out at
   the value token (does a read look-up need the image, and a copied one not?);
4. **RL**: the repair measured by ``analyses/rl_comparison.py`` (read from its JSON, if present).

Writes ``figures/positive_control.{md,json}`` and ``figures/positive_control_signals.{png,pdf}``.

    python -m analyses.positive_control                     # built-in model; about 10 min on 1 core
    python -m analyses.positive_control --n-noted 40 --samples 4 --n-greedy 60   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dyco_probe.positive_control import (
    copy_vs_read,
    detection,
    note_interventions,
    summarise_interventions,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
TRAJECTORY_FEATURES = ("sample_score", "mean_s", "frac_visual", "switch_rate")


def trajectory_aurocs(trace, n_boot: int) -> dict:
    """AUROC of each trajectory feature for correctness, with Fisher–Rao roles."""
    from dyco_probe.analysis import auroc_ci, sample_table

    samples = sample_table(trace)
    return {
        f: {**auroc_ci(samples[f].to_numpy(float), samples["correct"].to_numpy(bool), n_boot=n_boot)}
        for f in TRAJECTORY_FEATURES
    }


def greedy_summary(problems, records) -> dict:
    from dyco_probe.evaluation import wilson_interval
    from dyco_probe.task.notes import noted_lookup
    from dyco_probe.task.problems import LOOKUP_COPIED, SUBSETS

    def rate(k, n):
        lo, hi = wilson_interval(k, n)
        return {"value": k / n if n else math.nan, "ci_low": lo, "ci_high": hi, "n": n}

    correct = [bool(r["correct"]) for r in records]
    out = {"overall": rate(sum(correct), len(correct))}
    for subset in SUBSETS:
        rows = [i for i, p in enumerate(problems) if p.subset == subset]
        out[subset] = rate(sum(correct[i] for i in rows), len(rows))
    false_rows = [i for i, p in enumerate(problems) if p.subset == "false_note"]
    copied = sum(noted_lookup(problems[i], records[i]["completion"]) == LOOKUP_COPIED for i in false_rows)
    return {"greedy_accuracy": out, "false_note_copy_rate": rate(copied, len(false_rows))}


def plot(table, det: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noted = table[table["note"] != ""]
    panels = [
        ("r_vis_norm", "r_vis / (r_vis + r_txt)"),
        ("delta", "Fisher–Rao Δ = v_vis − v_txt"),
        ("s", "s_t (Fisher–Rao roles)"),
        ("on_note", "attention on the note's value"),
    ]
    panels = [(c, t) for c, t in panels if c in noted]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    for ax, (col, title) in zip(axes[0], panels):
        for lookup, colour in (("read", "tab:blue"), ("copied", "tab:red")):
            values = noted[noted["lookup"] == lookup][col].dropna()
            ax.hist(
                values, bins=30, alpha=0.55, color=colour, density=True, label=f"{lookup} (n={len(values)})"
            )
        d = det.get(col, {})
        ax.set_title(f"{title}\nAUROC {d.get('auroc', math.nan):.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Value tokens of noted look-ups: read from the image vs copied from the note", fontsize=9)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"positive_control_signals.{ext}", dpi=150)
    plt.close(fig)


def rl_summary(path: Path) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("rl_gain_points", "rl_gain_by_subset", "runs", "settings") if k in data}


def render(report: dict) -> str:
    def ci(x, scale=1.0, digits=3):
        return f"{scale * x['value']:.{digits}f} ({scale * x['ci_low']:.{digits}f}-{scale * x['ci_high']:.{digits}f})"

    g = report["greedy_accuracy"]
    lines = [
        "# Positive control: a planted failure, and which signals see it",
        "",
        f"Model `{report['model']}` (weights sha256 {report['weights_sha256'][:12]}…). Questions carry a note "
        "about one queried object (2/3 of them; half of the notes are false). The model learned from a "
        "teacher that, at the noted look-up, cited the note instead of reading the image 70% of the time, "
        "so trusting a false note gives a wrong answer: a planted coordination failure whose every instance "
        "is known.",
        "",
        f"## Greedy accuracy by subset ({g['overall']['n']} test problems)",
        "",
        "| subset | n | accuracy (95% CI) |",
        "| --- | ---: | --- |",
        *[f"| {k} | {v['n']} | {ci(v)} |" for k, v in g.items()],
        "",
        f"False notes copied at the noted look-up (greedy): {ci(report['false_note_copy_rate'])}.",
        "",
        "## Per-token signals: telling copied from read look-ups",
        "",
        f"{report['lookups']['n_prompts']} noted test problems x {report['lookups']['samples']} samples at "
        f"temperature 1: {report['lookups']['n_read']} value tokens read from the image, "
        f"{report['lookups']['n_copied']} copied from the note. AUROC: the probability that a read token "
        "scores above a copied one (0.5: the signal is blind; below 0.5: inverted); 95% interval from a "
        "bootstrap over prompts. *Same sign*: prompts with both forms where the read tokens' mean is higher.",
        "",
        "| signal | AUROC (95% CI) | mean, read | mean, copied | same sign | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for d in report["detection"].values():
        lines.append(
            f"| {d['description']} | {d['auroc']:.3f} ({d['ci_low']:.3f}-{d['ci_high']:.3f}) | "
            f"{d['mean_read']:.3f} | {d['mean_copied']:.3f} | {d['prompts_read_higher']}/{d['prompts_with_both']} "
            f"| {verdict(d)} |"
        )
    lines += [
        "",
        "## Trajectory features: telling correct from incorrect",
        "",
        "AUROC of each feature for correctness (probability that a correct trajectory scores higher), "
        "Fisher–Rao roles, stratified bootstrap 95% intervals.",
        "",
        "| trajectories | feature | AUROC (95% CI) | n correct / incorrect |",
        "| --- | --- | --- | --- |",
    ]
    for where, feats in report["trajectory_auroc"].items():
        for f, r in feats.items():
            lines.append(
                f"| {where} | {f} | {r['auroc']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f}) | {r['n_pos']} / {r['n_neg']} |"
            )
    lines += [
        "",
        "## Interventions at the noted look-up",
        "",
        "Fixed chains: each noted problem once with the look-up read from the image (the gold chain) and "
        "once copied from the note (the rest of the chain following from the copied value). Knockouts at "
        "all layers and heads of the query that produces the token; *decision*: the token that decides the "
        "look-up's form (the value itself when read, `note` when copied). Free-running: regenerate from that "
        "token; accuracy without (*base*) and with the knockout. Means with bootstrap 95% intervals.",
        "",
        "| intervention | chain | note | n | Δ log p(token) | accuracy, base | accuracy, knocked out | Δ accuracy |",
        "| --- | --- | --- | ---: | --- | --- | --- | --- |",
    ]
    for r in report["interventions"]:

        def m(x, digits=3):
            return f"{x['mean']:+.{digits}f} ({x['ci_low']:+.{digits}f} to {x['ci_high']:+.{digits}f})"

        def a(x):
            return f"{x['mean']:.3f} ({x['ci_low']:.3f}-{x['ci_high']:.3f})"

        lines.append(
            f"| {r['description']} | {r['form']} | {r['note']} | {r['n']} | {m(r['dlogp_target'], 2)} | "
            f"{a(r['correct_base'])} | {a(r['correct_int'])} | {m(r['dacc'])} |"
        )
    lines += ["", "## What it shows", "", *report["findings"], ""]
    rl = report.get("rl")
    if rl:
        gp = rl["rl_gain_points"]
        lines += [
            "## Repair by RL (from `figures/rl_comparison.json`)",
            "",
            f"GRPO, DyCo off: held-out accuracy {gp['mean']:+.1f} points overall "
            f"(95% CI {gp['ci_low']:+.1f} to {gp['ci_high']:+.1f}, {gp['n']} seeds). By subset:",
            "",
            "| subset | gain (points), mean (95% CI) |",
            "| --- | --- |",
            *[
                f"| {k} | {v['mean']:+.1f} ({v['ci_low']:+.1f} to {v['ci_high']:+.1f}) |"
                for k, v in rl["rl_gain_by_subset"].items()
            ],
            "",
            "See `figures/rl_comparison.md` for DyCo token and sequence against this baseline.",
            "",
        ]
    lines.append("Figure: `positive_control_signals.png` (distributions of the signals, read vs copied).")
    return "\n".join(lines) + "\n"


def findings(det: dict, traj: dict) -> list[str]:
    sees = [d["description"] for d in det.values() if verdict(d).startswith("sees")]
    blind = [d["description"] for d in det.values() if verdict(d) in ("blind", "inverted")]
    out = [
        "- Signals that see the planted failure (interval above 0.5): "
        + ("; ".join(sees) if sees else "none")
        + ".",
        "- Signals blind to it (interval covering 0.5, or inverted): "
        + ("; ".join(blind) if blind else "none")
        + ".",
    ]
    for where, feats in traj.items():
        good = [f for f, r in feats.items() if r["ci_low"] > 0.5]
        out.append(
            f"- {where}: trajectory features that predict correctness (interval above 0.5): "
            + (", ".join(good) if good else "none")
            + "."
        )
    return out


def intervention_findings(rows: list[dict]) -> list[str]:
    """One line per knockout on the chains where it matters, from its intervals."""

    def get(name, form, note):
        return next(
            (r for r in rows if (r["intervention"], r["form"], r["note"]) == (name, form, note)), None
        )

    def acc(r, key):
        x = r[key]
        return f"{x['mean']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}]"

    out = []
    for name, form, note, what in (
        ("note@value", "copied", "false", "the note knocked out at a copied false value"),
        ("note@decision", "copied", "false", "the note knocked out where the copy is decided"),
        ("image@value", "read", "false", "the image knocked out at a read value"),
        ("image@value", "copied", "false", "the image knocked out at a copied value"),
    ):
        r = get(name, form, note)
        if r is None:
            continue
        out.append(
            f"- {what} (false notes, n={r['n']}): accuracy {acc(r, 'correct_base')} without, "
            f"{acc(r, 'correct_int')} with the knockout; Δ log p of the token {r['dlogp_target']['mean']:+.2f}."
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--n-noted", type=int, default=100, help="noted test problems (true and false notes)")
    ap.add_argument("--samples", type=int, default=8, help="sampled completions per noted problem")
    ap.add_argument("--n-greedy", type=int, default=300, help="test problems decoded greedily")
    ap.add_argument("--n-interventions", type=int, default=60, help="noted problems for the knockouts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rl", default=str(ROOT / "figures" / "rl_comparison.json"))
    ap.add_argument("--out", default=str(ROOT / "figures" / "positive_control"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="re-read --rl and rewrite the report from the stored JSON (no model runs)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        report = json.loads(out.with_suffix(".json").read_text())
        rl = rl_summary(Path(args.rl))
        if rl:
            report.update(
                rl=rl, rl_gain_points=rl["rl_gain_points"], rl_gain_by_subset=rl["rl_gain_by_subset"]
            )
        out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        out.with_suffix(".md").write_text(render(report))
        print(render(report))
        return 0

    import torch

    import dyco_probe as dp
    from dyco_probe.data import example_from_problem
    from dyco_probe.models.loading import weights_sha256
    from dyco_probe.task.problems import make_split

    torch.set_num_threads(args.threads)
    handle = dp.load(args.model)
    pool = make_split("test", 4 * args.n_noted)
    noted = [p for p in pool if p.note is not None][: args.n_noted]
    table, sampled = copy_vs_read(
        handle, noted, args.samples, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet
    )
    det = detection(table, args.n_boot)

    problems = make_split("test", args.n_greedy)
    greedy = dp.trace(handle, [example_from_problem(p) for p in problems], progress=not args.quiet)
    traj = {
        f"greedy, {args.n_greedy} test problems": trajectory_aurocs(greedy.trace, args.n_boot),
        f"sampled, {len(noted)} noted problems x {args.samples}": trajectory_aurocs(
            sampled.trace, args.n_boot
        ),
    }
    knockouts = note_interventions(handle, noted[: args.n_interventions], progress=not args.quiet)
    n_lookups = table[table["note"] != ""]
    report = {
        "model": args.model,
        "weights_sha256": weights_sha256(args.model) or "",
        **greedy_summary(problems, greedy.records),
        "lookups": {
            "n_prompts": len(noted),
            "samples": args.samples,
            "n_read": int((n_lookups["lookup"] == "read").sum()),
            "n_copied": int((n_lookups["lookup"] == "copied").sum()),
            "copied_value_correct": float(n_lookups[n_lookups["lookup"] == "copied"]["value_correct"].mean()),
            "read_value_correct": float(n_lookups[n_lookups["lookup"] == "read"]["value_correct"].mean()),
        },
        "detection": det,
        "detection_auroc": {k: v["auroc"] for k, v in det.items()},
        "trajectory_auroc": traj,
        "interventions": (summary := summarise_interventions(knockouts, n_boot=args.n_boot)),
        "findings": findings(det, traj) + intervention_findings(summary),
    }
    rl = rl_summary(Path(args.rl))
    if rl:
        report["rl"] = rl
        report["rl_gain_points"] = rl["rl_gain_points"]
        report["rl_gain_by_subset"] = rl["rl_gain_by_subset"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    text = render(report)
    out.with_suffix(".md").write_text(text)
    plot(table, det, out.parent)
    table.to_csv(out.parent / "positive_control_lookups.csv", index=False, float_format="%.6g")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
