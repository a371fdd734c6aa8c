"""Figures (`dyco_probe.viz`): the paper style, token-analysis figures, the plotly timeline and image view."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_analysis import make_trace  # noqa: E402

from dyco_probe import viz  # noqa: E402
from dyco_probe.analysis import analyse_tokens  # noqa: E402
from dyco_probe.roles import ROLE_NAMES, Role  # noqa: E402
from dyco_probe.scoring import score_tokens  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def analysis():
    return analyse_tokens(make_trace(batch=12, seed=4), n_boot=100)


def with_image_rows(trace, n_image: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(trace.batch_size, trace.num_tokens, n_image, generator=g)
    trace.image_rows = rows * trace.r_vis[..., None] / rows.sum(-1, keepdim=True)
    trace.image_rows_mask = torch.ones(trace.batch_size, n_image, dtype=torch.bool)
    for s in trace.samples:
        s.update(num_images=1, num_image_tokens=n_image)
    return trace


def test_paper_style_is_scoped_and_save_figure_writes_png_and_pdf(tmp_path):
    before = matplotlib.rcParams["axes.spines.top"]
    with viz.paper_style():
        assert matplotlib.rcParams["axes.spines.top"] is False
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
    assert matplotlib.rcParams["axes.spines.top"] == before
    paths = viz.save_figure(fig, tmp_path / "sub" / "line.ignored")
    assert [p.name for p in paths] == ["line.png", "line.pdf"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


def test_token_analysis_figures(analysis, tmp_path):
    written = viz.save_token_analysis_figures(analysis, tmp_path, prefix="t")
    assert set(written) == {
        "overview",
        "role_fractions",
        "s_distributions",
        "ratio_distributions",
        "switch_rate",
        "auroc",
        "feature_auroc",
    }
    for paths in written.values():
        assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    fig = viz.plot_role_fractions(analysis)
    bars = [p for p in fig.axes[0].patches]
    frac = analysis.role_fractions
    expected = frac[(frac["group"] == "correct") & (frac["measure"] == "visual")]["mean"].iloc[0]
    assert bars[0].get_height() == pytest.approx(expected)  # first bar: correct, visual


def test_figures_survive_degenerate_analyses():
    """One class only, no text-role tokens: every panel still draws (with 'no data' where empty)."""
    trace = make_trace(batch=3, correct=[False] * 3)
    roles = torch.full(trace.token_ids.shape, int(Role.VISUAL))
    result = analyse_tokens(trace, roles=roles, n_boot=20)
    fig = viz.plot_token_analysis(result)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no data" in texts and any("correct and incorrect" in t for t in texts)
    viz.plot_feature_auroc(result)


def test_labeller_intervention_and_rl_figures():
    rows = []
    for name, setting in (("fisher_rao", "tau 0 / 0.05"), ("ratio_threshold", "theta 0.5")):
        for neutral in ("excluded", "included"):
            for role in ("visual", "text", "neutral")[: 2 if neutral == "excluded" else 3]:
                rows.append(
                    dict(
                        labeller=name,
                        setting=setting,
                        neutral=neutral,
                        role=role,
                        f1=0.6,
                        macro_f1=0.55,
                        macro_f1_lo=0.5,
                        macro_f1_hi=0.6,
                    )
                )
    fig = viz.plot_labeller_validation(pd.DataFrame(rows))
    assert len(fig.axes) == 2
    summary = pd.DataFrame(
        [
            dict(
                keys="image",
                role_source=src,
                layers=layers,
                target=t,
                mean=m,
                ci_low=m - 0.1,
                ci_high=m + 0.1,
            )
            for src in ("ground_truth", "fisher_rao")
            for layers, m in (("0", -0.1), ("1", -0.3), ("all", -0.5))
            for t in ("visual", "random:visual")
        ]
    )
    fig = viz.plot_intervention_effects(summary, "Δ accuracy")
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["L0", "L1", "all"]
    steps = np.arange(1, 11)
    run = {
        "train": pd.DataFrame({"step": steps, "reward": steps / 10, "s_mean": steps / 20}),
        "eval": pd.DataFrame(
            {
                "step": [0, 10],
                "accuracy": [0.2, 0.3],
                "accuracy_ci_low": [0.1, 0.2],
                "accuracy_ci_high": [0.3, 0.4],
            }
        ),
    }
    fig = viz.plot_rl_curves({"off": run, "token": run})
    assert len(fig.axes) == 3
    assert fig.axes[0].lines[0].get_ydata()[-1] == pytest.approx(30)


def test_token_timeline_shows_roles_signals_and_escaped_text():
    trace = make_trace(batch=3, seed=5)
    fig = viz.token_timeline(trace, 1)
    n = int(trace.mask[1].sum())
    scored = score_tokens(trace.r_vis, trace.r_txt, trace.v_vis, trace.v_txt, trace.mask)
    strip = fig.data[0]
    assert len(strip.x) == n
    expected = [viz.ROLE_COLOURS[ROLE_NAMES[int(r)]] for r in scored["roles"][1, :n]]
    assert list(strip.marker.color) == expected
    assert strip.text[0] == "&lt;answer&gt;"  # HTML-escaped token text
    by_name = {t.name: t for t in fig.data}
    np.testing.assert_allclose(by_name["r_vis (image)"].y, trace.r_vis[1, :n].numpy(), rtol=1e-6)
    np.testing.assert_allclose(by_name["v_txt (text dynamics)"].y, trace.v_txt[1, :n].numpy(), rtol=1e-6)
    assert "s_t" in strip.hovertemplate and "role" in strip.hovertemplate
    assert "incorrect" in fig.layout.title.text  # sample 1 is incorrect
    given = torch.full(trace.token_ids.shape, int(Role.TEXT))
    fig = viz.token_timeline(trace, 1, roles=given, max_tokens=3)
    assert list(fig.data[0].marker.color) == [viz.ROLE_COLOURS["text"]] * 3


def test_image_view_heatmap_slider_and_errors():
    from PIL import Image

    trace = with_image_rows(make_trace(batch=2, seed=6))
    image = Image.new("RGB", (112, 112), "white")
    fig = viz.image_view(trace, 0, image=image)
    heat = next(t for t in fig.data if t.type == "heatmap")
    n = int(trace.mask[0].sum())
    slider = fig.layout.sliders[0]
    assert len(slider.steps) == n
    z3 = np.asarray(slider.steps[3].args[0]["z"][0])
    row = trace.image_rows[0, 3].numpy()
    np.testing.assert_allclose(z3, (row / row.sum()).reshape(4, 4), rtol=1e-5)
    assert list(heat.x) == [14, 42, 70, 98]  # cell centres in pixels
    static = viz.image_view(trace, 0, token=2, image=image)
    assert not static.layout.sliders and any(t.type == "image" for t in static.data)
    alone = viz.image_view(trace, 1, token=0)  # no picture: the heat-map alone
    assert [t.type for t in alone.data] == ["heatmap"]
    with pytest.raises(ValueError, match="does not match"):
        viz.image_view(trace, 0, image=image, grid=(3, 3))
    with pytest.raises(IndexError):
        viz.image_view(trace, 0, token=99, image=image)
    trace.image_rows = None
    with pytest.raises(ValueError, match="image rows"):
        viz.image_view(trace, 0)


def test_infer_token_grid():
    assert viz.infer_token_grid(16) == (4, 4)
    assert viz.infer_token_grid(16, (112, 112)) == (4, 4)
    assert viz.infer_token_grid(8, (200, 100)) == (2, 4)  # (width, height): wide image, more columns
    assert viz.infer_token_grid(7) in ((1, 7), (7, 1))
    with pytest.raises(ValueError):
        viz.infer_token_grid(0)


def test_save_html_is_self_contained(tmp_path):
    fig = viz.token_timeline(make_trace(batch=1), 0)
    path = viz.save_html(fig, tmp_path / "t.html")
    text = path.read_text()
    assert "<script src=" not in text and "<link" not in text  # nothing loaded from elsewhere
    assert len(text) > 1_000_000  # plotly.js inlined
    fragment = viz.figure_html(fig)
    assert "plotly-graph-div" in fragment and len(fragment) < 200_000


def test_save_html_of_several_figures_inlines_plotly_once(tmp_path):
    trace = make_trace(batch=2)
    path = viz.save_html([viz.token_timeline(trace, 0), viz.token_timeline(trace, 1)], tmp_path / "two.html")
    text = path.read_text()
    assert text.count("* plotly.js v") == 1 and text.count("plotly-graph-div") == 2


def test_dependency_vs_delta_figure(tmp_path):
    from dyco_probe.viz import plot_dependency_vs_delta

    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (6, 10), generator=g)
    score = torch.where(truth == 1, 2.0, 1e-4) * torch.rand(6, 10, generator=g)
    delta = torch.randn(6, 10, generator=g) * 0.1
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[0, 5:] = False
    fig = plot_dependency_vs_delta(delta, score, truth, mask, thresholds=(0.1, 0.05))
    ax = fig.axes[0]
    counts = [t.get_text() for t in ax.texts]
    assert len(counts) == 4 and sum(int(c.split()[0]) for c in counts) == 6 * 9 - 5  # no t = 0, no padding
    assert ax.get_yscale() == "symlog" and len(ax.get_legend().get_texts()) == 3
    viz.save_figure(fig, tmp_path / "dep", close=True)
    assert (tmp_path / "dep.png").exists()
