"""Paper-style matplotlib figures of the token-level analyses, and of what the other analyses wrote.

Every function draws data it is given (a `dyco_probe.analysis.TokenAnalysis`, a table another
analysis wrote, training metrics); none computes a statistic of its own beyond what it plots.
Functions that draw one panel take `ax=None` (a new figure) and return the figure.

    from dyco_probe.analysis import analyse_tokens
    from dyco_probe.viz import plot_token_analysis, save_token_analysis_figures

    result = analyse_tokens(trace)
    fig = plot_token_analysis(result)                         # the overview, six panels
    save_token_analysis_figures(result, "figures")            # each panel and the overview, PNG + PDF
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .style import GROUP_COLOURS, ROLE_COLOURS, paper_style, save_figure

__all__ = [
    "plot_dependency_vs_delta",
    "plot_feature_auroc",
    "plot_intervention_effects",
    "plot_labeller_validation",
    "plot_ratio_distributions",
    "plot_rl_curves",
    "plot_roc",
    "plot_role_fractions",
    "plot_score_distributions",
    "plot_switch_rate",
    "plot_token_analysis",
    "save_token_analysis_figures",
]

_GROUPS = ("correct", "incorrect")
_ROLE_ORDER = ("visual", "text", "neutral")


def _axes(ax, figsize=(3.3, 2.5)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    with paper_style():
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _groups(frame):
    """`(group, rows)` for correct and incorrect, skipping empty groups."""
    for g in _GROUPS:
        part = frame[frame["correct"] == (g == "correct")]
        if len(part):
            yield g, part


def _row(table, group, measure):
    rows = table[(table["group"] == group) & (table["measure"] == measure)]
    return None if rows.empty else rows.iloc[0]


def _err(row):
    if row is None or not np.isfinite(row["mean"]):
        return math.nan, (0.0, 0.0)
    lo = row["mean"] - row["ci_low"] if np.isfinite(row["ci_low"]) else 0.0
    hi = row["ci_high"] - row["mean"] if np.isfinite(row["ci_high"]) else 0.0
    return row["mean"], (max(lo, 0.0), max(hi, 0.0))


def _empty(ax, text="no data"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


# -- token-level analysis -----------------------------------------------------------------------------


def plot_role_fractions(analysis, ax=None):
    """Role fractions of correct vs incorrect trajectories (mean over trajectories, 95% CI)."""
    with paper_style():
        fig, ax = _axes(ax)
        width = 0.38
        x = np.arange(len(_ROLE_ORDER))
        for k, g in enumerate(_GROUPS):
            stats = [_err(_row(analysis.role_fractions, g, r)) for r in _ROLE_ORDER]
            means = [m for m, _ in stats]
            n = _row(analysis.role_fractions, g, _ROLE_ORDER[0])
            if n is None or n["n"] == 0:
                continue
            ax.bar(
                x + (k - 0.5) * width,
                means,
                width,
                yerr=np.array([e for _, e in stats]).T,
                color=GROUP_COLOURS[g],
                alpha=0.85,
                label=f"{g} (n={int(n['n'])})",
                error_kw={"elinewidth": 0.8},
            )
        ax.set_xticks(x, list(_ROLE_ORDER))
        for tick, role in zip(ax.get_xticklabels(), _ROLE_ORDER):
            tick.set_color(ROLE_COLOURS[role])
        ax.set_ylabel("fraction of tokens")
        ax.set_ylim(0, 1)
        ax.set_title("Token roles")
        ax.legend()
    return fig


def _hist(ax, values_by_group: dict, bins, xlabel: str, title: str):
    drawn = False
    for g, values in values_by_group.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        ax.hist(
            values,
            bins=bins,
            density=True,
            histtype="stepfilled",
            alpha=0.25,
            color=GROUP_COLOURS[g],
        )
        ax.hist(
            values,
            bins=bins,
            density=True,
            histtype="step",
            color=GROUP_COLOURS[g],
            label=f"{g} ({values.size} tokens, mean {values.mean():.2f})",
        )
        drawn = True
    if not drawn:
        _empty(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    if drawn:
        ax.legend()


def plot_score_distributions(analysis, ax=None, bins: int = 25):
    """Distribution of `s_t` over non-neutral tokens, correct vs incorrect trajectories."""
    with paper_style():
        fig, ax = _axes(ax)
        active = analysis.tokens[analysis.tokens["role"] != "neutral"]
        _hist(
            ax,
            {g: part["s"] for g, part in _groups(active)},
            np.linspace(0, 1, bins + 1),
            "alignment score $s_t$",
            "$s_t$ of visual- and text-role tokens",
        )
    return fig


def plot_ratio_distributions(analysis, axes=None, bins: int = 25):
    """Two panels: `r̃_vis` of visual-role tokens and `r̃_txt` of text-role tokens, correct vs incorrect."""
    import matplotlib.pyplot as plt

    with paper_style():
        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(6.4, 2.5), layout="constrained")
        fig = axes[0].figure
        tokens = analysis.tokens
        edges = np.linspace(0, 1, bins + 1)
        for ax, role, column, label in (
            (axes[0], "visual", "r_vis_n", r"normalised visual ratio $\tilde r_{vis}$"),
            (axes[1], "text", "r_txt_n", r"normalised text ratio $\tilde r_{txt}$"),
        ):
            part = tokens[tokens["role"] == role]
            _hist(ax, {g: p[column] for g, p in _groups(part)}, edges, label, f"{role}-role tokens")
            ax.title.set_color(ROLE_COLOURS[role])
    return fig


def _strip(ax, values_by_group: dict, table, measure: str, ylabel: str, title: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    positions, labels = [], []
    for k, g in enumerate(_GROUPS):
        values = np.asarray(values_by_group.get(g, []), dtype=float)
        values = values[np.isfinite(values)]
        labels.append(f"{g}\n(n={values.size})")
        positions.append(k)
        if values.size == 0:
            continue
        ax.boxplot(
            values,
            positions=[k],
            widths=0.5,
            showfliers=False,
            medianprops={"color": GROUP_COLOURS[g]},
            boxprops={"color": "0.5"},
            whiskerprops={"color": "0.5"},
            capprops={"color": "0.5"},
        )
        ax.scatter(
            k + rng.uniform(-0.15, 0.15, values.size), values, s=6, color=GROUP_COLOURS[g], alpha=0.5, lw=0
        )
        mean, err = _err(_row(table, g, measure))
        if np.isfinite(mean):
            ax.errorbar([k + 0.32], [mean], yerr=np.array([err]).T, fmt="D", color="k", ms=3.5)
    ax.set_xticks(positions, labels)
    ax.set_xlim(-0.6, len(_GROUPS) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_switch_rate(analysis, ax=None):
    """Per-trajectory role-switch rate, correct vs incorrect (box, points, and the mean with its 95% CI)."""
    with paper_style():
        fig, ax = _axes(ax)
        samples = analysis.samples
        _strip(
            ax,
            {g: part["switch_rate"] for g, part in _groups(samples)},
            analysis.switches,
            "role-switch rate",
            "switches / consecutive non-neutral pairs",
            "Role-switch rate",
        )
        ax.set_ylim(-0.03, 1.03)
    return fig


def plot_roc(analysis, ax=None, feature: str = "sample_score"):
    """ROC curve of a per-trajectory feature (default: the sample score) for telling correct from incorrect."""
    from ..analysis import SAMPLE_FEATURES, roc_curve

    with paper_style():
        fig, ax = _axes(ax, figsize=(2.8, 2.6))
        samples = analysis.samples
        fpr, tpr = roc_curve(samples[feature], samples["correct"])
        row = analysis.auroc.set_index("feature").loc[feature]
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        if len(fpr):
            label = f"AUROC {row['auroc']:.3f}\n95% CI [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            ax.plot(fpr, tpr, color=GROUP_COLOURS["correct"], label=label)
            ax.legend(loc="lower right")
        else:
            _empty(ax, "needs correct and incorrect\ntrajectories")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"Correct vs incorrect: {SAMPLE_FEATURES.get(feature, feature)}", fontsize=8)
    return fig


def plot_feature_auroc(analysis, ax=None):
    """AUROC (95% CI) of every per-trajectory feature for correctness; 0.5 is chance."""
    with paper_style():
        fig, ax = _axes(ax, figsize=(4.8, 2.6))  # room for the feature names and the whole title
        table = analysis.auroc
        y = np.arange(len(table))[::-1]
        for yi, (_, r) in zip(y, table.iterrows()):
            if not np.isfinite(r["auroc"]):
                ax.text(0.5, yi, "n/a", ha="center", va="center", color="0.5", fontsize=7)
                continue
            lo = r["auroc"] - r["ci_low"] if np.isfinite(r["ci_low"]) else 0
            hi = r["ci_high"] - r["auroc"] if np.isfinite(r["ci_high"]) else 0
            colour = GROUP_COLOURS["correct"] if r["feature"] == "sample_score" else "0.3"
            ax.errorbar([r["auroc"]], [yi], xerr=[[lo], [hi]], fmt="o", color=colour)
        ax.axvline(0.5, color="0.6", lw=0.8, ls="--")
        ax.set_yticks(y, list(table["description"]))
        ax.set_xlim(0, 1)
        ax.set_xlabel("AUROC for correctness (95% CI)")
        ax.set_title("Which features predict correctness?")
    return fig


def plot_token_analysis(analysis, title: str | None = None):
    """The overview: role fractions, `s_t`, own-modality ratios (two panels), switch rate and ROC."""
    import matplotlib.pyplot as plt

    with paper_style():
        fig, axes = plt.subplots(2, 3, figsize=(10, 5.6), layout="constrained")
        plot_role_fractions(analysis, axes[0, 0])
        plot_score_distributions(analysis, axes[0, 1])
        plot_switch_rate(analysis, axes[0, 2])
        plot_ratio_distributions(analysis, axes[1, :2])
        plot_roc(analysis, axes[1, 2])
        n_ok = int(analysis.samples["correct"].sum())
        n = len(analysis.samples)
        fig.suptitle(
            title
            or f"Token-level analysis: {n} trajectories ({n_ok} correct, {n - n_ok} incorrect), "
            f"roles: {analysis.settings.get('roles')}",
            fontsize=10,
        )
    return fig


def save_token_analysis_figures(analysis, out_dir, prefix: str = "token_analysis") -> dict[str, list[Path]]:
    """Write the overview and each panel as `<out_dir>/<prefix>_<name>.png` and `.pdf`."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    makers = {
        "overview": plot_token_analysis,
        "role_fractions": plot_role_fractions,
        "s_distributions": plot_score_distributions,
        "ratio_distributions": plot_ratio_distributions,
        "switch_rate": plot_switch_rate,
        "auroc": plot_roc,
        "feature_auroc": plot_feature_auroc,
    }
    written = {}
    for name, make in makers.items():
        fig = make(analysis)
        written[name] = save_figure(fig, out_dir / f"{prefix}_{name}")
        plt.close(fig)
    return written


