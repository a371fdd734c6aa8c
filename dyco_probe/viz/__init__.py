"""Figures of dyco_probe: one paper style, token-level analysis figures, interactive token views.

    from dyco_probe import viz

    viz.use_paper_style()                                    # the style, globally (notebooks)
    viz.plot_token_analysis(result)                          # result = dyco_probe.analysis.analyse_tokens(trace)
    viz.save_token_analysis_figures(result, "figures")       # PNG + PDF of each panel
    viz.token_timeline(trace, sample=0)                      # plotly: roles, r_vis/r_txt, v_vis/v_txt
    viz.image_view(trace, sample=0)                          # plotly: the image with a token's attention

- `style`: `paper_style()` (context), `use_paper_style()`, `save_figure(fig, path)` (PNG and PDF),
  the colours of roles, groups and signals;
- `figures`: matplotlib figures of the token-level analysis;
- `labellers`: the labeller validation's figures (F1 per labeller, threshold sweep, Δ by role,
  the counterfactual labeller against Δ);
- `experiments`: intervention effects, RL learning curves and the positive control's signals;
- `interactive`: plotly token timeline and image heat-map, `save_html` (offline, plotly inlined).

Names are imported lazily, so `import dyco_probe.viz` does not import matplotlib or plotly.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GROUP_COLOURS": "style",
    "PAPER_RC": "style",
    "ROLE_COLOURS": "style",
    "SIGNAL_COLOURS": "style",
    "paper_style": "style",
    "save_figure": "style",
    "use_paper_style": "style",
    "axes_or_new": "style",
    "condition_label": "experiments",
    "plot_delta_by_role": "labellers",
    "plot_dependency_vs_delta": "labellers",
    "plot_feature_auroc": "figures",
    "plot_headline_interventions": "experiments",
    "plot_intervention_effects": "experiments",
    "plot_labeller_validation": "labellers",
    "plot_positive_control_signals": "experiments",
    "plot_ratio_distributions": "figures",
    "plot_rl_comparison": "experiments",
    "plot_rl_curves": "experiments",
    "plot_roc": "figures",
    "plot_role_fractions": "figures",
    "plot_score_distributions": "figures",
    "plot_switch_rate": "figures",
    "plot_threshold_sweep": "labellers",
    "plot_token_analysis": "figures",
    "save_token_analysis_figures": "figures",
    "figure_html": "interactive",
    "image_token_layout": "interactive",
    "image_view": "interactive",
    "infer_token_grid": "interactive",
    "save_html": "interactive",
    "token_label": "interactive",
    "token_timeline": "interactive",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dyco_probe.viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
