"""Figures of the experiments: intervention effects (a sweep's, and the headline experiment's),
RL learning curves (single runs, and means over seeds), and the positive control's signals. Each draws
what it is given (tables the analyses wrote, training metrics) and returns the figure.
"""

from __future__ import annotations

import math

import numpy as np

from ..interventions.stats import READOUT_LABELS, ROLE_SOURCE_LABELS
from ..layers import window_order
from .style import ROLE_COLOURS, paper_style

__all__ = [
    "condition_label",
    "plot_headline_interventions",
    "plot_intervention_effects",
    "plot_positive_control_signals",
    "plot_rl_comparison",
    "plot_rl_curves",
]


def _panel_title(values: dict) -> str:
    """E.g. "image keys · knockout · Fisher–Rao roles" (strength shown when it is not a knockout;
    patches with their donor and direction), wrapped to fit a panel."""
    import textwrap

    def given(name):
        value = values.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value) == "":
            return None
        return value

    parts = []
    if given("keys") is not None:
        parts.append(f"{values['keys']} keys")
    kind, strength = given("kind"), given("strength")
    if kind is not None:
        kind = str(kind).replace("patch_", "patch ").replace("_", " ")
        scaled = isinstance(strength, (int, float)) and strength != 0
        parts.append(f"{kind} (λ={strength:g})" if scaled else kind)
    if given("donor") is not None:
        parts.append(f"{values['donor']} donor" + (f", {values['direction']}" if given("direction") else ""))
    if given("role_source") is not None:
        parts.append(ROLE_SOURCE_LABELS.get(values["role_source"], f"{values['role_source']} roles"))
    return "\n".join(textwrap.wrap(" · ".join(parts), 52))


def _target_label(target) -> str:
    return str(target) if str(target) else "every completion token"


def plot_intervention_effects(summary, value_label: str | None = None):
    """Intervention effects against the intervened layers, one panel per (intervention, role source).

    `summary`: one row per condition group with columns `keys` (or `kind`), `role_source`, `layers`,
    `target`, `mean`, `ci_low`, `ci_high` (e.g. `dyco_probe.interventions.summarize(frame, "dacc",
    ["kind", "keys", "strength", "role_source", "donor", "direction", "layers", "target"])`). Rows
    without a mean (a readout that does not apply, no target token) are not drawn; the caller says
    which (`condition_label` names them). Without any mean the figure says so in words.
    """
    import matplotlib.pyplot as plt

    frame = summary[summary["mean"].notna()].copy()
    if frame.empty:  # say so, rather than draw empty axes
        with paper_style():
            fig, ax = plt.subplots(figsize=(4.6, 1.2), layout="constrained")
            ax.axis("off")
            ax.text(0.5, 0.5, f"not drawn: no condition has a value of {value_label or 'the effect'}",
                    ha="center", va="center", fontsize=8)  # fmt: skip
        return fig
    panel_cols = [
        c for c in ("kind", "keys", "strength", "role_source", "donor", "direction") if c in frame.columns
    ]
    # NaN never equals itself: key panels on NaN-free values so a patch's panel is found again
    keyed = frame[panel_cols].astype(object).where(frame[panel_cols].notna(), "")
    frame["_panel"] = list(map(tuple, keyed.itertuples(index=False)))
    panels = list(dict.fromkeys(frame["_panel"]))
    ncols = min(2, max(len(panels), 1))
    nrows = max(1, math.ceil(len(panels) / ncols))
    with paper_style():
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(4.6 * ncols, 2.9 * nrows), squeeze=False, layout="constrained"
        )
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, panels):
            part = frame[frame["_panel"].map(lambda k, key=key: k == key)]
            windows = sorted(part["layers"].astype(str).unique(), key=window_order)
            targets = list(dict.fromkeys(part["target"]))
            for k, target in enumerate(targets):
                rows = part[part["target"] == target].assign(layers=lambda d: d["layers"].astype(str))
                rows = rows.set_index("layers").reindex(windows)
                offset = (k - (len(targets) - 1) / 2) * 0.1
                colour = ROLE_COLOURS.get(target, "0.5" if str(target).startswith("random") else None)
                ax.errorbar(
                    np.arange(len(windows)) + offset,
                    rows["mean"],
                    yerr=[
                        (rows["mean"] - rows["ci_low"]).clip(lower=0),
                        (rows["ci_high"] - rows["mean"]).clip(lower=0),
                    ],
                    marker="o",
                    color=colour,
                    ls="--" if str(target).startswith("random") else "-",
                    label=_target_label(target),
                )
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(range(len(windows)), [w if w == "all" else f"L{w}" for w in windows])
            ax.set_xlabel("intervened layers")
            ax.set_ylabel(value_label or "effect")
            ax.set_title(_panel_title(dict(zip(panel_cols, key))), fontsize=8)
            ax.legend(title="target tokens")
    return fig


