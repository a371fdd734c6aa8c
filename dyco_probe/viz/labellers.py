"""Figures of the labeller validation (`dyco_probe.studies.labellers`, `analyses/validate_labellers.py`):
F1 of every labeller, the threshold sweep, Δ by true role with the attention peaks per layer, and the
counterfactual labeller's score against the Fisher–Rao rule's Δ. Each draws what it is given and
returns the figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..roles import PUBLISHED_TAU
from .style import ROLE_COLOURS, axes_or_new, paper_style

__all__ = [
    "plot_delta_by_role",
    "plot_dependency_vs_delta",
    "plot_labeller_validation",
    "plot_threshold_sweep",
]


def plot_labeller_validation(table):
    """Macro F1 (95% CI) of each labeller against the ground truth, and F1 per role.

    `table`: `labeller_validation.csv` of `analyses/validate_labellers.py` (a path or a DataFrame), or any
    frame with its columns (`labeller`, `setting`, `neutral`, `role`, `f1`, `macro_f1`, `macro_f1_lo`,
    `macro_f1_hi`), e.g. `dyco_probe.studies.labellers.labeller_table`.
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
    tau: tuple[float, float] = PUBLISHED_TAU,
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
    fig, ax = axes_or_new(ax, figsize=(4.2, 3.3))
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


def plot_threshold_sweep(sweep_rows, theta_rows, tau_vis_grid, tau_txt_grid, published=PUBLISHED_TAU):
    """Macro F1 of the role rule over the `(tau_vis, tau_txt)` grid, neutral tokens excluded and
    included (the published pair circled, the best one crossed), and of the ratio baseline over theta.

    `sweep_rows`: dicts with `tau_vis`, `tau_txt`, `macro_f1_excluded`, `macro_f1_included`;
    `theta_rows`: dicts with `theta` and the same two scores."""
    import matplotlib.pyplot as plt

    nv, nt = len(tau_vis_grid), len(tau_txt_grid)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, key, title in zip(
        axes[:2],
        ("macro_f1_excluded", "macro_f1_included"),
        ("macro F1, neutral tokens excluded", "macro F1, neutral tokens included"),
    ):
        grid = np.full((nv, nt), np.nan)
        for r in sweep_rows:
            grid[tau_vis_grid.index(r["tau_vis"]), tau_txt_grid.index(r["tau_txt"])] = r[key]
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(nt), [str(x) for x in tau_txt_grid], rotation=45)
        ax.set_yticks(range(nv), [str(x) for x in tau_vis_grid])
        ax.set_xlabel("tau_txt (text if Δ < −tau_txt)")
        ax.set_ylabel("tau_vis (visual if Δ > tau_vis)")
        ax.set_title(title)
        bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
        di, dj = tau_vis_grid.index(published[0]), tau_txt_grid.index(published[1])
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
    return fig


def plot_delta_by_role(delta_by_role: dict, peaks: dict, published=PUBLISHED_TAU):
    """Left: the distribution of Δ = v_vis − v_txt by true role (`delta_by_role`: role -> 1-D tensor),
    with the thresholds. Right: per probed layer (`peaks`: name -> `share`, `object_share`, `chance`,
    `object_chance`), how often the image attention of true visual tokens peaks on the named object."""
    import matplotlib.pyplot as plt
    import torch

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
    ax.axvline(published[0], color="k", linestyle="--", linewidth=0.8)
    ax.axvline(-published[1], color="k", linestyle=":", linewidth=0.8)
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
    return fig
