"""One self-contained HTML page of a run directory: `dyco-probe report --run runs/<name>`.

The page embeds its figures (PNG as base64), its interactive views (plotly.js inlined once, no CDN,
nothing fetched: it opens offline), its tables and the settings used. It renders what the run
directory holds (layout: `dyco_probe.rundir`) and says, for each missing part, which command makes it;
it computes nothing itself and writes nothing but the page. `build_report` first completes the run
directory with the parts derived from what the commands wrote (`dyco_probe.studies.run_summary`:
token analysis, roles against the ground truth, the sweeps' effects), then renders it.

    from dyco_probe.report import build_report
    path = build_report("runs/demo")                  # -> runs/demo/report.html
"""

from __future__ import annotations

import datetime
import html
import json
import math
import re
from pathlib import Path

from .files import check_writable, write_text_atomic
from .page import CSS, json_html, markdown_html, missing, note, png_figure_html, png_html, table_html
from .rundir import RunDirectory, read_rl_run

__all__ = ["build_report", "markdown_html", "render_report", "report_status"]


# -- pieces -------------------------------------------------------------------------------------------


def _files_html(folder: Path, seen: set) -> list[str]:
    """The markdown and PNG files directly in `folder` (other analyses' write-ups and figures)."""
    parts = []
    if not folder.is_dir():
        return parts
    for md in sorted(folder.glob("*.md")):
        parts.append(
            f'<div class="included"><div class="source">{html.escape(str(md.name))}</div>{markdown_html(md.read_text())}</div>'
        )
    for png in sorted(folder.glob("*.png")):
        if png in seen:
            continue
        parts.append(
            f"<figure>{png_html(png.read_bytes(), png.stem)}<figcaption>{html.escape(png.name)}</figcaption></figure>"
        )
    return parts


# -- sections -----------------------------------------------------------------------------------------


class _Page:
    def __init__(self):
        self.sections: list[tuple[str, str, str]] = []
        self.status: dict[str, bool] = {}

    def add(self, key: str, title: str, body: str, present: bool = True) -> None:
        self.sections.append((key, title, body))
        self.status[title] = present


def _load_examples(data):
    if data is None:
        return None
    from .data import read_jsonl

    return read_jsonl(data, skip_bad=True)


def _pick_timelines(trace, k: int) -> list[int]:
    """Up to k samples, alternating correct and incorrect ones, in order."""
    samples = trace.samples or [{} for _ in range(trace.batch_size)]
    good = [i for i, s in enumerate(samples) if s.get("correct")]
    bad = [i for i, s in enumerate(samples) if not s.get("correct")]
    picked = []
    while len(picked) < k and (good or bad):
        for pool in (good, bad):
            if pool and len(picked) < k:
                picked.append(pool.pop(0))
    return picked


