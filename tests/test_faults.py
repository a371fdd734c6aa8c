"""Fault injection: bad inputs, interrupted and failed runs, full and read-only disks.

Nothing may go wrong silently: user data is never cut or overwritten unasked, a resumed run keeps
its settings, a failed run can be corrected and rerun, an error names what is wrong in one line, and
a file that looks finished is finished. Each test below is one such promise, on tiny models and
data so the file runs in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dyco_probe.cli import build_parser, main
from dyco_probe.tracing import Trace

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TAG = "<image>"


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The built-in architecture in miniature, untrained, saved like a real checkpoint."""
    from dyco_probe.testing import mini_builtin

    handle = mini_builtin()
    path = tmp_path_factory.mktemp("ckpt")
    handle.model.save_pretrained(path)
    handle.processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Four synthetic examples exported as VLM-R1 jsonl: their records, and the folder they are in."""
    from dyco_probe.data import synthetic_examples, write_jsonl

    folder = tmp_path_factory.mktemp("data")
    path = write_jsonl(synthetic_examples("test", 4), folder / "base.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()], folder


def write_lines(folder: Path, name: str, records: list, n: int, bad: dict | None = None) -> Path:
    """`n` good lines cycling over `records` (ids `ex-<line>`), with `bad[line]` (1-based) replacing
    the good line there: a raw string, or a record."""
    bad = bad or {}
    lines = []
    for k in range(1, n + 1):
        if k in bad:
            line = bad[k]
            lines.append(line if isinstance(line, str) else json.dumps(line))
        else:
            lines.append(json.dumps({**records[(k - 1) % len(records)], "id": f"ex-{k}"}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


# -- 1. --data is the whole file unless --n says otherwise ---------------------------------------


def test_data_file_is_used_whole_unless_n_asks_for_fewer(checkpoint, records, tmp_path, capsys):
    rows, folder = records
    data = write_lines(
        folder, "210.jsonl", rows, 210
    )  # above eval's 200 and trace's 64 of the synthetic task
    out = tmp_path / "all.parquet"
    code, stdout, _ = run_cli(
        capsys, "trace", "--model", checkpoint, "--data", data, "--max-new-tokens", 1, "--batch-size", 105,
        "--out", out, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0 and last_json(stdout)["samples"] == 210
    assert Trace.load(out).metadata["data"] == {"source": str(data), "n": 210, "available": 210}

    cut = tmp_path / "ten.parquet"
    code, stdout, stderr = run_cli(
        capsys, "trace", "--model", checkpoint, "--data", data, "--n", 10, "--max-new-tokens", 1,
        "--out", cut, "--quiet",
    )  # fmt: skip
    assert code == 0 and "the first 10 of the 210" in stderr and "first 10 of 210" in stdout
    meta = Trace.load(cut).metadata["data"]
    assert Trace.load(cut).batch_size == 10 and meta["n"] == 10 and meta["available"] == 210

    evals = tmp_path / "eval.jsonl"
    code, stdout, _ = run_cli(
        capsys, "eval", "--model", checkpoint, "--data", data, "--max-new-tokens", 1, "--batch-size", 105,
        "--out", evals, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0 and last_json(stdout)["n"] == 210
    first = json.loads(evals.read_text().splitlines()[0])
    assert set(first) == {"id", "answer", "prediction", "correct", "format", "completion"}  # item 13


def test_a_thousand_lines_with_bad_ones_trace_exactly_the_good_ones(checkpoint, records, tmp_path, capsys):
    rows, folder = records
    image = folder / rows[0]["image"]
    truncated = folder / "truncated.png"
    truncated.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"not an image at all" * 10)
    question = rows[0]["conversations"]
    bad = {
        7: '{"id": "broken", "image": ',
        100: {**rows[0], "id": "gone", "image": "nowhere.png"},
        333: {**rows[0], "id": "truncated", "image": truncated.name},
        500: {**rows[0], "id": "garbage", "image": garbage.name},
        750: {
            **rows[0],
            "id": "untagged",
            "conversations": [{"from": "human", "value": "no tag"}, question[1]],
        },
        999: {**rows[0], "id": "two", "image": [rows[0]["image"], rows[1]["image"]]},
    }
    data = write_lines(folder, "1000.jsonl", rows, 1000, bad)
    out = tmp_path / "t.parquet"

    # without --skip-bad: the first bad line is the error, before any work or file
    code, _, stderr = run_cli(capsys, "trace", "--model", checkpoint, "--data", data, "--out", out, "--quiet")
    assert code == 2 and f"{data}:7:" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()

    code, stdout, stderr = run_cli(
        capsys, "trace", "--model", checkpoint, "--data", data, "--skip-bad", "--max-new-tokens", 1,
        "--batch-size", 250, "--out", out, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    good = [f"ex-{k}" for k in range(1, 1001) if k not in bad]
    assert [s["example_id"] for s in Trace.load(out).samples] == good
    for line in bad:
        assert f"{data}:{line}:" in stderr
    assert "not a readable image" in stderr and "does not exist" in stderr
    assert len(last_json(stdout)["data"]["skipped"]) == len(bad)


# -- 2. a resumed run keeps its settings ------------------------------------------------------------


def test_resume_takes_the_settings_of_the_run(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys, "train", "--model", checkpoint, "--out", run, "--steps", 1, "--n-train", 4, "--n-eval", 2,
        "--prompts-per-step", 1, "--num-generations", 2, "--max-new-tokens", 4, "--eval-max-new-tokens", 4,
        "--eval-batch-size", 2, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    saved = json.loads((run / "config.json").read_text())

    # as the README writes it: the run's settings, not the defaults; --steps may grow
    code, _, stderr = run_cli(capsys, "train", "--out", run, "--resume", "--steps", 2, "--quiet")
    assert code == 0, stderr
    now = json.loads((run / "config.json").read_text())
    assert now == {**saved, "steps": 2, "resume": True}
    evals = pd.read_csv(run / "eval.csv")
    assert evals["n"].tolist() == [2, 2, 2] and evals["step"].tolist() == [0, 1, 2]
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "resume", "step": 1, "changed": {"steps": [1, 2]}} in history

    # an option that changes what the run computes is an error, and nothing is touched
    before = (run / "config.json").read_bytes()
    code, _, stderr = run_cli(capsys, "train", "--out", run, "--resume", "--steps", 3, "--n-eval", 16)
    assert code == 2 and "n_eval: the run has 2, now 16" in stderr
    assert (run / "config.json").read_bytes() == before

    code, _, stderr = run_cli(capsys, "train", "--out", tmp_path / "none", "--resume")
    assert code == 2 and "holds no run to resume" in stderr


# -- 3. a finished trace is not overwritten unasked ------------------------------------------------


def test_trace_refuses_to_overwrite_a_finished_trace(checkpoint, tmp_path, capsys):
    out = tmp_path / "t.parquet"
    args = ["trace", "--model", checkpoint, "--n", 2, "--max-new-tokens", 2, "--out", out, "--quiet"]
    assert run_cli(capsys, *args)[0] == 0
    before = out.read_bytes()
    code, _, stderr = run_cli(capsys, *args[:4], 3, *args[5:])
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert out.read_bytes() == before
    assert run_cli(capsys, *args[:4], 3, *args[5:], "--overwrite")[0] == 0
    assert Trace.load(out).batch_size == 3


# -- 4. several images per prompt ------------------------------------------------------------------


def test_two_image_prompts_record_and_draw_each_image(checkpoint, records, tmp_path, capsys):
    from dyco_probe.viz import image_view

    rows, folder = records
    two = []
    for k, r in enumerate(rows):
        human = f"{IMAGE_TAG} {r['conversations'][0]['value']}"
        conversations = [{"from": "human", "value": human}, r["conversations"][1]]
        two.append({**r, "image": [r["image"], rows[(k + 1) % 4]["image"]], "conversations": conversations})
    data = write_lines(folder, "two.jsonl", two, 4)
    out = tmp_path / "two.parquet"
    code, _, stderr = run_cli(
        capsys, "trace", "--model", checkpoint, "--data", data, "--max-new-tokens", 3, "--image-rows",
        "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    trace = Trace.load(out)
    for s in trace.samples:
        assert s["num_images"] == 2 and s["image_token_counts"] == [16, 16]
        assert s["image_grids"] == [[4, 4], [4, 4]]
    first, second = (image_view(trace, 0, image_index=k) for k in (0, 1))
    heat = [d for d in second.data if d.type == "heatmap"][0]
    assert len(heat.z) == 4 and len(heat.z[0]) == 4
    assert not np.array_equal(first.data[-1].z, second.data[-1].z)  # each image its own attention
    with pytest.raises(IndexError, match="has 2 image"):
        image_view(trace, 0, image_index=2)


# -- 5 and 6. the report ---------------------------------------------------------------------------


def test_report_refuses_a_missing_named_input(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, _, stderr = run_cli(
        capsys, "report", "--run", tmp_path / "run", "--trace", tmp_path / "nope.parquet"
    )
    assert code == 2 and "nope.parquet does not exist" in stderr
    assert not (tmp_path / "run" / "report.html").exists()


def _sweep_rows() -> pd.DataFrame:
    """A sweep's results: knockouts with values, patches (no free-running readout, NaN strength, no
    keys; image-state patches without target), and a condition whose role had no token."""
    rows = []

    def add(cid, kind, keys, strength, target, source, layers, dlogp, dacc, n_targets=3, **extra):
        for item in range(4):
            rows.append(
                dict(condition_id=cid, kind=kind, keys=keys, strength=strength, target=target,
                     role_source=source, layers=layers, heads="all", slice="all", donor=extra.get("donor", ""),
                     direction=extra.get("direction", ""), item_index=item, item_id=f"i{item}", status="ok",
                     error="", n_targets=n_targets, dlogp_answer=dlogp + 0.01 * item, dacc=dacc)
            )  # fmt: skip

    nan = float("nan")
    for layer in ("0", "1"):
        add(f"ko-v-{layer}", "knockout", "image", 0.0, "visual", "fisher_rao", layer, -0.1, -0.25)
        add(f"ko-r-{layer}", "knockout", "image", 0.0, "random:visual", "fisher_rao", layer, -0.02, 0.0)
        add(f"ko-t-{layer}", "knockout", "image", 0.0, "text", "fisher_rao", layer, nan, nan, n_targets=0)
        add(f"pa-{layer}", "patch_attention_output", "", nan, "visual", "ground_truth", layer, 0.004, nan,
            donor="swap", direction="restore")  # fmt: skip
        add(f"pi-{layer}", "patch_image_states", "", nan, "", "", layer, 0.007, nan, donor="blank",
            direction="noise")  # fmt: skip
    return pd.DataFrame(rows)


def test_report_draws_every_sweep_condition_or_says_why_not(checkpoint, tmp_path, capsys):
    from dyco_probe.report import build_report
    from dyco_probe.viz import plot_intervention_effects
    from dyco_probe.viz.interactive import _title, token_label

    run = tmp_path / "run"
    sweep = run / "interventions" / "s"
    sweep.mkdir(parents=True)
    frame = _sweep_rows()
    frame.to_parquet(sweep / "results.parquet")
    code, _, stderr = run_cli(
        capsys, "trace", "--model", checkpoint, "--n", 6, "--max-new-tokens", 6, "--image-rows",
        "--out", run / "trace.parquet", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = build_report(run, n_boot=20).read_text()
    noisy = [w for w in caught if issubclass(w.category, UserWarning)]  # matplotlib's layout and legends
    assert not noisy, [str(w.message) for w in noisy]
    assert page.count("Not drawn") == 2  # Δ accuracy (patches, empty role) and Δ log p (empty role)
    assert "activation patching has no free-running readout" in page
    assert "patch image states · blank donor, noise; target every completion token; layers 0" in page
    assert "image keys · knockout · Fisher–Rao roles; target text; layers 1" in page
    assert "no item had a target token" in page

    from dyco_probe.interventions import summarize

    by = ["kind", "keys", "strength", "role_source", "donor", "direction", "layers", "target"]
    fig = plot_intervention_effects(summarize(frame, "dlogp_answer", by, n_boot=20))
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles = [ax.get_title() for ax in axes]
    assert len(axes) == 3 and len(set(titles)) == 3  # knockout, attention-output patch, image-state patch
    assert all(line.get_ydata().size for ax in axes for line in ax.get_lines()[:1])

    assert token_label("<think>", max_chars=4) == "&lt;th…"  # cut, then escaped: never `&gt` half
    meta = {"sample_id": "s", "correct": False, "prediction": None, "answer": "7"}
    trace = argparse.Namespace(samples=[meta], batch_size=1)
    assert "None" not in _title(trace, 0) and "no answer given" in _title(trace, 0)


# -- 7. a failed run can be corrected and rerun ----------------------------------------------------


def test_a_failed_run_leaves_nothing_that_blocks_the_corrected_rerun(checkpoint, tmp_path, capsys):
    out = tmp_path / "t.parquet"
    parts = tmp_path / "t.parquet.parts"
    args = ["trace", "--model", checkpoint, "--n", 2, "--max-new-tokens", 2, "--out", out, "--quiet"]
    code, _, stderr = run_cli(capsys, *args, "--layers", 99)
    assert code == 2 and "out of range" in stderr
    assert not parts.exists() and not out.exists()

    parts.mkdir()  # a manifest left by a run that never finished a batch does not block
    (parts / "manifest.json").write_text('{"examples": ["other"]}')
    assert run_cli(capsys, *args, "--layers", 1)[0] == 0 and Trace.load(out).layers == (1,)
    assert not parts.exists()

    # finished batches of another run are kept, with the way out named
    from dyco_probe.api import _Parts

    keep = tmp_path / "keep.parts"
    keep.mkdir()
    (keep / "manifest.json").write_text('{"examples": ["other"]}')
    (keep / "part-00000.done").write_text("")
    with pytest.raises(ValueError, match="finished batch.*--overwrite"):
        _Parts(keep, {"examples": ["mine"]})


# -- 8. --skip-bad covers corrupt images --------------------------------------------------------------


def test_a_corrupt_image_is_a_bad_line_found_when_the_file_is_read(records, tmp_path):
    from dyco_probe.data import DataError, read_jsonl

    rows, folder = records
    image = folder / rows[1]["image"]
    (folder / "half.png").write_bytes(image.read_bytes()[:200])
    data = write_lines(folder, "corrupt.jsonl", rows, 3, {2: {**rows[1], "id": "half", "image": "half.png"}})
    with pytest.raises(
        DataError, match=rf"{re.escape(str(data))}:2: image file .*half.png is not a readable image"
    ):
        read_jsonl(data)
    skipped: list[str] = []
    assert [ex.id for ex in read_jsonl(data, skip_bad=True, skipped=skipped)] == ["ex-1", "ex-3"]
    assert len(skipped) == 1 and f"{data}:2:" in skipped[0]


# -- 9. one clear line for each error --------------------------------------------------------------


def test_errors_are_one_clear_line(checkpoint, records, tmp_path, capsys):
    from dyco_probe.interventions import SweepConfig, expand_conditions

    def one_line(code, err):
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "eval", "--model", checkpoint, "--device", "cuda", "--n", 1)
        assert "CUDA is not available" in one_line(code, err) and "Traceback" not in err
    code, _, err = run_cli(capsys, "roles", "--trace", tmp_path / "nope.parquet")
    assert "nope.parquet: no such trace file" in one_line(code, err)

    completions = tmp_path / "completions.jsonl"
    completions.write_text('{"id": "test-0", "completion": "a"}\n{"id": "test-1", "completion": \n')
    code, _, err = run_cli(
        capsys,
        "trace",
        "--model",
        checkpoint,
        "--n",
        2,
        "--completions",
        completions,
        "--out",
        tmp_path / "c.parquet",
    )
    assert f"{completions}:2: not valid JSON" in one_line(code, err)

    config = SweepConfig.from_dict({"grid": [{"layers": ["99"]}]}, path="s.toml")
    with pytest.raises(
        ValueError, match=r"s.toml grid 0: layers \[99\] out of range: the model has 4 layers"
    ):
        expand_conditions(config, num_layers=4, num_heads=2)


# -- 10. --quiet is quiet --------------------------------------------------------------------------


def test_quiet_hides_the_libraries_progress_bars(checkpoint, tmp_path, capsys):
    """Loading the model and saving the trained one: transformers' bars go to the captured stderr."""
    args = ["train", "--model", checkpoint, "--out", tmp_path / "run", "--steps", 1, "--n-train", 2]
    args += ["--n-eval", 0, "--prompts-per-step", 1, "--num-generations", 2, "--max-new-tokens", 2, "--quiet"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    assert "Loading weights" not in stderr and "Writing model shards" not in stderr
    assert "%|" not in stderr  # no progress bar of any kind


# -- 11. the project explains itself ---------------------------------------------------------------


def _anchor(heading: str) -> str:
    """A markdown heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_citation_points_into_docs_method():
    method = (ROOT / "docs" / "method.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", method, flags=re.M)}
    old_citation = "SPEC " + "§"
    checked = 0
    for path in ROOT.rglob("*"):
        if (
            path.suffix not in (".py", ".md", ".ipynb", ".toml")
            or ".venv" in path.parts
            or ".git" in path.parts
        ):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        assert old_citation not in text, f"{path} cites a document that is not in the repository"
        for anchor in re.findall(r"method\.md#([a-z0-9-]+)", text):
            assert anchor in anchors, f"{path}: method.md#{anchor} is not a section of docs/method.md"
            checked += 1
    assert checked > 40


# -- 12. help texts -------------------------------------------------------------------------------


def test_every_option_has_its_own_help_with_its_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        helps = []
        for action in parser._actions:
            if action.dest in ("help", "json", "quiet"):
                continue
            assert action.help and ("default" in action.help or "required" in action.help), (
                name,
                action.dest,
            )
            assert "\n" not in action.help
            helps.append(action.help)
        assert len(helps) == len(set(helps)), f"{name}: two options share one help text"


# -- 13. the README's examples ---------------------------------------------------------------------


def test_readme_examples_work_as_written(tmp_path):
    from dyco_probe.rundir import RunDirectory

    trace = Trace(
        token_ids=torch.zeros(1, 2, dtype=torch.long),
        mask=torch.ones(1, 2, dtype=torch.bool),
        **{k: torch.zeros(1, 2) for k in ("r_vis", "r_txt", "r_vis_norm", "r_txt_norm", "v_vis", "v_txt")},
    )
    trace.save(tmp_path / "runs" / "mine" / "trace.parquet")  # the folders are created
    assert Trace.load(tmp_path / "runs" / "mine" / "trace.parquet").batch_size == 1

    # the command-line examples write one run directory that `report --run runs/mine` reads whole
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Command line") : readme.index("## Python")]
    outs = {}
    for command, out in re.findall(r"^dyco-probe (trace|sweep|train) .*?--out (\S+)", section, flags=re.M):
        outs.setdefault(command, []).append(Path(out))
    run = RunDirectory("runs/mine")
    assert run.trace in outs["trace"]
    assert outs["sweep"] and all(p.parent == run.interventions for p in outs["sweep"])
    assert outs["train"] and all(p.parent == run.rl for p in outs["train"])
    assert "dyco-probe report --run runs/mine" in section


# -- 14. trace_generate stops at the EOS it is given ---------------------------------------------------


def test_trace_generate_passes_its_eos_to_generate():
    from dyco_probe.data import synthetic_examples
    from dyco_probe.testing import mini_builtin
    from dyco_probe.tracing import trace_generate

    handle = mini_builtin()
    ex = synthetic_examples("test", 1)[0]
    inputs = handle.encode([handle.prompt(ex.question, 1)], [ex.load_images()])
    _, free = trace_generate(handle.model, inputs, max_new_tokens=6, image_token_id=handle.image_token_id)
    tokens = free[0].tolist()
    assert len(tokens) == 6
    # the latest token the model generates for the first time: make it the end of sequence
    k = max(i for i, tok in enumerate(tokens) if tok not in tokens[:i])
    trace, completion = trace_generate(
        handle.model, inputs, max_new_tokens=6, image_token_id=handle.image_token_id, eos_token_id=tokens[k]
    )
    assert completion[0].tolist() == tokens[: k + 1]
    assert trace.mask[0].tolist() == [True] * (k + 1)


# -- killed, full, read-only -------------------------------------------------------------------------

SWEEP = """
name = "faults"
seed = 1

[model]
source = "untrained"
arch = { hidden_size = 32, intermediate_size = 64, num_layers = 2, num_heads = 2, num_kv_heads = 2, vision_depth = 1, vision_hidden = 32, vision_heads = 2, vision_intermediate = 64 }

[data]
split = "test"
n = 4
batch_size = 1
trajectory = "gold"
max_new_tokens = 40

[readouts]
free_running = false

[[grid]]
keys = ["image"]
targets = ["visual", "random:visual"]
role_sources = ["ground_truth"]
layers = ["each"]
"""


def test_sigkill_during_a_sweep_then_rerun_completes_without_duplicates(tmp_path, capsys):
    from dyco_probe.interventions import ResultStore, SweepConfig, run_sweep

    reference = tmp_path / "reference"
    path = tmp_path / "sweep.toml"
    path.write_text(f'out = "{reference}"\n' + SWEEP)
    run_sweep(SweepConfig.load(path), progress=False)
    expected = pd.read_parquet(reference / "results.parquet")

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dyco_probe.cli", "sweep", str(path), "--out", str(out), "--quiet"],
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    units = out / "parts" / "rank-000"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(units.glob("*.parquet"))) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ResultStore(out).done()
    assert 0 < len(partial) < len(expected) and not (out / "results.parquet").exists()

    code, stdout, stderr = run_cli(capsys, "sweep", path, "--out", out, "--json", "--quiet")
    assert code == 0, stderr
    assert last_json(stdout)["rows_skipped"] == len(partial)
    got = pd.read_parquet(out / "results.parquet")
    assert not got.duplicated(["condition_id", "item_index"]).any() and (got["status"] == "ok").all()
    key = ["condition_id", "item_index"]
    a, b = (f.sort_values(key).reset_index(drop=True) for f in (got, expected))
    assert a[key].equals(b[key])
    for col in ("n_targets", "dlogp_answer", "dlogp_target", "dlogp_after"):
        assert ((a[col] - b[col]).abs().fillna(0) < 1e-9).all() and (a[col].isna() == b[col].isna()).all()
    assert not partial_files(out)


def test_sigkill_during_pretrain_then_rerun_gives_the_uninterrupted_model(tmp_path, capsys):
    from safetensors.torch import load_file

    import dyco_probe.pretrain as pt

    straight = tmp_path / "straight"
    pt.pretrain(
        pt.PretrainConfig().tiny().with_overrides(out=str(straight), steps=8, threads=1), progress=False
    )
    command = [sys.executable, "-m", "dyco_probe.cli", "pretrain", "--tiny", "--steps", "8", "--threads", "1"]
    for attempt in range(3):
        out = tmp_path / f"killed-{attempt}"
        proc = subprocess.Popen(
            [*command, "--out", str(out), "--quiet"], cwd=ROOT, env=env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.pt").exists():
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not (out / "model").exists():
            break
    else:
        pytest.fail("pretraining finished three times before it could be killed")
    code, _, stderr = run_cli(capsys, *command[3:], "--out", out, "--quiet")  # the same command, rerun
    assert code == 0, stderr
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / ".model.partial").exists() and not partial_files(out)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_that_looks_finished(checkpoint, tmp_path, capsys):
    out = tmp_path / "t.parquet"
    command = [sys.executable, "-m", "dyco_probe.cli", "trace", "--model", checkpoint, "--n", "8"]
    command += ["--max-new-tokens", "8", "--image-rows", "--batch-size", "4", "--out", str(out), "--quiet"]
    full = subprocess.run(
        command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
        preexec_fn=_limit_file_size(24_000),  # a batch fits, the whole trace does not
    )  # fmt: skip
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert re.search(r"cannot write \S+: .*File too large", full.stderr), full.stderr[-2000:]
    assert not out.exists() and not partial_files(tmp_path)
    parts = out.with_name(out.name + ".parts")
    for part in parts.glob("part-*.parquet"):  # a part on disk is a finished part
        assert part.with_suffix(".done").exists() and Trace.load(part).batch_size == 4
    assert len(list(parts.glob("part-*.done"))) == 2  # both batches kept for the rerun

    code, _, stderr = run_cli(capsys, *command[3:])  # room again: the same command finishes
    assert code == 0, stderr
    assert Trace.load(out).batch_size == 8 and not parts.exists()


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()  # permissions do not bind this user (root): use a read-only file system
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        if candidate.is_dir():
            try:
                (candidate / "dyco-probe-test").touch()
            except OSError:
                return candidate
    pytest.skip("no read-only folder available to this user")


def test_a_read_only_output_folder_is_a_clear_error(checkpoint, tmp_path, capsys):
    folder = _read_only_folder(tmp_path)
    out = folder / "t.parquet"
    code, _, err = run_cli(
        capsys, "trace", "--model", checkpoint, "--n", 2, "--max-new-tokens", 2, "--out", out
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(rf"cannot (write|create the folder) {re.escape(str(folder))}", err), err
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()
