"""Paper-style matplotlib figures of the token-level analysis (`dyco_probe.analysis.TokenAnalysis`).

Every function draws data it is given; none computes a statistic of its own beyond what it plots.
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

from .style import GROUP_COLOURS, ROLE_COLOURS, axes_or_new, paper_style, save_figure

__all__ = [
    "plot_feature_auroc",
    "plot_ratio_distributions",
    "plot_roc",
    "plot_role_fractions",
    "plot_score_distributions",
    "plot_switch_rate",
    "plot_token_analysis",
    "save_token_analysis_figures",
]

_GROUPS = ("correct", "incorrect")
_ROLE_ORDER = ("visual", "text", "neutral")


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
        fig, ax = axes_or_new(ax)
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
        fig, ax = axes_or_new(ax)
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
        fig, ax = axes_or_new(ax)
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
        fig, ax = axes_or_new(ax, figsize=(2.8, 2.6))
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
        fig, ax = axes_or_new(ax, figsize=(4.8, 2.6))  # room for the feature names and the whole title
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