# -- other analyses' outputs ----------------------------------------------------------------------------


def plot_labeller_validation(table):
    """Macro F1 (95% CI) of each labeller against the ground truth, and F1 per role.

    `table`: `labeller_validation.csv` of `analyses/validate_labellers.py` (a path or a DataFrame), or any
    frame with its columns (`labeller`, `setting`, `neutral`, `role`, `f1`, `macro_f1`, `macro_f1_lo`,
    `macro_f1_hi`), e.g. `dyco_probe.report.labeller_table`.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(table) if isinstance(table, (str, Path)) else table
    settings = list(dict.fromkeys(zip(frame["labeller"], frame["setting"])))
    neutral_modes = [m for m in ("excluded", "included") if (frame["neutral"] == m).any()]
    with paper_style():
        fig, axes = plt.subplots(
            1,
            len(neutral_modes),
            figsize=(4.2 * len(neutral_modes), 0.42 * len(settings) + 1.3),
            squeeze=False,
            layout="constrained",
            sharey=True,
        )
        y = np.arange(len(settings))[::-1]
        for ax, mode in zip(axes[0], neutral_modes):
            part = frame[frame["neutral"] == mode]
            for yi, (name, setting) in zip(y, settings):
                rows = part[(part["labeller"] == name) & (part["setting"] == setting)]
                if rows.empty:
                    continue
                first = rows.iloc[0]
                m, lo, hi = first["macro_f1"], first.get("macro_f1_lo"), first.get("macro_f1_hi")
                err = None
                if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
                    err = [[max(m - lo, 0)], [max(hi - m, 0)]]
                ax.barh(yi, m, color="0.8", height=0.6)
                ax.errorbar([m], [yi], xerr=err, fmt="none", color="k", elinewidth=0.8)
                for role, marker in (("visual", "o"), ("text", "s"), ("neutral", "^")):
                    r = rows[rows["role"] == role]
                    if not r.empty and np.isfinite(r.iloc[0]["f1"]):
                        ax.scatter(
                            r.iloc[0]["f1"],
                            yi,
                            marker=marker,
                            color=ROLE_COLOURS[role],
                            s=16,
                            zorder=3,
                            label=f"F1 {role}",
                        )
            ax.set_yticks(y, [f"{n}\n{s}" if s else n for n, s in settings], fontsize=6.5)
            ax.set_xlim(0, 1)
            ax.set_xlabel("F1 against the ground truth")
            ax.set_title(f"macro F1 (bar, 95% CI), neutral tokens {mode}")
        shown = {}
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                shown.setdefault(label, handle)  # one entry per role, whichever panel has it
        if shown:
            axes[0][-1].legend(list(shown.values()), list(shown), loc="lower right")
    return fig


def plot_dependency_vs_delta(
    delta,
    score,
    truth,
    mask,
    *,
    tau: tuple[float, float] = (0.0, 0.05),
    thresholds: tuple[float, float] | None = None,
    max_points: int = 20000,
    seed: int = 0,
    ax=None,
):
    """Two notions of "visual", token by token: the Fisher–Rao rule's `Δ = v_vis − v_txt` (x) against
    the counterfactual visual dependency score (y, nats, symmetric-log scale), coloured by true role.

    Args:
        delta, score, truth, mask: `[B, T]` tensors or arrays (`truth`: `Role` codes). The first token
            (no Δ) and masked tokens are left out.
        tau: the rule's `(tau_vis, tau_txt)`: vertical lines at `tau_vis` and `−tau_txt`.
        thresholds: `(visual_above, text_below)` of the dependency roles: horizontal lines.
        max_points: at most this many tokens are drawn (a fixed random subset; every role keeps its
            share); the quadrant counts in the corners are over all tokens.
    """
    import torch

    from ..roles import ROLE_NAMES

    d, s, r, m = (torch.as_tensor(x) for x in (delta, score, truth, mask))
    keep = m.bool().clone()
    keep[:, :1] = False
    d, s, r = d[keep].double().numpy(), s[keep].double().numpy(), r[keep].long().numpy()
    fig, ax = _axes(ax, figsize=(4.2, 3.3))
    order = np.random.default_rng(seed).permutation(len(d))[:max_points]
    for code in (0, 2, 1):  # neutral under text under visual
        name = ROLE_NAMES[code]
        pick = order[r[order] == code]
        ax.scatter(
            d[pick],
            s[pick],
            s=3,
            alpha=0.35,
            color=ROLE_COLOURS[name],
            linewidths=0,
            label=f"true {name} ({int((r == code).sum())})",
        )
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.axvline(tau[0], color="k", linestyle="--", linewidth=0.7)
    ax.axvline(-tau[1], color="k", linestyle=":", linewidth=0.7)
    if thresholds is not None:
        ax.axhline(thresholds[0], color="k", linestyle="--", linewidth=0.7)
        ax.axhline(thresholds[1], color="k", linestyle=":", linewidth=0.7)
        hi = s > thresholds[0]
        for right, top, (x, y, ha, va) in (
            (True, True, (0.98, 0.98, "right", "top")),
            (False, True, (0.02, 0.98, "left", "top")),
            (True, False, (0.98, 0.02, "right", "bottom")),
            (False, False, (0.02, 0.02, "left", "bottom")),
        ):
            cell = ((d > tau[0]) == right) & (hi == top)
            ax.text(
                x,
                y,
                f"{int(cell.sum())} tokens, {int((cell & (r == 1)).sum())} true visual",
                transform=ax.transAxes,
                ha=ha,
                va=va,
                fontsize=6,
                color="0.25",
            )
    ax.set_xlabel("Fisher–Rao Δ = v_vis − v_txt (visual if > tau_vis, dashed)")
    ax.set_ylabel("visual dependency (nats; visual if > dashed)")
    ax.legend(loc="center right", fontsize=6, markerscale=3)
    return fig


def _layer_order(name) -> tuple:
    name = str(name)
    if name == "all":
        return (1, 0, name)
    head = name.split("-")[0].split(":")[0]
    return (0, int(head), name) if head.isdigit() else (0, 10**6, name)


_SOURCES = {"fisher_rao": "Fisher–Rao roles", "ground_truth": "ground-truth roles"}


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
        parts.append(_SOURCES.get(values["role_source"], f"{values['role_source']} roles"))
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
            windows = sorted(part["layers"].astype(str).unique(), key=_layer_order)
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

    `runs`: label -> `{"train": DataFrame, "eval": DataFrame}` (`dyco_probe.report.read_rl_run`). A third
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
