"""Interactive plotly views of one trajectory: the token timeline and the image heat-map.

    from dyco_probe.viz import token_timeline, image_view, save_html

    fig = token_timeline(trace, sample=0)             # roles, r_vis / r_txt bars, v_vis / v_txt lines
    fig = image_view(trace, sample=0)                 # the image with each token's attention (slider)
    fig.show()                                        # in a notebook
    save_html(fig, "figures/timeline.html")           # one file, plotly inlined: opens offline

Both read a `Trace` (the image view needs `TraceConfig(image_rows=True)`); roles and `s_t` come from
the scorer, or from roles given by any labeller.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from ..roles import ROLE_NAMES
from .style import ROLE_COLOURS, SIGNAL_COLOURS

__all__ = [
    "figure_html",
    "image_token_layout",
    "image_view",
    "infer_token_grid",
    "save_html",
    "token_label",
    "token_timeline",
]

_FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)


def token_label(text: str | None, token_id: int | None = None, max_chars: int | None = None) -> str:
    """A token as shown in a figure: whitespace made visible, cut to `max_chars` (with "…"), then
    HTML escaped (`<answer>` stays text; an escape is never cut in half)."""
    if text is None:
        text = f"#{token_id}" if token_id is not None else "?"
    shown = text.replace("\n", "⏎").replace("\t", "⇥")
    if not shown.strip():
        shown = "␣" * max(len(shown), 1)
    if max_chars is not None and len(shown) > max_chars:
        shown = shown[: max(max_chars - 1, 1)] + "…"
    return html.escape(shown)


def _scored_sample(trace, sample: int, roles, config):
    from ..scoring import ScorerConfig, score_tokens

    one = trace.select([sample])
    r = None if roles is None else roles[sample : sample + 1]
    config = config or ScorerConfig()
    return one, score_tokens(one.r_vis, one.r_txt, one.v_vis, one.v_txt, one.mask, config, roles=r)


def _title(trace, sample: int, extra: str = "", max_chars: int = 70) -> str:
    """Sample id, correctness, predicted and gold answer (long values cut), HTML escaped."""
    meta = (trace.samples or [{}] * trace.batch_size)[sample]

    def cut(value) -> str:
        text = str(value)
        return text if len(text) <= 24 else text[:23] + "…"

    parts = [f"sample {cut(meta.get('sample_id', sample))}"]
    if "correct" in meta:
        parts.append("correct" if meta["correct"] else "incorrect")
    if meta.get("prediction") is not None:
        parts.append(f"answer {cut(meta['prediction'])}")
    elif "prediction" in meta:
        parts.append("no answer given")
    if meta.get("answer") is not None:
        parts.append(f"gold {cut(meta['answer'])}")
    text = " · ".join(parts)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return html.escape(text) + extra


def token_timeline(
    trace,
    sample: int = 0,
    *,
    roles=None,
    config=None,
    title: str | None = None,
    max_tokens: int | None = None,
):
    """The token timeline of one trajectory.

    Top: each token as a cell coloured by its role. Middle: `r_vis` and `r_txt` bars (attention mass
    on the image and on the text span). Bottom: `v_vis` and `v_txt` lines (Fisher–Rao speed of the
    within-modality attention, docs/method.md#modality-dynamics), whose difference decides the role. Hovering a token shows
    its text and every value, `s_t` included.

    Args:
        trace: a `Trace`.
        sample: row of the trace.
        roles: `[B, T]` roles from any labeller (default: docs/method.md#token-roles on the trace's dynamics).
        config: `ScorerConfig` (thresholds).
        title: figure title (default: sample id, correctness and answer).
        max_tokens: show only the first so many tokens.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    one, scored = _scored_sample(trace, sample, roles, config)
    n = int(one.mask[0].sum())
    if max_tokens:
        n = min(n, int(max_tokens))
    if n == 0:
        raise ValueError(f"sample {sample} has no completion tokens")
    x = np.arange(n)
    texts = one.token_text[0][:n] if one.token_text is not None else [None] * n
    labels = [token_label(t, int(i)) for t, i in zip(texts, one.token_ids[0, :n].tolist())]
    role_names = [ROLE_NAMES[int(r)] for r in scored["roles"][0, :n]]
    values = {k: getattr(one, k)[0, :n].float().numpy() for k in ("r_vis", "r_txt", "v_vis", "v_txt")}
    values["r_vis_n"] = scored["r_vis_n"][0, :n].numpy()
    values["s"] = scored["s"][0, :n].numpy()
    custom = np.stack(
        [
            np.asarray(labels, dtype=object),
            np.asarray(role_names, dtype=object),
            *(
                np.round(values[k].astype(float), 4).astype(object)
                for k in ("r_vis", "r_txt", "r_vis_n", "v_vis", "v_txt", "s")
            ),
        ],
        axis=-1,
    )
    hover = (
        "t=%{x} <b>%{customdata[0]}</b><br>role: %{customdata[1]}<br>"
        "r_vis %{customdata[2]} · r_txt %{customdata[3]} · r̃_vis %{customdata[4]}<br>"
        "v_vis %{customdata[5]} · v_txt %{customdata[6]}<br>s_t %{customdata[7]}<extra></extra>"
    )
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04, row_heights=[0.18, 0.41, 0.41]
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=np.ones(n),
            marker_color=[ROLE_COLOURS[r] for r in role_names],
            text=labels,
            textposition="inside",
            insidetextanchor="middle",
            textangle=-90,
            textfont=dict(size=10, color="white"),
            customdata=custom,
            hovertemplate=hover,
            showlegend=False,
            name="role",
        ),
        row=1,
        col=1,
    )
    for role in ("visual", "text", "neutral"):  # legend entries for the role colours
        fig.add_trace(
            go.Bar(
                x=[None], y=[None], marker_color=ROLE_COLOURS[role], name=f"{role} token", legendgroup="roles"
            ),
            row=1,
            col=1,
        )
    for key, label in (("r_vis", "r_vis (image)"), ("r_txt", "r_txt (text)")):
        fig.add_trace(
            go.Bar(
                x=x,
                y=values[key],
                name=label,
                marker_color=SIGNAL_COLOURS[key],
                customdata=custom,
                hovertemplate=hover,
            ),
            row=2,
            col=1,
        )
    for key, label in (("v_vis", "v_vis (image dynamics)"), ("v_txt", "v_txt (text dynamics)")):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=values[key],
                name=label,
                mode="lines+markers",
                marker=dict(size=4),
                line=dict(color=SIGNAL_COLOURS[key], width=1.6),
                customdata=custom,
                hovertemplate=hover,
            ),
            row=3,
            col=1,
        )
    visible = min(n, 80)
    fig.update_layout(
        title=dict(text=title if title is not None else _title(trace, sample), x=0.01),
        barmode="group",
        bargap=0.08,
        height=560,
        margin=dict(l=60, r=20, t=60, b=90),
        font=_FONT,
        hovermode="closest",
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="right", x=1),
        plot_bgcolor="white",
    )
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_yaxes(title_text="attention mass", gridcolor="#eee", row=2, col=1)
    fig.update_yaxes(title_text="Fisher–Rao speed", gridcolor="#eee", row=3, col=1)
    fig.update_xaxes(range=[-0.5, visible - 0.5])
    fig.update_xaxes(
        tickmode="array", tickvals=x, ticktext=labels, tickangle=-60, tickfont=dict(size=9), row=3, col=1
    )
    return fig