def _trace_sections(page: _Page, run: RunDirectory, trace_path: Path, options: dict) -> dict:
    """Summary, token analysis, timelines and roles; returns what other sections may need."""
    from . import viz
    from .api import summarize
    from .tracing import Trace

    if not trace_path.exists():
        cmd = f"dyco-probe trace --model MODEL --image-rows --out {trace_path}"
        for key, title in (
            ("summary", "Trace summary"),
            ("tokens", "Token-level analysis"),
            ("timelines", "Token timelines"),
            ("roles", "Roles against the ground truth"),
        ):
            page.add(key, title, missing("a trace (per-token attention signals)", cmd), present=False)
        return {}
    trace = Trace.load(trace_path)
    summary = summarize(trace)
    meta = trace.metadata or {}
    rows = [
        ("trace", str(trace_path)),
        ("model", meta.get("model_source") or meta.get("model")),
        ("samples", summary["samples"]),
        ("completion tokens", f"{summary['tokens']} (mean {summary['mean_tokens']} per completion)"),
        ("accuracy", summary.get("accuracy", "–")),
        ("format rate", summary.get("format_rate", "–")),
        ("probed layers", ", ".join(map(str, trace.layers))),
        ("mean r_vis / r_txt", f"{summary['mean_r_vis']:.4f} / {summary['mean_r_txt']:.4f}"),
        (
            "mean v_vis / v_txt",
            f"{summary['mean_v_vis']:.4f} / {summary['mean_v_txt']:.4f} ({summary['distance']})",
        ),
        (
            "role fractions (docs/method.md#token-roles)",
            ", ".join(f"{k} {v:.3f}" for k, v in summary["role_fractions"].items()),
        ),
        ("mode / backend", f"{meta.get('mode')} / {meta.get('backend')}"),
    ]
    body = (
        "<table>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        + "</table>"
    )
    page.add("summary", "Trace summary", body)

    # token-level analysis (studies.run_summary wrote it)
    analysis = run.token_analysis.with_suffix(".md")
    if analysis.exists():
        body = note(
            "Correct vs incorrect trajectories. Roles: docs/method.md#token-roles on the trace's Fisher–Rao dynamics (published "
            "thresholds); <code>s_t</code>, normalised ratios and the sample score from the scorer. Figures "
            f"(PNG + PDF) in <code>{html.escape(str(run.figures))}</code>."
        )
        for name, alt in (
            ("overview", "token-level analysis"),
            ("feature_auroc", "AUROC of trajectory features"),
        ):
            png = run.figures / f"{run.token_analysis.name}_{name}.png"
            if png.exists():
                body += f"<figure>{png_html(png.read_bytes(), alt)}</figure>"
        body += markdown_html(analysis.read_text())
        page.add("tokens", "Token-level analysis", body)
    elif trace.samples and all("correct" in s for s in trace.samples):
        page.add(
            "tokens",
            "Token-level analysis",
            missing("the token-level analysis of this trace", f"dyco-probe report --run {run.root}"),
            present=False,
        )
    else:
        page.add(
            "tokens",
            "Token-level analysis",
            missing("per-sample correctness in the trace", "dyco-probe trace (it records correctness)"),
            present=False,
        )

    # interactive views
    examples = options.get("examples")
    parts = []
    picked = _pick_timelines(trace, options["timelines"])
    for i in picked:
        parts.append(f'<div class="plot">{viz.figure_html(viz.token_timeline(trace, i))}</div>')
    if picked and trace.image_rows is not None:
        try:
            counts, _ = viz.image_token_layout(trace, picked[0])
            parts.append(
                note(
                    "Attention of each token over the image (slider: the token; cells: image tokens)"
                    + (f", one view per image of the prompt's {len(counts)}." if len(counts) > 1 else ".")
                )
            )
            for k in range(len(counts)):
                fig = viz.image_view(trace, picked[0], examples=examples, image_index=k)
                parts.append(f'<div class="plot">{viz.figure_html(fig)}</div>')
        except (ValueError, IndexError) as e:
            parts.append(note(f"No image view: {html.escape(str(e))}"))
    elif picked:
        parts.append(
            missing("image heat-maps (the trace has no image rows)", "dyco-probe trace --image-rows ...")
        )
    page.add(
        "timelines",
        "Token timelines",
        note(
            "Each token coloured by its role; bars: attention mass on the image (r_vis) and on the text (r_txt); "
            "lines: Fisher–Rao speed of the within-modality attention (v_vis, v_txt). Hover for values."
        )
        + "".join(parts),
    )

    # roles against the ground truth (studies.run_summary wrote them, or says why not)
    if run.roles.exists():
        page.add("roles", "Roles against the ground truth", _roles_html(json.loads(run.roles.read_text())))
    else:
        why = options["notes"].get(
            "roles", f"no roles.json in the run directory (dyco-probe report --run {run.root} writes it)"
        )
        page.add("roles", "Roles against the ground truth", note(html.escape(why)), present=False)
    return {"trace": trace}


def _nan(x):
    return math.nan if x is None else float(x)


def _roles_html(agreement: dict) -> str:
    from . import viz
    from .studies.labellers import labeller_table

    table = labeller_table(agreement)
    rows = []
    for name, res in agreement["labellers"].items():
        for neutral in ("excluded", "included"):
            r = res[neutral]
            rows.append(
                {
                    "labeller": name,
                    "setting": res["setting"],
                    "neutral tokens": neutral,
                    **{f"{role} F1": _nan(v["f1"]) for role, v in r["roles"].items()},
                    "macro F1": _nan(r["macro_f1"]),
                    "accuracy": _nan(r["accuracy"]),
                    "tokens": r["tokens"],
                }
            )
    import pandas as pd

    body = note(
        f"{agreement['samples']} trajectories, {agreement['tokens']} tokens; ground truth: the synthetic task's "
        "word roles aligned to tokens. True role fractions: "
        + ", ".join(f"{k} {v:.3f}" for k, v in agreement["truth_fractions"].items())
        + "."
    )
    body += table_html(pd.DataFrame(rows))
    peak = agreement.get("attention_peak")
    if peak and peak.get("tokens"):
        body += note(
            f"Image attention of ground-truth visual tokens peaks on the named object's image token for "
            f"{peak['share']:.3f} of {peak['tokens']} tokens (chance {peak['chance']:.3f})."
        )
    if len(table):
        body += png_figure_html(viz.plot_labeller_validation(table), "labellers against the ground truth")
    return body


