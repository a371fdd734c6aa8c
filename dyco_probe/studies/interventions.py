"""The headline intervention experiment (`analyses/interventions_headline.py`): does looking matter,
does staying grounded matter? (docs/method.md#interventions)

`headline(settings)` runs the sweep `interventions_headline.toml` (shipped with this module, and
linked as `analyses/sweeps/interventions_headline.toml`; resumable, one sweep directory per weights
hash) and writes `interventions_headline.csv` / `.md` / `.png` / `.pdf`: per experiment (image
knockout on visual-role tokens / text-history knockout on text-role tokens), role source, layer
window and target, the mean effects with bootstrap 95% CIs and the paired differences to the matched
random control and to the other role's tokens (`tables`); the `.md` opens with what the tables show,
written from them (`findings`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dyco_probe.interventions.stats import READOUT_LABELS, ROLE_SOURCE_LABELS
from dyco_probe.layers import window_order
from dyco_probe.models.loading import checkpoint_dir, weights_digest

SWEEP = Path(__file__).with_name("interventions_headline.toml")
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


ALPHA = 0.05  # "What it shows" states a difference only at paired-test p < ALPHA (and disjoint CIs)


def run(args, say=print):
    """Run (or resume) the headline sweep for `args`; returns the path of its `results.parquet`."""
    from dyco_probe.interventions import SweepConfig, run_sweep

    config = SweepConfig.load(SWEEP)
    config.model["source"] = args.model
    config.data.update(
        n=args.n, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, trajectory=args.trajectory
    )
    config.slices[0] = type(config.slices[0])("all", 0, args.n)
    config.out = str(run_dir(args))
    summary = run_sweep(config, progress=not args.quiet)
    say(
        f"sweep: {summary.rows_written} rows written, {summary.skipped} already there, "
        f"{summary.errors} errors, {summary.seconds:.0f} s -> {summary.out}"
    )
    return Path(summary.out) / "results.parquet"


def weights_id(model: str) -> str:
    """`model.safetensors` sha256 (first 16 hex digits) of a checkpoint directory, for provenance."""
    digest = weights_digest(model, 16, missing="")
    return "sha256:" + digest if digest else "unknown"


def num_layers(model: str) -> int | None:
    """Text-decoder layers of the model (from its config), None when unknown."""
    from dyco_probe.models.builtin import BuiltinArchitecture

    if model == "untrained":
        return BuiltinArchitecture().num_layers
    path = checkpoint_dir(model) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    return config.get("text_config", config).get("num_hidden_layers")


def run_dir(args) -> Path:
    """One sweep directory per weights: a retrained checkpoint never reuses the old one's rows."""
    weights = weights_digest(args.model)
    return Path(args.runs) / f"{Path(args.model).name}-{weights}-{args.trajectory}-n{args.n}"


def text_span(out: Path) -> str:
    """The text span convention of the sweep's roles and key spans (its manifest), default post_image."""
    manifest = out / "manifest.json"
    roles = json.loads(manifest.read_text()).get("roles", {}) if manifest.exists() else {}
    return roles.get("text_span", "post_image")


def tables(frame, n_boot: int, say=print):
    import pandas as pd

    from dyco_probe.interventions import compare_to_control, summarize

    frame = frame[frame["status"] == "ok"]
    rows = []
    for keys, (name, role, other) in EXPERIMENTS.items():
        part = frame[frame["keys"] == keys]
        if part.empty:
            say(f"no {keys!r} knockout rows in these results: {name} left out")
            continue
        groups = ["role_source", "layers", "target"]
        for value in READOUT_LABELS:
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
        "readout": list(READOUT_LABELS),
        "role_source": list(ROLE_SOURCE_LABELS),
    }

    def order(col):
        if col.name == "layers":
            return col.map(window_order)
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
        f"*Layer {last} and {READOUT_LABELS['dlogp_answer']}.* At layer {last}, the last layer, this readout cannot "
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
        per_source.append(f"{ROLE_SOURCE_LABELS.get(source, source)}: {counts}")
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
        for readout in READOUT_LABELS:
            for source in ROLE_SOURCE_LABELS:
                rows = part[(part["readout"] == readout) & (part["role_source"] == source)]
                if rows.empty:
                    continue
                sentences = []
                for control, against in ((f"random:{role}", "random"), (other, "other")):
                    groups: dict[str, list[str]] = {"larger": [], "smaller": [], "none": [], "unmeasured": []}
                    numbers = {}
                    for layers in sorted(rows["layers"].unique(), key=window_order):
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
                    lines.append(f"- **{READOUT_LABELS[readout]}, {ROLE_SOURCE_LABELS[source]}.** {text}")
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
                    f"| {experiment} | {ROLE_SOURCE_LABELS[source]} | {layers} | {READOUT_LABELS[readout]} | {cell(role)} | "
                    f"{cell(rnd)} | {cell(other)} | "
                    f"{fmt(r['diff_vs_random'], r['diff_low_vs_random'], r['diff_high_vs_random'], 2)}, "
                    f"p={pfmt(r['p_t_vs_random'])} |"
                )
    lines.append("")
    for (experiment, readout), part in table.groupby(["experiment", "readout"], sort=False):
        lines += [f"## {experiment}: {READOUT_LABELS[readout]}", ""]
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
                f"| {ROLE_SOURCE_LABELS[r['role_source']]} | {r['layers']} | {r['target']} | {r['n_targets']:.1f} | {r['n']} | "
                f"{fmt(r['mean'], r['ci_low'], r['ci_high'])} | {vs_r} | {vs_o} |"
            )
        lines.append("")
    return "\n".join(lines)


@dataclass
class HeadlineSettings:
    """The experiment's options (`analyses/interventions_headline.py`'s, with its defaults)."""

    runs: str  # sweep output root
    figures: str  # where the figure and tables go
    model: str = "builtin"
    n: int = 48  # test problems
    batch_size: int = 16
    max_new_tokens: int = 64
    trajectory: str = "greedy"  # reference trajectories: "greedy" or "gold"
    n_boot: int = 2000
    report_only: bool = False  # only redraw from stored results
    quiet: bool = False


def headline(args, say=print) -> Path:
    """Run (unless `report_only`) and write up the experiment; returns the path of the write-up
    without suffix (`.csv`, `.md`, `.png`, `.pdf`). `say` gets the progress lines."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from dyco_probe.viz import plot_headline_interventions

    results = run_dir(args) / "results.parquet"
    if not args.report_only:
        results = run(args, say)
    frame = pd.read_parquet(results)
    table = tables(frame, args.n_boot, say)
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
    fig = plot_headline_interventions(table, [name for name, _, _ in EXPERIMENTS.values()])
    fig.savefig(out.with_suffix(".png"), dpi=150)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
    return out
