"""The HTML report of a run directory (`dyco-probe report`), and `make demo` end to end on a tiny checkpoint."""

import json
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_analysis import make_trace  # noqa: E402
from test_viz import with_image_rows  # noqa: E402

from dyco_probe.cli import main  # noqa: E402
from dyco_probe.report import build_report, markdown_html, report_status  # noqa: E402
from dyco_probe.rundir import RunDirectory, read_rl_run  # noqa: E402
from dyco_probe.studies.labellers import labeller_table  # noqa: E402

torch.set_num_threads(1)
SECTIONS = [
    "Trace summary",
    "Token-level analysis",
    "Token timelines",
    "Roles against the ground truth",
    "Labeller validation",
    "Interventions",
    "RL with and without DyCo",
    "Settings and files",
]


def assert_offline(text: str) -> None:
    """Nothing is fetched: no external scripts, stylesheets or images; plotly.js is inlined once."""
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?(https?:)?//", text)
    assert "<script src" not in text and "<link" not in text
    assert text.count("* plotly.js v") == 1
    assert len(text) > 3_000_000  # the library itself


def write_rl_run(path, dyco: str, steps: int = 6):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"algo": "grpo", "dyco": dyco, "steps": steps}))
    lines = [
        {"kind": "eval", "step": 0, "accuracy": 0.2, "accuracy_ci_low": 0.1, "accuracy_ci_high": 0.3, "n": 50}
    ]
    for s in range(1, steps + 1):
        lines.append({"kind": "train", "step": s, "reward": s / steps, "s_mean": 0.3, "time_step": 0.5})
    lines.append({"kind": "train", "step": steps + 1, "skipped": 1})
    lines.append(
        {
            "kind": "eval",
            "step": steps,
            "accuracy": 0.3,
            "accuracy_ci_low": 0.2,
            "accuracy_ci_high": 0.4,
            "n": 50,
        }
    )
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run directory with every part, written by hand in the formats the commands write."""
    root = tmp_path_factory.mktemp("run")
    run = RunDirectory(root)
    with_image_rows(make_trace(batch=8, seed=1)).save(run.trace)
    run.labellers.mkdir()
    rows = [
        dict(
            labeller="fisher_rao",
            setting="tau",
            neutral=n,
            role=r,
            precision=0.5,
            recall=0.5,
            f1=0.5,
            support=10,
            predicted=10,
            macro_f1=0.5,
            macro_f1_lo=0.4,
            macro_f1_hi=0.6,
            accuracy=0.5,
            tokens=20,
        )
        for n in ("excluded", "included")
        for r in ("visual", "text")
    ]
    pd.DataFrame(rows).to_csv(run.labellers / "labeller_validation.csv", index=False)
    (run.labellers / "labeller_validation.md").write_text(
        "# Labellers\n\n| a | b |\n| --- | --- |\n| `x` | <answer> |\n"
    )
    sweep = run.interventions / "headline"
    sweep.mkdir(parents=True)
    frame = pd.DataFrame(
        [
            dict(
                sweep="h",
                condition_id=f"{t}{layers}",
                kind="attention",
                keys="image",
                strength=0.0,
                target=t,
                role_source="fisher_rao",
                layers=layers,
                item_index=i,
                status="ok",
                dacc=-0.5 * (t == "visual"),
                dlogp_answer=float(-i),
            )
            for t in ("visual", "random:visual")
            for layers in ("0", "all")
            for i in range(5)
        ]
    )
    frame.to_parquet(sweep / "results.parquet")
    (sweep / "manifest.json").write_text(json.dumps({"model": {"source": "builtin"}}))
    (run.interventions / "unmerged").mkdir()
    (run.interventions / "unmerged" / "manifest.json").write_text("{}")
    (run.interventions / "interventions_headline.md").write_text("## Headline\n\n- one finding\n")
    write_rl_run(run.rl / "grpo-off", "off")
    write_rl_run(run.rl / "grpo-token", "token")
    run.run_json.write_text(json.dumps({"settings": {"n": 8}, "stages": {}}))
    return run


def test_markdown_html():
    text = "# Title\n\nsome `code` and **bold** <tag>\n\n| a | b |\n| --- | ---: |\n| 1 | <answer> |\n\n- one\n- two\n  more\n"
    out = markdown_html(text)
    assert "<h3>Title</h3>" in out and "<code>code</code>" in out and "<b>bold</b>" in out
    assert "&lt;tag&gt;" in out and "<td>&lt;answer&gt;</td>" in out and "<th>a</th>" in out
    assert "---" not in out and out.count("<tr>") == 2
    assert "<li>two more</li>" in out


def test_report_with_every_part(full_run):
    path = build_report(full_run.root, n_boot=50, timelines=2)
    assert path == full_run.report
    text = path.read_text()
    assert_offline(text)
    assert report_status(path) == {s: s != "Roles against the ground truth" for s in SECTIONS}
    assert "not of the synthetic task" in text  # why there is no ground truth
    assert text.count('src="data:image/png;base64,') >= 6  # analysis, labellers, interventions, RL figures
    assert text.count("plotly-graph-div") == 3  # two timelines and the image view
    assert "Headline" in text and "one finding" in text  # other analyses' write-ups are included
    assert "<td>&lt;answer&gt;</td>" in text
    assert "merged results" in text and "--merge" in text  # the unmerged sweep
    assert "grpo-token" in text and "held-out accuracy before" in text
    for name in ("overview", "role_fractions", "auroc"):
        assert (full_run.figures / f"token_analysis_{name}.png").exists()
        assert (full_run.figures / f"token_analysis_{name}.pdf").exists()
    assert json.loads((full_run.figures / "token_analysis.json").read_text())["samples"] == 8
    assert not list(full_run.root.glob(".*partial"))


def test_report_of_an_empty_run_says_what_is_missing(tmp_path):
    path = build_report(tmp_path, out=tmp_path / "r" / "page.html")
    text = path.read_text()
    status = report_status(path)
    assert status["Settings and files"] and not any(v for k, v in status.items() if k != "Settings and files")
    for command in (
        "dyco-probe trace",
        "analyses.validate_labellers",
        "dyco-probe sweep",
        "dyco-probe train",
    ):
        assert command in text
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")


def test_report_command(full_run, capsys, tmp_path):
    out = tmp_path / "x.html"
    code = main(
        [
            "report",
            "--run",
            str(full_run.root),
            "--out",
            str(out),
            "--n-boot",
            "30",
            "--timelines",
            "1",
            "--json",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert code == 0 and out.exists() and result["report"] == str(out)
    assert "Interventions" in result["sections"] and result["missing"] == ["Roles against the ground truth"]
    assert "opens offline" in lines[0]


def test_read_rl_run_and_labeller_table(full_run):
    r = read_rl_run(full_run.rl / "grpo-off")
    assert r["steps_done"] == 6 and list(r["eval"]["step"]) == [0, 6] and len(r["train"]) == 6
    agreement = {
        "labellers": {
            "fisher_rao": {
                "setting": "tau",
                "excluded": {
                    "roles": {
                        "visual": {"precision": 1.0, "recall": 0.5, "f1": None, "support": 2, "predicted": 1}
                    },
                    "macro_f1": 0.4,
                    "accuracy": 0.5,
                    "tokens": 3,
                },
                "included": {"roles": {}, "macro_f1": None, "accuracy": None, "tokens": 0},
            }
        }
    }
    table = labeller_table(agreement)
    assert (
        list(table["role"]) == ["visual"]
        and np.isnan(table["f1"].iloc[0])
        and table["macro_f1"].iloc[0] == 0.4
    )


@pytest.mark.slow
def test_demo_quick_on_a_tiny_checkpoint(tmp_path, capsys):
    """`make demo`'s stages on a tiny random checkpoint: every stage runs, a rerun skips them all."""
    from dyco_probe.demo import STAGES
    from dyco_probe.demo import main as demo_main
    from dyco_probe.testing import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "ckpt")
    out = tmp_path / "demo"
    argv = ["--quick", "--model", str(ckpt), "--out", str(out), "--quiet"]
    assert demo_main(argv) == 0
    text = capsys.readouterr().out
    for k, stage in enumerate(STAGES, 1):
        assert f"[{k}/{len(STAGES)}] {stage}:" in text
    record = json.loads((out / "run.json").read_text())
    assert all(record["stages"][s]["done"] for s in STAGES)
    run = RunDirectory(out)
    assert run.trace.exists() and run.roles.exists() and run.report.exists()
    assert (run.interventions / "interventions_headline.md").exists()
    assert (run.labellers / "labeller_validation.csv").exists()
    assert {p.name for p in run.rl_runs()} == {"grpo-off", "grpo-token"}
    status = report_status(run.report)
    assert all(status[s] for s in SECTIONS)
    assert_offline(run.report.read_text())
    assert demo_main(argv) == 0  # a rerun skips every finished stage
    again = capsys.readouterr().out
    assert again.count("already done in an earlier run") == len(STAGES) - 1
    with pytest.raises(SystemExit, match="other settings"):
        demo_main([*argv, "--n", "9"])


def test_render_report_writes_nothing_but_the_page(full_run, tmp_path):
    from dyco_probe.report import render_report

    def files():
        return {p: p.stat().st_mtime_ns for p in full_run.root.rglob("*") if p.is_file()}

    before = files()
    out = render_report(full_run.root, out=tmp_path / "page.html", timelines=1)
    assert out.exists() and files() == before