def _labeller_section(page: _Page, run: RunDirectory, seen: set) -> None:
    from . import viz

    csv = run.labellers / "labeller_validation.csv"
    if not run.labellers.is_dir():
        page.add(
            "labellers",
            "Labeller validation",
            missing(
                "the full labeller validation (every labeller and distance, per layer, threshold sweep)",
                f"python -m analyses.validate_labellers --out {run.labellers}",
            ),
            present=False,
        )
        return
    parts = []
    if csv.exists():
        parts.append(png_figure_html(viz.plot_labeller_validation(csv), "labeller validation"))
    parts += _files_html(run.labellers, seen)
    page.add(
        "labellers", "Labeller validation", "".join(parts) or note("(empty folder)"), present=bool(parts)
    )


def _intervention_section(page: _Page, run: RunDirectory, seen: set) -> None:
    import pandas as pd

    from . import viz

    sweeps = run.sweeps()
    extra = _files_html(run.interventions, seen)
    if not sweeps and not extra:
        page.add(
            "interventions",
            "Interventions",
            missing(
                "causal interventions",
                f"dyco-probe sweep analyses/sweeps/interventions_headline.toml --out {run.interventions}/headline",
            ),
            present=False,
        )
        return
    parts = list(extra)
    for sweep in sweeps:
        title = f"<h3>Sweep <code>{html.escape(sweep.name)}</code></h3>"
        if not (sweep / "results.parquet").exists():
            parts.append(title + missing("merged results", f"dyco-probe sweep FILE --out {sweep} --merge"))
            continue
        effects_path = RunDirectory.effects(sweep)
        if not effects_path.exists():
            parts.append(title + missing("its summary", f"dyco-probe report --run {run.root}"))
            continue
        effects = json.loads(effects_path.read_text())
        manifest = (
            json.loads((sweep / "manifest.json").read_text()) if (sweep / "manifest.json").exists() else {}
        )
        parts.append(
            title
            + note(
                f"{effects['items']} items, {effects['conditions']} conditions, {effects['rows']} rows "
                f"({effects['errors']} errors). Mean per-item effect with bootstrap 95% CI."
            )
        )
        for readout in effects["readouts"].values():
            label = readout["label"]
            parts.append(f"<h4>{html.escape(label)}</h4>")
            summary = pd.DataFrame(readout["effects"])
            if len(summary) and summary["mean"].notna().any():
                parts.append(png_figure_html(viz.plot_intervention_effects(summary, label), label))
                parts.append(f"<details><summary>table</summary>{table_html(summary)}</details>")
            parts.append(_undrawn_html(readout["not_drawn"]))
        if manifest:
            parts.append(f"<details><summary>manifest</summary>{json_html(manifest)}</details>")
    page.add("interventions", "Interventions", "".join(parts))


def _undrawn_html(reasons: dict[str, list[str]]) -> str:
    """A note listing every condition of a sweep that has no drawn effect, and why."""
    if not reasons:
        return ""
    items = "".join(
        f"<li>{html.escape(why)}:<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in names) + "</ul></li>"
        for why, names in reasons.items()
    )
    n = sum(len(v) for v in reasons.values())
    return note(f"Not drawn ({n} condition(s)):<ul>{items}</ul>")


def _rl_section(page: _Page, run: RunDirectory, seen: set) -> None:
    from . import viz
    from .studies.rl_comparison import runs_table

    dirs = run.rl_runs()
    extra = _files_html(run.rl, seen)
    if not dirs and not extra:
        page.add(
            "rl",
            "RL with and without DyCo",
            missing(
                "training runs",
                f"dyco-probe train --dyco off --out {run.rl}/off  (and --dyco token --out {run.rl}/token)",
            ),
            present=False,
        )
        return
    runs = {p.name: read_rl_run(p) for p in dirs}
    parts = []
    if runs:
        parts.append(
            note(
                "Runs of the minimal loop (<code>dyco_probe.rl</code>); greedy held-out accuracy with Wilson 95% intervals."
            )
        )
        parts.append(table_html(runs_table(runs)))
        parts.append(png_figure_html(viz.plot_rl_curves(runs), "RL curves"))
        for name, r in runs.items():
            parts.append(
                f"<details><summary>config of {html.escape(name)}</summary>{json_html(r['config'])}</details>"
            )
    parts += extra
    page.add("rl", "RL with and without DyCo", "".join(parts))