def infer_token_grid(num_tokens: int, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """`(rows, cols)` of an image's merged tokens: the factorisation of `num_tokens` whose aspect is
    closest to the image's (`(width, height)`, square when unknown). Qwen-VL: `image_grid_thw`'s
    `h / merge, w / merge` give it exactly; pass `grid=` to `image_view` then."""
    if num_tokens <= 0:
        raise ValueError("no image tokens")
    aspect = 1.0 if image_size is None else image_size[0] / max(image_size[1], 1)
    best = None
    for rows in range(1, num_tokens + 1):
        if num_tokens % rows:
            continue
        cols = num_tokens // rows
        score = abs(math.log(cols / rows) - math.log(aspect))
        if best is None or score < best[0]:
            best = (score, rows, cols)
    return best[1], best[2]


def _image_of(trace, sample: int, image, examples, image_index: int):
    """The sample's image: given, from its example, or re-rendered from the synthetic record."""
    if image is not None:
        return image
    meta = (trace.samples or [{}] * trace.batch_size)[sample]
    if examples is not None:
        key = str(meta.get("example_id", meta.get("sample_id")))
        for ex in examples:
            if str(ex.id) == key:
                images = ex.load_images()
                return images[image_index] if image_index < len(images) else None
        return None
    if meta.get("synthetic"):
        from ..labellers import problems_for

        return problems_for(trace.select([sample]))[0].render()
    return None


def image_view(
    trace,
    sample: int = 0,
    token: int | None = None,
    *,
    image=None,
    examples=None,
    grid: tuple[int, int] | None = None,
    image_index: int = 0,
    roles=None,
    config=None,
    opacity: float = 0.55,
):
    """The image with a token's attention over the image tokens as a heat-map.

    Cells are the merged image tokens (the vision tower's output grid); their values are the token's
    attention on each image token as a share of its attention on the whole image (`p_vis`, docs/method.md#attention-signals).
    With `token=None` a slider steps through every token of the completion (starting at the first
    visual-role one); with `token=t` the view is of that token alone.

    Args:
        trace: a `Trace` recorded with `TraceConfig(image_rows=True)`.
        sample: row of the trace.
        token: 0-based completion token, or None for the slider.
        image: the picture (PIL image or array); default: from `examples` by example id, or re-rendered
            from the synthetic task's record; without any, the heat-map is drawn alone.
        examples: `Example`s to take the image from.
        grid: `(rows, cols)` of the image's merged tokens (default: `infer_token_grid`; Qwen-VL's
            processor gives it exactly as `image_grid_thw[1:] // merge_size`). The cells are laid over
            the whole picture: for processors that crop (LLaVA's centre crop), pass the cropped image.
        image_index: which image of a multi-image prompt. Each image's tokens and grid come from
            the trace (`image_token_counts`, `image_grids` of the sample's metadata); traces
            written before those were recorded split the tokens evenly.
        roles, config: roles of the tokens (labeller output) and scorer settings, for the labels.
        opacity: heat-map opacity over the image.
    """
    import plotly.graph_objects as go

    if trace.image_rows is None:
        raise ValueError(
            "this trace has no image rows: trace with TraceConfig(image_rows=True) (--image-rows)"
        )
    one, scored = _scored_sample(trace, sample, roles, config)
    n_tok = int(one.mask[0].sum())
    rows_all = one.image_rows[0, :n_tok][:, one.image_rows_mask[0]].float().numpy()
    counts, grids = image_token_layout(trace, sample)
    if not 0 <= image_index < len(counts):
        raise IndexError(f"sample {sample} has {len(counts)} image(s); no image_index {image_index}")
    start = sum(counts[:image_index])
    rows_img = rows_all[:, start : start + counts[image_index]]
    picture = _image_of(trace, sample, image, examples, image_index)
    arr = (
        None
        if picture is None
        else np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture)
    )
    size = None if arr is None else (arr.shape[1], arr.shape[0])
    g_rows, g_cols = grid or grids[image_index] or infer_token_grid(rows_img.shape[1], size)
    if g_rows * g_cols != rows_img.shape[1]:
        raise ValueError(f"grid {g_rows}x{g_cols} does not match the {rows_img.shape[1]} image tokens")
    width, height = size or (g_cols, g_rows)
    share = rows_img / np.clip(rows_img.sum(-1, keepdims=True), 1e-12, None)
    zmax = float(share.max()) if share.size else 1.0
    xs = (np.arange(g_cols) + 0.5) * width / g_cols
    ys = (np.arange(g_rows) + 0.5) * height / g_rows
    texts = one.token_text[0][:n_tok] if one.token_text is not None else [None] * n_tok
    short = [token_label(t, int(i), max_chars=12) for t, i in zip(texts, one.token_ids[0, :n_tok].tolist())]
    role_names = [ROLE_NAMES[int(r)] for r in scored["roles"][0, :n_tok]]
    r_vis = one.r_vis[0, :n_tok].float().numpy()

    which = f"image {image_index + 1} of {len(counts)}: " if len(counts) > 1 else ""

    def caption(t: int) -> str:
        return (
            f"{which}token {t} <b>{short[t]}</b> ({role_names[t]}): r_vis {r_vis[t]:.3f}, "
            f"peak on image token {int(share[t].argmax())}"
        )

    if token is not None and not 0 <= token < n_tok:
        raise IndexError(f"token {token} out of range for a completion of {n_tok} tokens")
    visual = [t for t, r in enumerate(role_names) if r == "visual"]
    first = token if token is not None else (visual[0] if visual else 0)
    raw = rows_img.reshape(n_tok, g_rows, g_cols)

    fig = go.Figure()
    if arr is not None:
        fig.add_trace(go.Image(z=arr, hoverinfo="skip", name="image"))
    fig.add_trace(
        go.Heatmap(
            x=xs,
            y=ys,
            z=share[first].reshape(g_rows, g_cols),
            customdata=raw[first],
            zmin=0,
            zmax=zmax,
            colorscale="Inferno",
            opacity=opacity if arr is not None else 1.0,
            colorbar=dict(title=dict(text="share of<br>image attention"), thickness=12),
            hovertemplate="image token (%{y:.0f}, %{x:.0f})<br>share %{z:.3f}<br>attention %{customdata:.4f}<extra></extra>",
            name="attention",
        )
    )
    heat = len(fig.data) - 1
    layout = dict(
        title=dict(text=_title(trace, sample) + "<br><sub>" + caption(first) + "</sub>", x=0.01),
        height=560,
        width=560,
        margin=dict(l=20, r=20, t=80, b=40),
        font=_FONT,
        xaxis=dict(visible=False, range=[0, width], constrain="domain"),
        yaxis=dict(visible=False, range=[height, 0], scaleanchor="x"),
        plot_bgcolor="white",
    )
    if token is None:
        steps = [
            dict(
                method="update",
                label=f"{t}:{short[t]}",
                args=[
                    {"z": [share[t].reshape(g_rows, g_cols)], "customdata": [raw[t]]},
                    {"title.text": _title(trace, sample) + "<br><sub>" + caption(t) + "</sub>"},
                    [heat],
                ],
            )
            for t in range(n_tok)
        ]
        layout["sliders"] = [
            dict(active=first, steps=steps, currentvalue=dict(prefix="token "), pad=dict(t=10), len=1.0)
        ]
        layout["height"] = 640
    fig.update_layout(**layout)
    return fig


