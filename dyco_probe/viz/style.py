"""One paper style for every dyco_probe figure, and saving figures as PNG and PDF together.

    from dyco_probe.viz import paper_style, save_figure

    with paper_style():
        fig, ax = plt.subplots()
        ...
    save_figure(fig, "figures/role_fractions")      # figures/role_fractions.png and .pdf

`use_paper_style()` applies the same settings globally (e.g. at the top of a notebook).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "GROUP_COLOURS",
    "PAPER_RC",
    "ROLE_COLOURS",
    "SIGNAL_COLOURS",
    "axes_or_new",
    "paper_style",
    "save_figure",
    "use_paper_style",
]

# Colours carry meaning and are the same in every figure, static or interactive.
ROLE_COLOURS = {"visual": "#d95f02", "text": "#1f78b4", "neutral": "#a6a6a6"}
GROUP_COLOURS = {"correct": "#1b9e77", "incorrect": "#c0392b", "all": "#555555"}
SIGNAL_COLOURS = {
    "r_vis": "#fdae6b",
    "r_txt": "#9ecae1",
    "v_vis": "#d95f02",
    "v_txt": "#1f78b4",
}

PAPER_RC = {
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "font.family": "DejaVu Sans",
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.7,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
    "errorbar.capsize": 2.5,
    "xtick.major.width": 0.7,
    "ytick.major.width": 0.7,
    "pdf.fonttype": 42,  # editable text in the PDFs
    "axes.prop_cycle": __import__("cycler").cycler(
        color=["#1f78b4", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#666666"]
    ),
}


def paper_style():
    """A context manager applying the paper style (`PAPER_RC`) to figures made inside it."""
    import matplotlib

    return matplotlib.rc_context(PAPER_RC)


def use_paper_style() -> None:
    """Apply the paper style globally (for a notebook or a script that draws many figures)."""
    import matplotlib

    matplotlib.rcParams.update(PAPER_RC)


def save_figure(fig, path, *, formats: tuple[str, ...] = ("png", "pdf"), close: bool = False) -> list[Path]:
    """Save `fig` as `path` with each suffix of `formats` (PNG and PDF by default); any suffix of
    `path` is replaced. Creates the folder. Returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with paper_style():
        for ext in formats:
            target = path.with_suffix(f".{ext}")
            fig.savefig(target)
            out.append(target)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out


def axes_or_new(ax, figsize=(3.3, 2.5)):
    """`(figure, ax)`: the given axes, or a new paper-style figure of one panel."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    with paper_style():
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax
