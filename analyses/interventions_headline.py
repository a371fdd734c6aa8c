"""Does looking matter, does staying grounded matter? The headline intervention experiment (docs/method.md#interventions).

Runs the sweep `analyses/sweeps/interventions_headline.toml` on the built-in model (resumable: a
rerun skips finished conditions; one sweep directory per weights hash, so a retrained checkpoint
starts afresh) and writes to `figures/`:

- `interventions_headline.csv` / `.md`: per experiment (image knockout on visual-role tokens /
  text-history knockout on text-role tokens: the text the query reads, its own column excluded),
  role source (ground truth / Fisher–Rao), layer window and target: the mean free-running accuracy
  change and teacher-forced log-probability changes (gold answer tokens; the intervened tokens
  themselves) with bootstrap 95% CIs, and the paired difference to the matched random control and to
  the other role's tokens (t-test p, Cohen's d_z); the `.md` opens with what the tables show, written
  from them;
- `interventions_headline.png` / `.pdf`: the same effects against the layer window.

An intervention on token `t` acts on the query that produces it (the position of `o_{t-1}`,
docs/method.md#attention-signals). The regenerated (free-running) completions keep the trajectory up to the first intervened token.

    python -m analyses.interventions_headline                 # n = 48, about 5 min of CPU
    python -m analyses.interventions_headline --n 16          # a quick look
    python -m analyses.interventions_headline --report-only   # redraw from stored results
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SWEEP = ROOT / "analyses" / "sweeps" / "interventions_headline.toml"
EXPERIMENTS = {  # key span (dyco_probe.interventions.spec) -> (name, its role, the other role)
    "image": ("image knockout", "visual", "text"),
    "text_history": ("text-history knockout", "text", "visual"),
}


def knocked_out(keys: str, text_span: str = "post_image") -> str:
    """What an experiment's knockout removes from the queries' attention, in words."""
    if keys == "image":
        return "the image placeholder tokens (key span `image`)"
    text = (
        "every position after the last image token up to the query: the question, then the completion so far"
        if text_span == "post_image"
        else "every non-image, non-padding position up to the query, system prompt included"
    )
    return f"the text the query reads ({text}), without the query's own column (key span `text_history`)"


SOURCES = {"ground_truth": "ground-truth roles", "fisher_rao": "Fisher–Rao roles"}
READOUTS = {
    "dacc": "Δ accuracy (free-running)",
    "dlogp_answer": "Δ log p(gold answer) (teacher-forced)",
    "dlogp_target": "Δ log p(intervened token) (teacher-forced)",
}
ALPHA = 0.05  # "What it shows" states a difference only at paired-test p < ALPHA (and disjoint CIs)


def run(args):
    import torch

    from dyco_probe.interventions import SweepConfig, run_sweep

    torch.set_num_threads(args.threads)
    config = SweepConfig.load(SWEEP)
    config.model["source"] = args.model
    config.data.update(
        n=args.n, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, trajectory=args.trajectory
    )
    config.slices[0] = type(config.slices[0])("all", 0, args.n)
    config.out = str(run_dir(args))
    summary = run_sweep(config, progress=not args.quiet)
    print(
        f"sweep: {summary.rows_written} rows written, {summary.skipped} already there, "
        f"{summary.errors} errors, {summary.seconds:.0f} s -> {summary.out}"
    )
    return Path(summary.out) / "results.parquet"


def weights_id(model: str) -> str:
    """`model.safetensors` sha256 (first 16 hex digits) of a checkpoint directory, for provenance."""
    from dyco_probe.models.loading import weights_sha256

    digest = weights_sha256(model)
    return "unknown" if digest is None else "sha256:" + digest[:16]


def num_layers(model: str) -> int | None:
    """Text-decoder layers of the model (from its config), None when unknown."""
    import json

    from dyco_probe.models.builtin import BUILTIN_DIR, BuiltinArchitecture

    if model == "untrained":
        return BuiltinArchitecture().num_layers
    path = (BUILTIN_DIR if model == "builtin" else Path(model)) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    return config.get("text_config", config).get("num_hidden_layers")


def run_dir(args) -> Path:
    """One sweep directory per weights: a retrained checkpoint never reuses the old one's rows."""
    weights = weights_id(args.model).removeprefix("sha256:")[:12]
    return Path(args.runs) / f"{Path(args.model).name}-{weights}-{args.trajectory}-n{args.n}"