def condition_label(values: dict) -> str:
    """One line naming an intervention condition (a results or summary row as a dict), e.g.
    "image keys · knockout · Fisher–Rao roles; target visual; layers 2"."""
    text = _panel_title(values).replace("\n", " ")
    if "target" in values:
        text += f"; target {_target_label(values['target'])}"
    if "layers" in values:
        text += f"; layers {values['layers']}"
    return text


def plot_rl_curves(runs: dict, smooth: int | None = None):
    """Held-out accuracy (Wilson 95% band) and training reward against the step, one line per run.

    `runs`: label -> `{"train": DataFrame, "eval": DataFrame}` (`dyco_probe.rundir.read_rl_run`). A third
    panel shows the mean alignment score `s_mean` when the runs traced it.
    """
    import matplotlib.pyplot as plt

    traced = any("s_mean" in r["train"].columns and r["train"]["s_mean"].notna().any() for r in runs.values())
    panels = 3 if traced else 2
    with paper_style():
        fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 2.6), layout="constrained")
        for label, run in runs.items():
            ev, tr = run["eval"], run["train"]
            if len(ev):
                line = axes[0].plot(ev["step"], 100 * ev["accuracy"], marker="o", label=label)[0]
                if "accuracy_ci_low" in ev:
                    axes[0].fill_between(
                        ev["step"],
                        100 * ev["accuracy_ci_low"],
                        100 * ev["accuracy_ci_high"],
                        color=line.get_color(),
                        alpha=0.15,
                        lw=0,
                    )
            if len(tr) and "reward" in tr:
                k = smooth or max(1, len(tr) // 15)
                reward = tr["reward"].rolling(k, min_periods=1).mean()
                axes[1].plot(tr["step"], reward, label=label)
                if traced and "s_mean" in tr:
                    axes[2].plot(tr["step"], tr["s_mean"].rolling(k, min_periods=1).mean(), label=label)
        axes[0].set_ylabel("held-out accuracy (%)")
        axes[1].set_ylabel("train reward (moving average)")
        if traced:
            axes[2].set_ylabel("mean $s_t$ (moving average)")
        for ax in axes:
            ax.set_xlabel("training step")
        axes[0].legend()
        axes[0].set_title("Held-out accuracy (95% CI)")
        axes[1].set_title("Training reward")
        if traced:
            axes[2].set_title("Alignment score of sampled tokens")
    return fig


# -- the headline intervention experiment (dyco_probe.studies.interventions) -------------------------


def plot_headline_interventions(table, experiments=("image knockout", "text-history knockout")):
    """The headline table (`dyco_probe.studies.interventions.tables`): one row of panels per
    experiment and role source, one column per readout; the role's tokens, matched random tokens and
    the other role's tokens against the knocked-out layers (mean, bootstrap 95% CI)."""
    import matplotlib.pyplot as plt

    panels = [(e, s) for e in experiments for s in ROLE_SOURCE_LABELS]
    fig, axes = plt.subplots(len(panels), len(READOUT_LABELS), figsize=(13, 3.1 * len(panels)), squeeze=False)
    colours = {"role": "#c0392b", "random": "#7f8c8d", "other": "#2874a6"}
    for i, (experiment, source) in enumerate(panels):
        for j, readout in enumerate(READOUT_LABELS):
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
            windows = sorted(part["layers"].unique(), key=window_order)
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
                ax.set_title(READOUT_LABELS[readout], fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{experiment}\n{ROLE_SOURCE_LABELS[source]}", fontsize=9)
            if j == len(READOUT_LABELS) - 1:
                ax.legend(fontsize=7, loc="best")
            if i == len(panels) - 1:
                ax.set_xlabel("knocked-out layers")
    fig.suptitle("Knocking out attention by token role (mean, bootstrap 95% CI)", fontsize=12)
    fig.tight_layout()
    return fig


# -- RL over seeds (dyco_probe.studies.rl_comparison) -----------------------------------------------


def plot_rl_comparison(curves: dict, algos, labels: dict):
    """Held-out accuracy and training reward against the step, mean over seeds with the 95% t-band,
    one column per algorithm and one line per DyCo granularity; on a task with notes, also the
    false-note accuracy and the share of noted look-ups copied.

    `curves`: `(algo, dyco) -> {seed: {"eval": [records], "train": [records]}}`; `labels`: dyco -> name."""
    import matplotlib.pyplot as plt
    from scipy import stats

    extra = [
        k
        for k in ("accuracy_false_note", "copy_rate")
        if any(k in (r["eval"][0] if r["eval"] else {}) for c in curves.values() for r in c.values())
    ]
    fig, axes = plt.subplots(
        2 + len(extra),
        len(algos),
        figsize=(5.2 * len(algos), 3.2 * (2 + len(extra))),
        squeeze=False,
        sharex="col",
    )
    colours = {"off": "0.35", "token": "tab:blue", "sequence": "tab:orange"}

    def band(ax, xs, ys, dyco):
        ys = np.asarray(ys)
        mean = ys.mean(0)
        ax.plot(xs, mean, color=colours[dyco], label=f"{labels[dyco]} (n={len(ys)})")
        if len(ys) > 1:
            half = stats.t.ppf(0.975, len(ys) - 1) * ys.std(0, ddof=1) / math.sqrt(len(ys))
            ax.fill_between(xs, mean - half, mean + half, color=colours[dyco], alpha=0.18, linewidth=0)

    for col, algo in enumerate(algos):
        top, bottom = axes[0][col], axes[1][col]
        for dyco in labels:
            per_seed = curves.get((algo, dyco)) or {}
            if not per_seed:
                continue
            evals = [r["eval"] for r in per_seed.values()]
            steps = [e["step"] for e in evals[0]]
            if all([e["step"] for e in ev] == steps for ev in evals):
                band(top, steps, [[100 * e["accuracy"] for e in ev] for ev in evals], dyco)
            trains = [r["train"] for r in per_seed.values()]
            n = min(len(t) for t in trains)
            k = max(1, n // 15)  # moving average over ~1/15 of the run
            smooth = [np.convolve([x["reward"] for x in t[:n]], np.ones(k) / k, mode="valid") for t in trains]
            band(bottom, [t["step"] for t in trains[0][k - 1 : n]], smooth, dyco)
        for row, key in enumerate(extra, start=2):
            ax = axes[row][col]
            for dyco in labels:
                evals = [r["eval"] for r in (curves.get((algo, dyco)) or {}).values()]
                if evals and all([e["step"] for e in ev] == [e["step"] for e in evals[0]] for ev in evals):
                    band(
                        ax, [e["step"] for e in evals[0]], [[100 * e[key] for e in ev] for ev in evals], dyco
                    )
            ax.set_ylabel(
                "false-note accuracy (%)" if key == "accuracy_false_note" else "noted look-ups copied (%)"
            )
            ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel("training step")
        top.set_title(algo.upper())
        top.set_ylabel("held-out accuracy (%)")
        bottom.set_ylabel("train reward (moving average)")
        top.legend(fontsize=8, frameon=False)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle("RLVR on the built-in model: baseline vs DyCo (mean over seeds, 95% t-band)", fontsize=10)
    fig.tight_layout()
    return fig


# -- the positive control (dyco_probe.studies.positive_control) -------------------------------------


def plot_positive_control_signals(table, detection: dict):
    """Value tokens of noted look-ups (`table`: `dyco_probe.positive_control.copy_vs_read`'s), read
    from the image against copied from the note: each signal's distribution, with its AUROC
    (`detection`: `dyco_probe.positive_control.detection`'s)."""
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
        d = detection.get(col, {})
        ax.set_title(f"{title}\nAUROC {d.get('auroc', math.nan):.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Value tokens of noted look-ups: read from the image vs copied from the note", fontsize=9)
    fig.tight_layout()
    return fig