def image_token_layout(trace, sample: int) -> tuple[list[int], list]:
    """Each image's number of tokens and `(rows, cols)` grid (None where unknown) for one sample of
    a trace with image rows, from its metadata; older traces without it get the tokens split
    evenly over `num_images`."""
    meta = (trace.samples or [{}] * trace.batch_size)[sample]
    total = int(trace.image_rows_mask[sample].sum())
    counts = [int(n) for n in meta.get("image_token_counts") or []]
    if counts and sum(counts) == total:
        grids = list(meta.get("image_grids") or [None] * len(counts))
        return counts, [None if g is None else (int(g[0]), int(g[1])) for g in grids]
    n_images = max(int(meta.get("num_images") or 1), 1)
    if total % n_images:
        raise ValueError(f"sample {sample}: {total} image tokens do not split evenly over {n_images} images")
    return [total // n_images] * n_images, [None] * n_images


def figure_html(fig, *, include_plotlyjs: bool = False, height: str | None = None) -> str:
    """A plotly figure as an HTML fragment. With `include_plotlyjs=True` the whole plotly.js library is
    inlined (self-contained, offline); otherwise the page must load it once itself (as the report does)."""
    return fig.to_html(
        full_html=False,
        include_plotlyjs=bool(include_plotlyjs),
        config={"displaylogo": False, "responsive": True},
        default_height=height or f"{fig.layout.height or 500}px",
    )


def save_html(fig, path, *, title: str = "dyco_probe") -> Path:
    """Write a self-contained HTML page (plotly.js inlined once, no network needed to open it) of one
    figure or a list of figures, one below the other."""
    import plotly.offline

    figs = list(fig) if isinstance(fig, (list, tuple)) else [fig]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"<div>{figure_html(f)}</div>" for f in figs)
    path.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
        f"<body style='font-family:sans-serif'>{body}</body></html>",
        encoding="utf-8",
    )
    return path
