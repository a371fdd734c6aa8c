"""``dyco-probe report --run runs/<name>``: one self-contained HTML page of a run directory.

    dyco-probe report --run runs/demo                              # -> runs/demo/report.html
    dyco-probe report --run runs/mine --data my.jsonl --timelines 6 # images of a user's own data

The page embeds every figure and table, inlines plotly.js (no CDN: it opens offline) and lists what
the run directory lacks with the command that makes it. The layout is in ``dyco_probe.rundir``.
"""

from __future__ import annotations

from dyco_probe.commands import add_command, emit


def run(args) -> int:
    from dyco_probe.report import build_report, report_status

    path = build_report(
        args.run,
        out=args.out,
        trace=args.trace,
        data=args.data,
        model=args.model,
        timelines=args.timelines,
        n_boot=args.n_boot,
        title=args.title,
    )
    status = report_status(path)
    present = [t for t, ok in status.items() if ok]
    missing = [t for t, ok in status.items() if not ok]
    size = path.stat().st_size / 1e6
    text = f"wrote {path} ({size:.1f} MB, opens offline)\n  sections: {', '.join(present)}"
    if missing:
        text += f"\n  not in this run: {', '.join(missing)}"
    emit(args, {"report": str(path), "sections": present, "missing": missing, "mb": round(size, 2)}, text)
    return 0


def register(sub) -> None:
    p = add_command(sub, "report", run, "write a self-contained HTML report of a run directory")
    p.add_argument(
        "--run",
        required=True,
        help="run directory runs/<name>, holding trace.parquet, interventions/, rl/ ... (required; layout: dyco_probe.rundir)",
    )
    p.add_argument("--out", help="HTML file to write (default: <run>/report.html)")
    p.add_argument("--trace", help="trace parquet (default: <run>/trace.parquet)")
    p.add_argument(
        "--data",
        help="the jsonl the trace was made from, for the heat-maps' images (default: none; synthetic traces re-render theirs)",
    )
    p.add_argument("--model", help="tokenizer source for ground-truth roles (default: the trace's model)")
    p.add_argument(
        "--timelines", type=int, default=4, help="interactive token timelines to include (default: 4)"
    )
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples of the intervals (default: 1000)"
    )
    p.add_argument("--title", help="page title (default: the run's name)")
