"""The positive control (`analyses/positive_control.py`): does each signal see the failure planted in
the built-in model?

The built-in model trusts notes in the question: at the look-up of a noted object it sometimes copies
the note's value instead of reading the image, so a false note gives a wrong answer, and which look-ups
were copied is known exactly (`dyco_probe.positive_control` measures it). `positive_control(settings)`
runs the four parts (per-token signals on sampled look-ups, trajectory features on greedy
completions, knockouts at the noted look-up, and the repair by RL read from `rl_comparison.json`)
and writes `positive_control.{md,json}`, `positive_control_signals.{png,pdf}` and
`positive_control_lookups.csv`; `render` writes the Markdown from the JSON alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dyco_probe.positive_control import (
    copy_vs_read,
    detection,
    note_interventions,
    summarise_interventions,
    verdict,
)

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


@dataclass
class PositiveControl:
    """The study's options (`analyses/positive_control.py`'s, with its defaults)."""

    rl: str  # rl_comparison.json of analyses/rl_comparison.py (read if present)
    out: str  # the write-up, without suffix (its folder takes the figure and the table)
    model: str = "builtin"
    n_noted: int = 100  # noted test problems (true and false notes)
    samples: int = 8  # sampled completions per noted problem
    n_greedy: int = 300  # test problems decoded greedily
    n_interventions: int = 60  # noted problems for the knockouts
    batch_size: int = 16
    n_boot: int = 1000
    seed: int = 0
    quiet: bool = False
    report_only: bool = False  # re-read the RL JSON and rewrite the report from the stored JSON


def positive_control(args) -> str:
    """Run the study (or, with `report_only`, rewrite its report from the stored JSON) and return the
    Markdown it wrote."""
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
        return render(report)
    import matplotlib.pyplot as plt

    import dyco_probe as dp
    from dyco_probe.data import example_from_problem
    from dyco_probe.models.loading import weights_sha256
    from dyco_probe.task.problems import make_split
    from dyco_probe.viz import plot_positive_control_signals

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
    fig = plot_positive_control_signals(table, det)
    for ext in ("png", "pdf"):
        fig.savefig(out.parent / f"positive_control_signals.{ext}", dpi=150)
    plt.close(fig)
    table.to_csv(out.parent / "positive_control_lookups.csv", index=False, float_format="%.6g")
    return text
