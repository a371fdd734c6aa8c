"""The commands a user runs on a real checkpoint (trace, eval, report, the token analysis script) work on a
checkpoint directory of the Qwen2.5-VL family (tiny, random) and on the user's own VLM-R1 jsonl."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dyco_probe.cli import main
from dyco_probe.report import report_status

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def run_json(capsys, argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint directory, a synthetic export and the same data stripped to plain VLM-R1 records."""
    from dyco_probe.testing import save_tiny_checkpoint

    base = tmp_path_factory.mktemp("real")
    ckpt = save_tiny_checkpoint("qwen2_5_vl", base / "Qwen2.5-VL-tiny")
    assert main(["export", "--split", "test", "--n", "4", "--out", str(base / "data" / "export.jsonl")]) == 0
    plain = base / "data" / "mine.jsonl"
    with plain.open("w") as f:
        for line in (base / "data" / "export.jsonl").read_text().splitlines():
            record = json.loads(line)
            f.write(json.dumps({k: record[k] for k in ("id", "image", "conversations")}) + "\n")
    return {
        "ckpt": str(ckpt),
        "export": str(base / "data" / "export.jsonl"),
        "mine": str(plain),
        "base": base,
    }


def test_eval_trace_and_report_on_a_users_own_jsonl(setup, capsys):
    base, ckpt, mine = setup["base"], setup["ckpt"], setup["mine"]
    run = base / "runs" / "mine"
    common = [
        "--model",
        ckpt,
        "--data",
        mine,
        "--n",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--quiet",
    ]
    ev = run_json(capsys, ["eval", *common, "--out", str(run / "eval.jsonl")])
    assert ev["n"] == 4 and (run / "eval.jsonl").exists()
    tr = run_json(capsys, ["trace", *common, "--image-rows", "--out", str(run / "trace.parquet")])
    assert tr["samples"] == 4 and tr["out"] == str(run / "trace.parquet")
    # the eval's completions, traced teacher-forced, into a second run
    forced = run_json(
        capsys,
        [
            "trace",
            *common,
            "--completions",
            str(run / "eval.jsonl"),
            "--out",
            str(base / "runs" / "forced" / "trace.parquet"),
        ],
    )
    assert forced["samples"] == 4

    rep = run_json(
        capsys, ["report", "--run", str(run), "--data", mine, "--n-boot", "50", "--timelines", "2"]
    )
    status = report_status(rep["report"])
    assert status["Trace summary"] and status["Token-level analysis"] and status["Token timelines"]
    assert not status["Roles against the ground truth"]  # the user's data has no ground truth
    text = Path(rep["report"]).read_text()
    assert '"type":"image"' in text.replace(" ", "")  # the user's image under the heat-map
    assert "<script src" not in text
    assert json.loads((run / "figures" / "token_analysis.json").read_text())["samples"] == 4


def test_synthetic_export_keeps_ground_truth_through_the_commands(setup, capsys):
    base, ckpt = setup["base"], setup["ckpt"]
    run = base / "runs" / "export"
    common = ["--model", ckpt, "--data", setup["export"], "--n", "4", "--quiet"]
    run_json(capsys, ["trace", *common, "--gold", "--image-rows", "--out", str(run / "trace.parquet")])
    rep = run_json(capsys, ["report", "--run", str(run), "--n-boot", "50", "--timelines", "1"])
    status = report_status(rep["report"])
    assert status["Roles against the ground truth"]  # rebuilt from the records, tokenizer from the checkpoint
    text = Path(rep["report"]).read_text()
    assert "macro F1" in text and "True role fractions" in text


def test_token_analysis_script_on_a_checkpoint(setup, tmp_path):
    sys.path.insert(0, str(ROOT))
    from analyses import token_analysis

    argv = ["--model", setup["ckpt"], "--data", setup["export"], "--n", "3", "--max-new-tokens", "8"]
    argv += ["--out", str(tmp_path / "fig"), "--runs", str(tmp_path / "runs"), "--n-boot", "30", "--quiet"]
    assert token_analysis.main([*argv, "--roles", "ground_truth"]) == 0
    assert (tmp_path / "fig" / "token_analysis_overview.pdf").exists()
    assert (tmp_path / "fig" / "token_timelines.html").exists()
    headline = json.loads((tmp_path / "fig" / "token_analysis.json").read_text())
    assert headline["samples"] == 3 and headline["settings"]["roles"] == "ground_truth"
    assert list((tmp_path / "runs").glob("*.parquet"))  # the trace is cached for reruns
