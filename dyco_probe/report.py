"""One self-contained HTML page of a run directory: `dyco-probe report --run runs/<name>`.

The page embeds its figures (PNG as base64), its interactive views (plotly.js inlined once, no CDN,
nothing fetched: it opens offline), its tables and the settings used. It shows whatever the run
directory holds and says, for each missing part, which command makes it.

Run directory layout (every part optional; the commands named write them when pointed inside)::

    runs/<name>/
      run.json                     what made the run: settings and stage timings (python -m dyco_probe.demo)
      trace.parquet                dyco-probe trace --image-rows --out runs/<name>/trace.parquet
      roles.json                   labellers against the synthetic ground truth (written by the demo, or
                                   by the report itself from trace.parquet when it can)
      labellers/                   python -m analyses.validate_labellers --out runs/<name>/labellers
                                   (labeller_validation.{md,csv}, threshold sweep, figures)
      interventions/<sweep>/       dyco-probe sweep FILE.toml --out runs/<name>/interventions/<sweep>
                                   (results.parquet, manifest.json, parts/)
      interventions/*.{md,png}     python -m analyses.interventions_headline --runs runs/<name>/interventions
                                   --figures runs/<name>/interventions
      rl/<label>/                  dyco-probe train --out runs/<name>/rl/<label>
                                   (config.json, metrics.jsonl, eval.csv, checkpoint.pt, model/)
      figures/                     written by the report: token-analysis figures (PNG + PDF)
      report.html                  this page

    from dyco_probe.report import build_report
    path = build_report("runs/demo")                  # -> runs/demo/report.html
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .files import check_writable, write_text_atomic

__all__ = [
    "RunDirectory",
    "build_report",
    "labeller_table",
    "markdown_html",
    "read_rl_run",
    "report_status",
    "role_agreement",
]


# -- the run directory --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDirectory:
    """Paths of a run directory (see the module docstring for what writes each)."""

    root: Path

    def __init__(self, root):
        object.__setattr__(self, "root", Path(root))

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def trace(self) -> Path:
        return self.root / "trace.parquet"

    @property
    def roles(self) -> Path:
        return self.root / "roles.json"

    @property
    def labellers(self) -> Path:
        return self.root / "labellers"

    @property
    def interventions(self) -> Path:
        return self.root / "interventions"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def sweeps(self) -> list[Path]:
        """Sweep directories under `interventions/` (those with a manifest or merged results)."""
        if not self.interventions.is_dir():
            return []
        return sorted(
            p
            for p in self.interventions.iterdir()
            if p.is_dir() and ((p / "results.parquet").exists() or (p / "manifest.json").exists())
        )

    def rl_runs(self) -> list[Path]:
        """Training run directories under `rl/` (those with `metrics.jsonl`)."""
        if not self.rl.is_dir():
            return []
        return sorted(p for p in self.rl.iterdir() if (p / "metrics.jsonl").exists())

    def settings(self) -> dict:
        """`run.json`, or `{}`."""
        return json.loads(self.run_json.read_text()) if self.run_json.exists() else {}


def read_rl_run(path) -> dict:
    """A training run directory (`dyco-probe train --out`) as `{"config", "train", "eval", "steps_done"}`,
    `train` and `eval` as DataFrames of `metrics.jsonl` (skipped steps dropped)."""
    import pandas as pd

    path = Path(path)
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    train = pd.DataFrame([r for r in records if r.get("kind") == "train" and not r.get("skipped")])
    evals = pd.DataFrame([r for r in records if r.get("kind") == "eval"])
    if len(train):
        train = train.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    if len(evals):
        evals = evals.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    steps = int(train["step"].max()) if len(train) else 0
    return {"config": config, "train": train, "eval": evals, "steps_done": steps}


# -- roles against the synthetic ground truth ---------------------------------------------------------


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def role_agreement(trace, tokenizer, *, examples=None, theta: float = 0.5) -> dict:
    """The token-role rule (docs/method.md#token-roles) (Fisher–Rao, published thresholds) and the ratio baseline against the synthetic
    task's ground-truth roles, neutral tokens excluded and included (`labellers.compare_roles`), and,
    for traces with image rows, where ground-truth visual tokens' image attention peaks
    (`labellers.attention_peak_share`). JSON-ready (NaN -> None)."""
    from .labellers import (
        attention_peak_share,
        compare_roles,
        get_labeller,
        ground_truth_alignments,
        relevant_image_tokens,
    )
    from .roles import ROLE_NAMES

    aligned = ground_truth_alignments(trace, examples, tokenizer=tokenizer)
    truth = get_labeller("ground_truth")(trace, examples=examples, tokenizer=tokenizer)
    mask = trace.mask.bool()
    labellers = {
        "fisher_rao": ("tau 0 / 0.05 (published)", get_labeller("fisher_rao")(trace)),
        "ratio_threshold": (f"theta {theta}", get_labeller("ratio_threshold")(trace, theta=theta)),
    }
    out = {
        "against": "ground_truth",
        "samples": trace.batch_size,
        "tokens": int(mask.sum()),
        "truth_fractions": {n: float((truth[mask] == i).float().mean()) for i, n in enumerate(ROLE_NAMES)},
        "labellers": {},
    }
    for name, (setting, pred) in labellers.items():
        out["labellers"][name] = {
            "setting": setting,
            "fractions": {n: float((pred[mask] == i).float().mean()) for i, n in enumerate(ROLE_NAMES)},
            **{n: compare_roles(pred, truth, trace.mask, neutral=n) for n in ("excluded", "included")},
        }
    if trace.image_rows is not None:
        out["attention_peak"] = attention_peak_share(trace, relevant_image_tokens(trace, aligned), truth)
    return _finite(out)


def labeller_table(agreement: dict):
    """`role_agreement`'s result as a long table with the columns of `labeller_validation.csv`
    (`analyses/validate_labellers.py`), so `viz.plot_labeller_validation` draws both."""
    import pandas as pd

    rows = []
    for name, res in agreement.get("labellers", {}).items():
        for neutral in ("excluded", "included"):
            scores = res[neutral]
            for role, v in scores["roles"].items():
                rows.append(
                    {
                        "labeller": name,
                        "setting": res.get("setting", ""),
                        "neutral": neutral,
                        "role": role,
                        **{k: _nan(v.get(k)) for k in ("precision", "recall", "f1")},
                        "support": v.get("support"),
                        "predicted": v.get("predicted"),
                        "macro_f1": _nan(scores.get("macro_f1")),
                        "macro_f1_lo": math.nan,
                        "macro_f1_hi": math.nan,
                        "accuracy": _nan(scores.get("accuracy")),
                        "tokens": scores.get("tokens"),
                    }
                )
    return pd.DataFrame(rows)


def _nan(x):
    return math.nan if x is None else float(x)


# -- HTML pieces --------------------------------------------------------------------------------------


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return text


def markdown_html(text: str) -> str:
    """The markdown the analyses write (headings, pipe tables, bullet lists, paragraphs, `code`,
    **bold**) as HTML; everything else is escaped text."""
    out, para, items = [], [], []
    lines = text.splitlines()

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-{2,}:?", c or "--") for c in r)]
            if body:
                head, rest = body[0], body[1:]
                out.append(
                    "<table><thead><tr>"
                    + "".join(f"<th>{_inline(c)}</th>" for c in head)
                    + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                    + "</tbody></table>"
                )
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            level = min(len(m.group(1)) + 2, 6)  # nested under the report's own headings
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif re.match(r"^\s*[-*]\s+", line):
            if para:
                flush()
            items.append(re.sub(r"^\s*[-*]\s+", "", line))
        elif not line.strip():
            flush()
        elif items and line.startswith("  "):
            items[-1] += " " + line.strip()
        else:
            if items:
                flush()
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def _png_bytes_html(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _figure_html(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    plt.close(fig)
    return f"<figure>{_png_bytes_html(buffer.getvalue(), alt)}</figure>"


def _table_html(frame, digits: int = 3) -> str:
    def fmt(x):
        if isinstance(x, float):
            return "–" if not math.isfinite(x) else f"{x:.{digits}f}"
        return x

    return frame.map(fmt).to_html(index=False, escape=True, border=0, classes="data", na_rep="–")


def _json_html(value) -> str:
    return "<pre>" + html.escape(json.dumps(value, indent=2, default=str)) + "</pre>"


def _missing(what: str, command: str) -> str:
    return f'<div class="missing"><b>Not in this run:</b> {html.escape(what)}. Make it with <code>{html.escape(command)}</code>.</div>'


def _note(text: str) -> str:
    return f'<div class="note">{text}</div>'


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
            f"<figure>{_png_bytes_html(png.read_bytes(), png.stem)}<figcaption>{html.escape(png.name)}</figcaption></figure>"
        )
    return parts


_CSS = """
body{font-family:-apple-system,'Segoe UI',DejaVu Sans,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24292f;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cdd}nav{padding:8px 32px;background:#eef1f4;position:sticky;top:0;z-index:10}
nav a{margin-right:16px;color:#0b5394;text-decoration:none;font-size:14px}
main{padding:8px 32px 48px;max-width:1250px}section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 22px;margin:18px 0}
h2{border-bottom:1px solid #eee;padding-bottom:4px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f3f5f7}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#666}
pre{background:#f6f8fa;padding:8px;font-size:12px;overflow:auto;max-height:420px}
code{background:#f1f1f1;padding:0 3px;border-radius:3px}
.missing{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0;font-size:14px}
.note{color:#555;font-size:14px;margin:6px 0}.ok{color:#1b7f3b}.no{color:#b26a00}
.included{border-left:3px solid #dde;padding-left:12px;margin:10px 0}.source{font-size:12px;color:#888}
.plot{margin:12px 0;border:1px solid #eee}
"""


# -- sections -----------------------------------------------------------------------------------------


class _Page:
    def __init__(self):
        self.sections: list[tuple[str, str, str]] = []
        self.status: dict[str, bool] = {}

    def add(self, key: str, title: str, body: str, present: bool = True) -> None:
        self.sections.append((key, title, body))
        self.status[title] = present


def _load_tokenizer(source):
    from .commands.roles import load_tokenizer

    return load_tokenizer(source)


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


def _trace_sections(
    page: _Page, run: RunDirectory, trace_path: Path, options: dict, figures_seen: set
) -> dict:
    """Summary, token analysis, timelines and roles; returns what other sections may need."""
    from . import viz
    from .analysis import analyse_tokens
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
            page.add(key, title, _missing("a trace (per-token attention signals)", cmd), present=False)
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

    # token-level analysis
    has_correct = bool(trace.samples) and all("correct" in s for s in trace.samples)
    if has_correct:
        analysis = analyse_tokens(trace, n_boot=options["n_boot"])
        written = viz.save_token_analysis_figures(analysis, run.figures)
        figures_seen.update(p for paths in written.values() for p in paths)
        body = _note(
            "Correct vs incorrect trajectories. Roles: docs/method.md#token-roles on the trace's Fisher–Rao dynamics (published "
            "thresholds); <code>s_t</code>, normalised ratios and the sample score from the scorer. Figures "
            f"(PNG + PDF) in <code>{html.escape(str(run.figures))}</code>."
        )
        body += _figure_html(viz.plot_token_analysis(analysis), "token-level analysis")
        body += _figure_html(viz.plot_feature_auroc(analysis), "AUROC of trajectory features")
        body += markdown_html(analysis.to_markdown())
        (run.figures / "token_analysis.md").write_text(analysis.to_markdown())
        (run.figures / "token_analysis.json").write_text(json.dumps(analysis.headline(), indent=2) + "\n")
        page.add("tokens", "Token-level analysis", body)
    else:
        page.add(
            "tokens",
            "Token-level analysis",
            _missing("per-sample correctness in the trace", "dyco-probe trace (it records correctness)"),
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
                _note(
                    "Attention of each token over the image (slider: the token; cells: image tokens)"
                    + (f", one view per image of the prompt's {len(counts)}." if len(counts) > 1 else ".")
                )
            )
            for k in range(len(counts)):
                fig = viz.image_view(trace, picked[0], examples=examples, image_index=k)
                parts.append(f'<div class="plot">{viz.figure_html(fig)}</div>')
        except (ValueError, IndexError) as e:
            parts.append(_note(f"No image view: {html.escape(str(e))}"))
    elif picked:
        parts.append(
            _missing("image heat-maps (the trace has no image rows)", "dyco-probe trace --image-rows ...")
        )
    page.add(
        "timelines",
        "Token timelines",
        _note(
            "Each token coloured by its role; bars: attention mass on the image (r_vis) and on the text (r_txt); "
            "lines: Fisher–Rao speed of the within-modality attention (v_vis, v_txt). Hover for values."
        )
        + "".join(parts),
    )

    # roles against the ground truth
    agreement, why = None, ""
    if run.roles.exists():
        agreement = json.loads(run.roles.read_text())
    elif trace.samples and all(s.get("synthetic") for s in trace.samples):
        source = options.get("model") or meta.get("model_source")
        try:
            agreement = role_agreement(trace, _load_tokenizer(source))
        except Exception as e:  # noqa: BLE001 - an unreadable tokenizer only costs this section
            why = f"could not compute it ({type(e).__name__}: {e}); pass --model"
    else:
        why = "the trace is not of the synthetic task, whose ground-truth roles are known"
    if agreement is not None:
        page.add("roles", "Roles against the ground truth", _roles_html(agreement))
    else:
        page.add("roles", "Roles against the ground truth", _note(html.escape(why)), present=False)
    return {"trace": trace}


def _roles_html(agreement: dict) -> str:
    from . import viz

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

    body = _note(
        f"{agreement['samples']} trajectories, {agreement['tokens']} tokens; ground truth: the synthetic task's "
        "word roles aligned to tokens. True role fractions: "
        + ", ".join(f"{k} {v:.3f}" for k, v in agreement["truth_fractions"].items())
        + "."
    )
    body += _table_html(pd.DataFrame(rows))
    peak = agreement.get("attention_peak")
    if peak and peak.get("tokens"):
        body += _note(
            f"Image attention of ground-truth visual tokens peaks on the named object's image token for "
            f"{peak['share']:.3f} of {peak['tokens']} tokens (chance {peak['chance']:.3f})."
        )
    if len(table):
        body += _figure_html(viz.plot_labeller_validation(table), "labellers against the ground truth")
    return body


def _labeller_section(page: _Page, run: RunDirectory, seen: set) -> None:
    from . import viz

    csv = run.labellers / "labeller_validation.csv"
    if not run.labellers.is_dir():
        page.add(
            "labellers",
            "Labeller validation",
            _missing(
                "the full labeller validation (every labeller and distance, per layer, threshold sweep)",
                f"python -m analyses.validate_labellers --out {run.labellers}",
            ),
            present=False,
        )
        return
    parts = []
    if csv.exists():
        parts.append(_figure_html(viz.plot_labeller_validation(csv), "labeller validation"))
    parts += _files_html(run.labellers, seen)
    page.add(
        "labellers", "Labeller validation", "".join(parts) or _note("(empty folder)"), present=bool(parts)
    )


def _intervention_section(page: _Page, run: RunDirectory, options: dict, seen: set) -> None:
    import pandas as pd

    from . import viz
    from .interventions import summarize

    sweeps = run.sweeps()
    extra = _files_html(run.interventions, seen)
    if not sweeps and not extra:
        page.add(
            "interventions",
            "Interventions",
            _missing(
                "causal interventions",
                f"dyco-probe sweep analyses/sweeps/interventions_headline.toml --out {run.interventions}/headline",
            ),
            present=False,
        )
        return
    parts = list(extra)
    readouts = {
        "dacc": "Δ accuracy (free-running)",
        "dlogp_answer": "Δ log p(gold answer) (teacher-forced)",
    }
    for sweep in sweeps:
        results = sweep / "results.parquet"
        title = f"<h3>Sweep <code>{html.escape(sweep.name)}</code></h3>"
        if not results.exists():
            parts.append(title + _missing("merged results", f"dyco-probe sweep FILE --out {sweep} --merge"))
            continue
        frame = pd.read_parquet(results)
        ok = frame[frame["status"] == "ok"]
        errors = int((frame["status"] != "ok").sum())
        by = [
            c
            for c in ("kind", "keys", "strength", "role_source", "donor", "direction", "layers", "target")
            if c in ok.columns
        ]
        manifest = (
            json.loads((sweep / "manifest.json").read_text()) if (sweep / "manifest.json").exists() else {}
        )
        parts.append(
            title
            + _note(
                f"{ok['item_index'].nunique()} items, {frame['condition_id'].nunique()} conditions, {len(frame)} rows "
                f"({errors} errors). Mean per-item effect with bootstrap 95% CI."
            )
        )
        for value, label in readouts.items():
            if value not in frame.columns:
                continue
            parts.append(f"<h4>{html.escape(label)}</h4>")
            summary = summarize(ok, value, by, n_boot=options["n_boot"]) if len(ok) else pd.DataFrame()
            if len(summary) and summary["mean"].notna().any():
                parts.append(_figure_html(viz.plot_intervention_effects(summary, label), label))
                parts.append(f"<details><summary>table</summary>{_table_html(summary)}</details>")
            parts.append(_undrawn_html(frame, value, by))
        if manifest:
            parts.append(f"<details><summary>manifest</summary>{_json_html(manifest)}</details>")
    page.add("interventions", "Interventions", "".join(parts))


def _why_not_drawn(rows, value: str) -> str | None:
    """Why a condition's rows (all its items) give no effect to draw for `value`; None if they do."""
    ok = rows[rows["status"] == "ok"]
    if ok[value].notna().any():
        return None
    if ok.empty:
        return "every item failed (see the error rows of results.parquet)"
    if str(ok["kind"].iloc[0]).startswith("patch_") and value in ("dacc",):
        return "activation patching has no free-running readout (patched values exist along the reference trajectory only)"
    if "n_targets" in ok and (ok["n_targets"].fillna(0) == 0).all():
        return "no item had a target token (none of the completions has a token of that role)"
    return "this readout was not run (see [readouts] in the sweep file)"


def _undrawn_html(frame, value: str, by: list[str]) -> str:
    """A note listing every condition of a sweep that has no drawn effect for `value`, and why."""
    from .viz import condition_label

    reasons: dict[str, list[str]] = {}
    for _, rows in frame.groupby("condition_id", sort=False):
        why = _why_not_drawn(rows, value)
        if why is not None:
            reasons.setdefault(why, []).append(condition_label({c: rows[c].iloc[0] for c in by}))
    if not reasons:
        return ""
    items = "".join(
        f"<li>{html.escape(why)}:<ul>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in sorted(set(names)))
        + "</ul></li>"
        for why, names in reasons.items()
    )
    n = sum(len(v) for v in reasons.values())
    return _note(f"Not drawn ({n} condition(s)):<ul>{items}</ul>")


def _rl_section(page: _Page, run: RunDirectory, seen: set) -> None:
    import pandas as pd

    from . import viz

    dirs = run.rl_runs()
    extra = _files_html(run.rl, seen)
    if not dirs and not extra:
        page.add(
            "rl",
            "RL with and without DyCo",
            _missing(
                "training runs",
                f"dyco-probe train --dyco off --out {run.rl}/off  (and --dyco token --out {run.rl}/token)",
            ),
            present=False,
        )
        return
    runs = {p.name: read_rl_run(p) for p in dirs}
    rows = []
    for name, r in runs.items():
        cfg, ev, tr = r["config"], r["eval"], r["train"]
        last = tr.tail(10)
        rows.append(
            {
                "run": name,
                "algo": cfg.get("algo"),
                "dyco": cfg.get("dyco"),
                "steps": f"{r['steps_done']} / {cfg.get('steps', '?')}",
                "held-out accuracy before": ev["accuracy"].iloc[0] if len(ev) else math.nan,
                "after": ev["accuracy"].iloc[-1] if len(ev) else math.nan,
                "95% CI after": (
                    f"{ev['accuracy_ci_low'].iloc[-1]:.3f}–{ev['accuracy_ci_high'].iloc[-1]:.3f}"
                    if len(ev) and "accuracy_ci_low" in ev
                    else "–"
                ),
                "n eval": int(ev["n"].iloc[-1]) if len(ev) and "n" in ev else 0,
                "reward, last 10 steps": last["reward"].mean() if "reward" in last else math.nan,
                "s_mean, last 10 steps": last["s_mean"].mean() if "s_mean" in last else math.nan,
                "s / step": tr["time_step"].mean() if "time_step" in tr else math.nan,
            }
        )
    parts = []
    if runs:
        parts.append(
            _note(
                "Runs of the minimal loop (<code>dyco_probe.rl</code>); greedy held-out accuracy with Wilson 95% intervals."
            )
        )
        parts.append(_table_html(pd.DataFrame(rows)))
        parts.append(_figure_html(viz.plot_rl_curves(runs), "RL curves"))
        for name, r in runs.items():
            parts.append(
                f"<details><summary>config of {html.escape(name)}</summary>{_json_html(r['config'])}</details>"
            )
    parts += extra
    page.add("rl", "RL with and without DyCo", "".join(parts))


def _settings_section(page: _Page, run: RunDirectory, options: dict, trace) -> None:
    from . import __version__

    parts = []
    settings = run.settings()
    if settings:
        parts.append("<h3>run.json</h3>" + _json_html(settings))
    if trace is not None:
        parts.append("<h3>Trace metadata</h3>" + _json_html(trace.metadata))
    shown = {k: v for k, v in options.items() if k != "examples"}
    parts.append("<h3>Report</h3>" + _json_html({"dyco_probe": __version__, **shown}))
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
    """Write the HTML report of a run directory and return its path.

    Args:
        run: the run directory (layout in the module docstring).
        out: the HTML file (default `<run>/report.html`).
        trace: a trace parquet to use instead of `<run>/trace.parquet`.
        data: the VLM-R1 jsonl the trace was made from, for its images (synthetic traces re-render theirs).
        model: where the tokenizer comes from for ground-truth roles (default: the trace's model).
        timelines: interactive token timelines to include (alternating correct / incorrect samples).
        n_boot: bootstrap resamples of every confidence interval.
        title: page title (default: the run's name).
    """
    import plotly.offline

    run = RunDirectory(run)
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root} is not a directory (a run directory: see dyco_probe.report)")
    # inputs named explicitly must exist; parts merely absent from the run directory are listed as missing
    if trace is not None and not Path(trace).is_file():
        raise FileNotFoundError(f"the trace {trace} does not exist (given as trace / --trace)")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"the data file {data} does not exist (given as data / --data)")
    out = check_writable(Path(out) if out else run.report)
    options = {
        "run": str(run.root),
        "trace": str(trace or run.trace),
        "data": None if data is None else str(data),
        "model": model,
        "timelines": timelines,
        "n_boot": n_boot,
        "examples": _load_examples(data),
    }
    page, seen = _Page(), set()
    found = _trace_sections(page, run, Path(options["trace"]), options, seen)
    _labeller_section(page, run, seen)
    _intervention_section(page, run, options, seen)
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
        f"<title>{html.escape(name)}</title><style>{_CSS}</style>"
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