def _settings_section(page: _Page, run: RunDirectory, options: dict, trace) -> None:
    from . import __version__

    parts = []
    settings = run.settings()
    if settings:
        parts.append("<h3>run.json</h3>" + json_html(settings))
    if trace is not None:
        parts.append("<h3>Trace metadata</h3>" + json_html(trace.metadata))
    shown = {k: v for k, v in options.items() if k not in ("examples", "notes")}
    parts.append("<h3>Report</h3>" + json_html({"dyco_probe": __version__, **shown}))
    files = sorted(
        str(p.relative_to(run.root)) for p in run.root.rglob("*") if p.is_file() and "parts" not in p.parts
    )
    if len(files) > 200:
        files = files[:200] + [f"... and {len(files) - 200} more"]
    parts.append(
        "<details><summary>files in the run directory</summary><pre>"
        + html.escape("\n".join(files))
        + "</pre></details>"
    )
    page.add("settings", "Settings and files", "".join(parts))


# -- the page -----------------------------------------------------------------------------------------


def build_report(
    run,
    *,
    out=None,
    trace=None,
    data=None,
    model: str | None = None,
    timelines: int = 4,
    n_boot: int = 1000,
    title: str | None = None,
) -> Path:
    """Complete the run directory (`dyco_probe.studies.run_summary.summarise_run`), then write its
    HTML report (`render_report`) and return the report's path.

    Args:
        run: the run directory (layout: `dyco_probe.rundir`).
        out: the HTML file (default `<run>/report.html`).
        trace: a trace parquet to use instead of `<run>/trace.parquet`.
        data: the VLM-R1 jsonl the trace was made from, for its images (synthetic traces re-render theirs).
        model: where the tokenizer comes from for ground-truth roles (default: the trace's model).
        timelines: interactive token timelines to include (alternating correct / incorrect samples).
        n_boot: bootstrap resamples of every confidence interval.
        title: page title (default: the run's name).
    """
    from .studies.run_summary import summarise_run

    run, out = _check_request(run, out, trace, data)
    notes = summarise_run(run.root, trace=trace, model=model, n_boot=n_boot)
    return render_report(
        run.root,
        out=out,
        trace=trace,
        data=data,
        timelines=timelines,
        title=title,
        notes=notes,
        n_boot=n_boot,
    )


def _check_request(run, out, trace, data) -> tuple[RunDirectory, Path]:
    run = RunDirectory(run)
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root} is not a directory (a run directory: see dyco_probe.rundir)")
    # inputs named explicitly must exist; parts merely absent from the run directory are listed as missing
    if trace is not None and not Path(trace).is_file():
        raise FileNotFoundError(f"the trace {trace} does not exist (given as trace / --trace)")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"the data file {data} does not exist (given as data / --data)")
    return run, check_writable(Path(out) if out else run.report)


def render_report(
    run,
    *,
    out=None,
    trace=None,
    data=None,
    timelines: int = 4,
    title: str | None = None,
    notes: dict[str, str] | None = None,
    **shown,
) -> Path:
    """Write the HTML page of what the run directory holds and return its path (arguments as for
    `build_report`; `notes`: why a section's part could not be made; `shown`: other settings to list)."""
    import plotly.offline

    run, out = _check_request(run, out, trace, data)
    options = {
        "run": str(run.root),
        "trace": str(trace or run.trace),
        "data": None if data is None else str(data),
        **shown,
        "timelines": timelines,
        "examples": _load_examples(data),
        "notes": notes or {},
    }
    page, seen = _Page(), set()
    found = _trace_sections(page, run, Path(options["trace"]), options)
    _labeller_section(page, run, seen)
    _intervention_section(page, run, seen)
    _rl_section(page, run, seen)
    _settings_section(page, run, options, found.get("trace"))

    name = title or f"dyco_probe report: {run.root.name}"
    created = datetime.datetime.now().isoformat(timespec="seconds")
    status = "".join(
        f'<li class="{"ok" if ok else "no"}">{"✓" if ok else "–"} {html.escape(t)}</li>'
        for t, ok in page.status.items()
    )
    nav = "".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in page.sections)
    body = "".join(f'<section id="{k}"><h2>{html.escape(t)}</h2>{b}</section>' for k, t, b in page.sections)
    document = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(name)}</title><style>{CSS}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<header><h1>{html.escape(name)}</h1><p>{html.escape(str(run.root))} · written {created} · "
        "self-contained: opens offline</p></header>"
        f"<nav>{nav}</nav><main><section id='contents'><h2>In this run</h2><ul>{status}</ul></section>{body}</main>"
        "</body></html>"
    )
    write_text_atomic(out, document)
    return out


def report_status(path) -> dict:
    """Which sections a written report has (`{title: present}`), read back from its contents list."""
    text = Path(path).read_text(encoding="utf-8")
    items = re.findall(r'<li class="(ok|no)">[^ ]+ ([^<]+)</li>', text)
    return {html.unescape(t): c == "ok" for c, t in items}
