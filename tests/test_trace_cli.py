"""`dyco-probe trace` and `dyco-probe roles` end to end on a small local checkpoint."""

import json

import pytest
import torch

from dyco_probe.cli import main
from dyco_probe.tracing import Trace

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The built-in architecture in miniature, untrained, saved like a real checkpoint."""
    from dyco_probe.testing import mini_builtin

    handle = mini_builtin()
    model, processor = handle.model, handle.processor
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def run_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]), "\n".join(out[:-1])


def test_trace_command_writes_a_trace_and_summary(checkpoint, tmp_path, capsys):
    out = tmp_path / "runs" / "trace.parquet"
    argv = ["trace", "--model", checkpoint, "--n", "3", "--batch-size", "2", "--max-new-tokens", "6"]
    argv += ["--out", str(out), "--layers", "all", "--heads", "0", "--image-rows", "--json", "--quiet"]
    code, summary, text = run_json(capsys, argv)
    assert code == 0 and out.exists() and not (tmp_path / "runs" / "trace.parquet.parts").exists()
    assert summary["samples"] == 3 and summary["accuracy"] == 0.0 and summary["out"] == str(out)
    assert set(summary["role_fractions"]) == {"neutral", "visual", "text"}
    assert "mean r_vis" in text and "accuracy" in text
    tr = Trace.load(out)
    assert tr.layers == (0, 1) and tr.metadata["heads"] == [0] and tr.image_rows is not None
    assert [s["example_id"] for s in tr.samples] == ["test-0", "test-1", "test-2"]
    assert tr.metadata["model_source"] == checkpoint


def test_gold_with_backend_and_roles_against_ground_truth(checkpoint, tmp_path, capsys):
    out = tmp_path / "gold.parquet"
    code, summary, _ = run_json(
        capsys,
        ["trace", "--model", checkpoint, "--n", "3", "--gold", "--backend", "eager", "--distance", "l2"]
        + ["--out", str(out), "--json", "--quiet"],
    )
    assert code == 0 and summary["accuracy"] == 1.0 and summary["distance"] == "l2"
    tr = Trace.load(out)
    assert tr.metadata["backend"] == "eager" and tr.metadata["mode"] == "offline"

    code, res, text = run_json(capsys, ["roles", "--trace", str(out), "--labeller", "ground_truth", "--json"])
    assert code == 0 and res["role_fractions"]["visual"] > 0 and "ground_truth" in text
    code, res, text = run_json(
        capsys,
        ["roles", "--trace", str(out), "--labeller", "ratio_threshold", "--theta", "0.2"]
        + ["--against", "ground_truth", "--json", "--out", str(tmp_path / "roles.pt")],
    )
    assert code == 0 and set(res["neutral_excluded"]["roles"]) == {"visual", "text"}
    assert "macro F1" in text and torch.load(tmp_path / "roles.pt")["roles"].shape == tr.token_ids.shape
    # the l2 trace refuses the Fisher-Rao rule, with a clear error
    code = main(["roles", "--trace", str(out), "--labeller", "fisher_rao"])
    assert code == 2 and "TraceConfig(distance='fisher_rao')" in capsys.readouterr().err


def test_trace_completions_from_eval_records(checkpoint, tmp_path, capsys):
    records = tmp_path / "eval.jsonl"
    assert (
        main(
            [
                "eval",
                "--model",
                checkpoint,
                "--n",
                "2",
                "--max-new-tokens",
                "5",
                "--out",
                str(records),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "eval_trace.parquet"
    code, summary, _ = run_json(
        capsys,
        [
            "trace",
            "--model",
            checkpoint,
            "--n",
            "2",
            "--completions",
            str(records),
            "--out",
            str(out),
            "--json",
            "--quiet",
        ],
    )
    assert code == 0 and summary["samples"] == 2
    texts = [json.loads(line)["completion"] for line in records.read_text().splitlines()]
    assert [s["completion"] for s in Trace.load(out).samples] == texts
    # ids not among the loaded examples
    code = main(
        [
            "trace",
            "--model",
            checkpoint,
            "--split",
            "val",
            "--n",
            "2",
            "--completions",
            str(records),
            "--out",
            str(tmp_path / "other.parquet"),
        ]
    )
    assert code == 2 and "not among the loaded examples" in capsys.readouterr().err


def test_roles_visual_dependency_runs_the_trace_model(checkpoint, tmp_path, capsys):
    from dyco_probe.data import synthetic_examples, write_jsonl
    from dyco_probe.labellers import get_labeller
    from dyco_probe.models.loading import load

    out = tmp_path / "gold.parquet"
    assert main(["trace", "--model", checkpoint, "--n", "3", "--gold", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    argv = ["roles", "--trace", str(out), "--labeller", "visual_dependency", "--counterfactual", "swap"]
    argv += [
        "--divergence",
        "k3",
        "--visual-above",
        "1e-3",
        "--text-below",
        "1e-4",
        "--against",
        "ground_truth",
    ]
    code, res, text = run_json(capsys, argv + ["--json", "--out", str(tmp_path / "roles.pt")])
    assert code == 0 and res["options"]["counterfactual"] == "swap" and "macro F1" in text
    tr = Trace.load(out)
    want = get_labeller("visual_dependency")(
        tr,
        handle=load(checkpoint),
        counterfactual="swap",
        divergence="k3",
        visual_above=1e-3,
        text_below=1e-4,
    )
    assert torch.equal(torch.load(tmp_path / "roles.pt")["roles"], want)

    # the examples may come from a jsonl (for traces of other data); bad thresholds fail at once
    data = write_jsonl(synthetic_examples("test", 3), tmp_path / "data" / "test.jsonl")
    code, again, _ = run_json(capsys, argv + ["--data", str(data), "--json"])
    assert code == 0 and again["role_fractions"] == res["role_fractions"]
    code = main(["roles", "--trace", str(out), "--labeller", "visual_dependency", "--text-below", "9"])
    assert code == 2 and "wrong order" in capsys.readouterr().err