def text_span(out: Path) -> str:
    """The text span convention of the sweep's roles and key spans (its manifest), default post_image."""
    import json

    manifest = out / "manifest.json"
    roles = json.loads(manifest.read_text()).get("roles", {}) if manifest.exists() else {}
    return roles.get("text_span", "post_image")


def layer_order(name: str) -> tuple:
    return (1, 0) if name == "all" else (0, int(name.split("-")[0]))


def tables(frame, n_boot: int):
    import pandas as pd

    from dyco_probe.interventions import compare_to_control, summarize

    frame = frame[frame["status"] == "ok"]
    rows = []
    for keys, (name, role, other) in EXPERIMENTS.items():
        part = frame[frame["keys"] == keys]
        if part.empty:
            print(f"no {keys!r} knockout rows in these results: {name} left out")
            continue
        groups = ["role_source", "layers", "target"]
        for value in READOUTS:
            stats = summarize(part, value, groups, n_boot=n_boot)
            index = pd.MultiIndex.from_frame(stats[groups])
            stats["n_targets"] = part.groupby(groups)["n_targets"].mean().reindex(index).to_numpy()
            if value == "dlogp_answer" and "n_answer_targets" in part:
                # samples whose intervened tokens include a gold answer token (see `last_layer_note`)
                measured = part[part[value].notna()]
                hits = (measured["n_answer_targets"] > 0).groupby([measured[g] for g in groups]).sum()
                stats["n_answer_hit"] = hits.reindex(index).to_numpy()
            for control in (f"random:{role}", other):
                cmp = compare_to_control(
                    part,
                    value,
                    target={"target": role},
                    control={"target": control},
                    by=["role_source", "layers"],
                    n_boot=n_boot,
                )
                cmp = cmp.rename(
                    columns={
                        c: f"{c}_vs_{'random' if control.startswith('random') else 'other'}"
                        for c in cmp.columns
                        if c not in ("role_source", "layers")
                    }
                )
                stats = stats.merge(cmp, on=["role_source", "layers"], how="left")
            stats.insert(0, "readout", value)
            stats.insert(0, "experiment", name)
            stats["role"] = role
            rows.append(stats)
    out = pd.concat(rows, ignore_index=True)
    rank = {
        "experiment": [e[0] for e in EXPERIMENTS.values()],
        "readout": list(READOUTS),
        "role_source": list(SOURCES),
    }

    def order(col):
        if col.name == "layers":
            return col.map(layer_order)
        if col.name == "target":  # the role, its random control, the other role
            role = out.loc[col.index, "role"]
            return col.str.startswith("random:").astype(int) + 2 * (
                (col != role) & ~col.str.startswith("random:")
            )
        return col.map(rank[col.name].index)

    out = out.sort_values(["experiment", "readout", "role_source", "layers", "target"], key=order)
    return out.reset_index(drop=True)


def fmt(mean, low, high, digits=3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def pfmt(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def windows_text(names: list[str]) -> str:
    """E.g. `layers 0, 1, 3 and all layers at once`."""
    singles = [n for n in names if n != "all"]
    parts = []
    if singles:
        many = len(singles) > 1 or "-" in singles[0]
        parts.append(("layers " if many else "layer ") + ", ".join(singles))
    if "all" in names:
        parts.append("all layers at once")
    return " and ".join(parts)


def verdict(role, control, against: str) -> tuple[str, str]:
    """How the role's tokens compare with a control: `larger` (a larger drop), `smaller`, `none` or
    `unmeasured`, and the paired difference in words. A difference counts only where the two 95% CIs
    of the means do not overlap and the paired t-test (and the paired difference's CI) agree, p < ALPHA."""
    diff, low, high, p = (role[f"{c}_vs_{against}"] for c in ("diff", "diff_low", "diff_high", "p_t"))
    if control is None or any(_missing(x) for x in (role["mean"], control["mean"], diff)):
        return "unmeasured", ""
    scale = max(abs(diff), abs(low), abs(high))  # two significant digits for small differences
    digits = 2 if scale >= 0.1 or scale == 0 else min(6, 1 - math.floor(math.log10(scale)))
    numbers = f"{fmt(diff, low, high, digits)}, p={pfmt(p)}"
    overlap = role["ci_low"] <= control["ci_high"] and control["ci_low"] <= role["ci_high"]
    if _missing(p) or p >= ALPHA or low <= 0 <= high or overlap:
        return "none", numbers
    return ("larger" if diff < 0 else "smaller"), numbers


def last_layer_note(part, last: int) -> list[str]:
    """Why the teacher-forced answer readout cannot see a last-layer knockout of tokens other than the
    answer tokens, with how many samples of each target had an answer token among their intervened
    tokens. Empty where it does not apply: no last-layer window, or an answer token was intervened on
    in every measured sample."""
    rows = part[(part["readout"] == "dlogp_answer") & (part["layers"] == str(last)) & (part["n"] > 0)]
    if rows.empty:
        return []
    recorded = "n_answer_hit" in rows and rows["n_answer_hit"].notna().any()
    hits = rows["n_answer_hit"].fillna(0) if recorded else None
    if recorded and (hits >= rows["n"]).all():
        return []
    text = (
        f"*Layer {last} and {READOUTS['dlogp_answer']}.* At layer {last}, the last layer, this readout cannot "
        "react to a knockout on tokens other than the gold answer tokens themselves (such as the chain of "
        "thought before the answer): the knockout changes only the intervened queries' own last-layer "
        "attention outputs, and the answer tokens' logits at the last layer do not depend on other "
        "positions' last-layer attention outputs. It can move only on samples where an intervened token "
        "is a gold answer token"
    )
    if not recorded:
        return [text + " (not recorded in these results).", ""]
    per_source = []
    for source, group in rows.groupby("role_source", sort=False):
        role = group["role"].iloc[0]
        counts = ", ".join(
            f"{int(hits[k])} of {int(r['n'])} samples for {target_name(r['target'], role)}"
            for k, r in group.iterrows()
        )
        per_source.append(f"{SOURCES.get(source, source)}: {counts}")
    text += "; here, " + "; ".join(per_source) + "."
    if (hits == 0).any():
        text += f" Where that count is 0, the layer-{last} values are zero by construction, not evidence that the layer does not matter."
    return [text, ""]


def target_name(target: str, role: str) -> str:
    return "matched random tokens" if target.startswith("random:") else f"{target}-role tokens"


def findings(table, meta: dict) -> list[str]:
    """The "What it shows" section: for each experiment, readout, role source and layer window, whether
    the knockout's effect on the role's tokens is larger than on matched random tokens and than on the
    other role's tokens. Written from the table, nothing else."""
    lines = [
        "## What it shows",
        "",
        "Written from the tables below. Every Δ is intervened minus unintervened, so a negative value is a "
        "drop and a *larger drop* is a more negative mean. A difference between the role's tokens and a "
        "control is stated only where the two 95% CIs of the means do not overlap and the paired t-test "
        f"gives p < {ALPHA} (the paired difference role − control, its bootstrap CI and p follow in "
        "brackets); otherwise: *no detectable difference*.",
        "",
    ]
    for keys, (experiment, role, other) in EXPERIMENTS.items():
        part = table[table["experiment"] == experiment]
        if part.empty:
            continue
        lines += [
            f"### {experiment.capitalize()} on {role}-role tokens",
            "",
            f"Knocked out: {knocked_out(keys, meta.get('text_span', 'post_image'))}.",
            "",
        ]
        for readout in READOUTS:
            for source in SOURCES:
                rows = part[(part["readout"] == readout) & (part["role_source"] == source)]
                if rows.empty:
                    continue
                sentences = []
                for control, against in ((f"random:{role}", "random"), (other, "other")):
                    groups: dict[str, list[str]] = {"larger": [], "smaller": [], "none": [], "unmeasured": []}
                    numbers = {}
                    for layers in sorted(rows["layers"].unique(), key=layer_order):
                        at = rows[rows["layers"] == layers]
                        own = at[at["target"] == role]
                        if own.empty:
                            continue
                        ctl = at[at["target"] == control]
                        kind, numbers[layers] = verdict(
                            own.iloc[0], None if ctl.empty else ctl.iloc[0], against
                        )
                        groups[kind].append(layers)
                    clauses = [
                        f"a {size} drop "
                        + _and([f"at {windows_text([w])} ({numbers[w]})" for w in groups[size]])
                        for size in ("larger", "smaller")
                        if groups[size]
                    ]
                    if groups["none"]:
                        clauses.append(f"no detectable difference at {windows_text(groups['none'])}")
                    if groups["unmeasured"]:
                        clauses.append(
                            f"not measured (no sample has both) at {windows_text(groups['unmeasured'])}"
                        )
                    if clauses:
                        sentences.append(f"against {target_name(control, role)}: {'; '.join(clauses)}.")
                if sentences:
                    text = " ".join(x[0].upper() + x[1:] for x in sentences)
                    lines.append(f"- **{READOUTS[readout]}, {SOURCES[source]}.** {text}")
        lines.append("")
        if meta.get("num_layers"):
            lines += last_layer_note(part, meta["num_layers"] - 1)
    return lines


def markdown(table, meta: dict) -> str:
    lines = [
        "# Interventions: does looking matter, does staying grounded matter?",
        "",
        f"Model `{meta['model']}`, {meta['n']} synthetic test problems, {meta['trajectory']} trajectories "
        f"(their answer accuracy {meta['accuracy']:.3f}). Knockout = −∞ on the attention logits, at the "
        "given layers (all heads), from the queries that produce the chosen tokens to the knocked-out keys: "
        + "; ".join(
            f"**{name}**: {knocked_out(keys, meta.get('text_span', 'post_image'))}"
            for keys, (name, _, _) in EXPERIMENTS.items()
            if name in set(table["experiment"])
        )
        + ". Mean over samples "
        "with bootstrap 95% CI; `vs random` / `vs other`: paired difference to the matched random tokens "
        "(same count, same sample) / to the other role's tokens, with the paired t-test p. "
        "The teacher-forced answer readout counts only the samples whose trajectory's answer is the gold one.",
        "",
        f"Weights: `{meta['weights']}`. Sweep: `analyses/sweeps/interventions_headline.toml`.",
        "",
        *findings(table, meta),
        "## Key numbers (all layers knocked out, and the single layer with the largest effect on the role's tokens)",
        "",
        "| experiment | roles | layers | readout | role tokens | matched random | other role | role − random [CI], p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (experiment, source), part in table.groupby(["experiment", "role_source"], sort=False):
        own = part[(part["target"] == part["role"]) & (part["readout"] == "dacc")]
        single = own[own["layers"] != "all"]
        best = (
            single.loc[single["mean"].idxmin(), "layers"]
            if len(single) and single["mean"].notna().any()
            else None
        )
        for layers in ["all"] + ([best] if best is not None else []):
            for readout in ("dacc", "dlogp_target"):
                rows = part[(part["layers"] == layers) & (part["readout"] == readout)]
                role = rows[rows["target"] == rows["role"]]
                rnd = rows[rows["target"].str.startswith("random:")]
                other = rows[(rows["target"] != rows["role"]) & ~rows["target"].str.startswith("random:")]
                if role.empty:
                    continue
                r = role.iloc[0]

                def cell(x):
                    return (
                        "–"
                        if x.empty
                        else fmt(x["mean"].iloc[0], x["ci_low"].iloc[0], x["ci_high"].iloc[0], 2)
                    )

                lines.append(
                    f"| {experiment} | {SOURCES[source]} | {layers} | {READOUTS[readout]} | {cell(role)} | "
                    f"{cell(rnd)} | {cell(other)} | "
                    f"{fmt(r['diff_vs_random'], r['diff_low_vs_random'], r['diff_high_vs_random'], 2)}, "
                    f"p={pfmt(r['p_t_vs_random'])} |"
                )
    lines.append("")
    for (experiment, readout), part in table.groupby(["experiment", "readout"], sort=False):
        lines += [f"## {experiment}: {READOUTS[readout]}", ""]
        lines += [
            "| roles | layers | target | tokens/sample | n | mean [95% CI] | vs random: diff [CI], p | vs other: diff [CI], p |",
            "| --- | --- | --- | ---: | ---: | --- | --- | --- |",
        ]
        for _, r in part.iterrows():
            role = r["target"] == r["role"]
            vs_r = (
                fmt(r["diff_vs_random"], r["diff_low_vs_random"], r["diff_high_vs_random"])
                + f", p={pfmt(r['p_t_vs_random'])}"
                if role
                else ""
            )
            vs_o = (
                fmt(r["diff_vs_other"], r["diff_low_vs_other"], r["diff_high_vs_other"])
                + f", p={pfmt(r['p_t_vs_other'])}"
                if role
                else ""
            )
            lines.append(
                f"| {SOURCES[r['role_source']]} | {r['layers']} | {r['target']} | {r['n_targets']:.1f} | {r['n']} | "
                f"{fmt(r['mean'], r['ci_low'], r['ci_high'])} | {vs_r} | {vs_o} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(e, s) for e in ("image knockout", "text-history knockout") for s in SOURCES]
    fig, axes = plt.subplots(len(panels), len(READOUTS), figsize=(13, 3.1 * len(panels)), squeeze=False)
    colours = {"role": "#c0392b", "random": "#7f8c8d", "other": "#2874a6"}
    for i, (experiment, source) in enumerate(panels):
        for j, readout in enumerate(READOUTS):
            ax = axes[i][j]
            part = table[
                (table["experiment"] == experiment)
                & (table["readout"] == readout)
                & (table["role_source"] == source)
            ]
            if part.empty:
                ax.set_visible(False)
                continue
            role = part["role"].iloc[0]
            windows = sorted(part["layers"].unique(), key=layer_order)
            x = range(len(windows))
            for k, (target, kind) in enumerate(
                [(role, "role"), (f"random:{role}", "random"), (None, "other")]
            ):
                rows = part[part["target"] != role] if kind == "other" else part[part["target"] == target]
                if kind == "other":
                    rows = rows[~rows["target"].str.startswith("random:")]
                if rows.empty:
                    continue
                label = rows["target"].iloc[0]
                rows = rows.set_index("layers").reindex(windows)
                offset = (k - 1) * 0.12
                ax.errorbar(
                    [v + offset for v in x],
                    rows["mean"],
                    yerr=[rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]],
                    marker="o",
                    ms=4,
                    capsize=3,
                    lw=1.4,
                    color=colours[kind],
                    label=f"{label} tokens" if kind != "random" else f"random (matched to {role})",
                )
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(list(x), [f"L{w}" if w != "all" else "all" for w in windows])
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(READOUTS[readout], fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{experiment}\n{SOURCES[source]}", fontsize=9)
            if j == len(READOUTS) - 1:
                ax.legend(fontsize=7, loc="best")
            if i == len(panels) - 1:
                ax.set_xlabel("knocked-out layers")
    fig.suptitle("Knocking out attention by token role (mean, bootstrap 95% CI)", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=150)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="builtin (default) or a checkpoint directory")
    p.add_argument("--n", type=int, default=48, help="test problems")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--trajectory", default="greedy", choices=["greedy", "gold"], help="reference trajectories"
    )
    p.add_argument("--runs", default=str(ROOT / "runs" / "interventions_headline"), help="sweep output root")
    p.add_argument("--figures", default=str(ROOT / "figures"), help="where the figure and tables go")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="only redraw from stored results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import pandas as pd

    results = run_dir(args) / "results.parquet"
    if not args.report_only:
        results = run(args)
    frame = pd.read_parquet(results)
    table = tables(frame, args.n_boot)
    acc = frame.drop_duplicates("item_index")["correct_ref"].mean()
    meta = {
        "model": args.model,
        "weights": weights_id(args.model),
        "n": int(frame["item_index"].nunique()),
        "accuracy": float(acc),
        "trajectory": args.trajectory,
        "num_layers": num_layers(args.model),
        "text_span": text_span(results.parent),
    }
    out = Path(args.figures) / "interventions_headline"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False, float_format="%.6g")
    out.with_suffix(".md").write_text(markdown(table, meta))
    figure(table, out)
    print(f"wrote {out}.csv, .md, .png, .pdf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
