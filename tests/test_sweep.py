"""Sweeps: the TOML schema and grid, resumption (in-process and after a kill -9), failures that are
recorded and not fatal, and two processes under `accelerate launch`."""

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dyco_probe.interventions import ResultStore, SweepConfig, expand_conditions, merge_sweep, run_sweep

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ARCH = (
    "{ hidden_size = 32, intermediate_size = 64, num_layers = 2, num_heads = 2, num_kv_heads = 2, "
    "vision_depth = 1, vision_hidden = 32, vision_heads = 2, vision_intermediate = 64 }"
)
SWEEP = f"""
name = "t"
seed = 3

[model]
source = "untrained"
arch = {ARCH}

[data]
split = "test"
n = 4
batch_size = 2
trajectory = "gold"
max_new_tokens = 48

[[grid]]
keys = ["image"]
strengths = [0.0, 0.5]
targets = ["visual", "random:visual", "text"]
layers = ["each", "all"]
"""
N_CONDITIONS = 2 * 3 * 3
METRICS = [
    "n_targets",
    "t0",
    "dlogp_answer",
    "dlogp_target",
    "dlogp_after",
    "correct_base",
    "correct_int",
    "dacc",
]


@pytest.fixture(scope="module")
def handle():
    from dyco_probe.testing import mini_builtin

    return mini_builtin(suppress_special=False)


def write(tmp_path, text=SWEEP, name="sweep.toml", out="out"):
    path = tmp_path / name
    path.write_text(f'out = "{tmp_path / out}"\n' + text)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, handle):
    """The sweep run in this process, uninterrupted: what every other way of running it must give."""
    tmp = tmp_path_factory.mktemp("reference")
    config = SweepConfig.load(write(tmp))
    summary = run_sweep(config, handle=handle, progress=False)
    assert summary.rows_written == N_CONDITIONS * 4 and summary.errors == 0
    return pd.read_parquet(Path(config.out) / "results.parquet")


def check_complete(frame, reference):
    assert not frame.duplicated(["condition_id", "item_index"]).any()
    assert len(frame) == len(reference) and (frame["status"] == "ok").all()
    a = frame.sort_values(["condition_id", "item_index"]).reset_index(drop=True)
    b = reference.sort_values(["condition_id", "item_index"]).reset_index(drop=True)
    assert a["condition_id"].tolist() == b["condition_id"].tolist()
    for col in METRICS:
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        assert ((x == y) | (pd.isna(x) & pd.isna(y)) | (abs(x - y) < 1e-9)).all(), col


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "dyco_probe.cli", "sweep", *map(str, args)],
        cwd=ROOT,
        env=kwargs.pop("env", env()),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


# -- the schema and the grid ----------------------------------------------------------------------


def test_sweep_file_errors_name_the_problem(tmp_path):
    for bad, message in [
        ("[data]\nsplit = 'test'\nnn = 3\n", "unknown key"),
        ("[[grid]]\ntargets = ['visuals']\n", "unknown target"),
        ("[[grid]]\nkeys = ['pixels']\n", "unknown key span"),
        ("[data]\nn = 4\nslices = [{ name = 'a', start = 2, n = 4 }]\n[[grid]]\n", "outside"),
        ("[model]\nsource = 'builtin'\n", "no [[grid]]"),
        ("[[grid]]\nrole_sources = ['fisher']\n", "unknown role source 'fisher'.*ratio_threshold"),
        ("[roles]\ntheta = 'high'\n[[grid]]\n", "theta must be a number"),
        ("[roles]\ncounterfactual = 'noise'\n[[grid]]\n", "unknown counterfactual 'noise'"),
        ("[roles]\ncounterfactual = 1\n[[grid]]\n", "counterfactual must be a string"),
        ("[roles]\nvisual_above = 0.01\ntext_below = 0.1\n[[grid]]\n", "wrong order"),
    ]:
        path = tmp_path / "bad.toml"
        path.write_text(bad)
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            SweepConfig.load(path)


def test_grid_expansion(tmp_path):
    config = SweepConfig.load(write(tmp_path))
    conditions = expand_conditions(config, num_layers=2, num_heads=2)
    assert len(conditions) == N_CONDITIONS == len({c.id for c in conditions})
    assert {c.layers_name for c in conditions} == {"0", "1", "all"}
    assert {c.kind for c in conditions} == {"knockout", "scale"}
    more = write(
        tmp_path,
        SWEEP + '\n[[grid]]\ntargets = ["all", "neutral"]\nrole_sources = ["ground_truth", "fisher_rao"]\n'
        'heads = ["each"]\n\n[[grid]]\npatch = "image_states"\nlayers = ["each"]\n',
        "more.toml",
    )
    extended = expand_conditions(SweepConfig.load(more), num_layers=2, num_heads=2)
    assert [c.id for c in extended[:N_CONDITIONS]] == [c.id for c in conditions]  # ids are content hashes
    new = extended[N_CONDITIONS:]
    assert sum(c.target == "all" for c in new) == 2 and all(
        c.role_source == "" for c in new if c.target == "all"
    )
    assert sum(c.target == "neutral" for c in new) == 4
    assert sum(c.kind == "patch_image_states" for c in new) == 2


def test_role_sources_are_any_labeller(tmp_path, handle):
    from dyco_probe.data import synthetic_examples
    from dyco_probe.interventions import prepare_trajectories
    from dyco_probe.labellers import get_labeller
    from dyco_probe.tracing import TraceConfig, trace_offline

    text = SWEEP.replace("n = 4", "n = 2").split("[[grid]]")[0] + (
        "[roles]\ntheta = 0.3\ntau_txt = 0.1\n\n[[grid]]\n"
        'targets = ["visual", "text"]\nrole_sources = ["ratio_threshold", "l2"]\n'
    )
    config = SweepConfig.load(write(tmp_path, text))
    summary = run_sweep(config, handle=handle, progress=False)
    assert summary.rows_written == 2 * 2 * 2 and summary.errors == 0
    frame = pd.read_parquet(Path(config.out) / "results.parquet")

    traj = prepare_trajectories(handle, synthetic_examples("test", 2), trajectory="gold", max_new_tokens=48)
    args = (handle.model, traj.prompt_inputs, traj.completion_ids, traj.completion_mask)
    expected = {  # each labeller with the [roles] options it takes
        "ratio_threshold": get_labeller("ratio_threshold")(trace_offline(*args), theta=0.3),
        "l2": get_labeller("l2")(trace_offline(*args, config=TraceConfig(distance="l2")), tau_txt=0.1),
    }
    for (source, target), rows in frame.groupby(["role_source", "target"]):
        want = (expected[source] == (1 if target == "visual" else 2)).sum(-1).tolist()
        assert rows.sort_values("item_index")["n_targets"].tolist() == want, (source, target)


def test_visual_dependency_as_a_role_source(tmp_path, handle):
    from dyco_probe.data import synthetic_examples
    from dyco_probe.interventions import prepare_trajectories
    from dyco_probe.interventions.conditions import labeller_options
    from dyco_probe.labellers import get_labeller
    from dyco_probe.tracing import trace_offline

    text = SWEEP.replace("n = 4", "n = 2").split("[[grid]]")[0] + (
        '[roles]\ncounterfactual = "swap"\ndivergence = "k3"\nvisual_above = 1e-3\ntext_below = 1e-4\n'
        'theta = 0.3\n\n[[grid]]\ntargets = ["visual", "text"]\nrole_sources = ["visual_dependency"]\n'
    )
    config = SweepConfig.load(write(tmp_path, text))
    options = labeller_options("visual_dependency", config.roles)
    assert options == {"counterfactual": "swap", "divergence": "k3", "visual_above": 1e-3, "text_below": 1e-4}
    summary = run_sweep(config, handle=handle, progress=False)
    assert summary.rows_written == 2 * 2 and summary.errors == 0
    frame = pd.read_parquet(Path(config.out) / "results.parquet")

    examples = synthetic_examples("test", 2)
    traj = prepare_trajectories(handle, examples, trajectory="gold", max_new_tokens=48)
    trace = trace_offline(handle.model, traj.prompt_inputs, traj.completion_ids, traj.completion_mask)
    roles = get_labeller("visual_dependency")(trace, handle=handle, examples=examples, **options)
    for target, rows in frame.groupby("target"):
        want = (roles == (1 if target == "visual" else 2)).sum(-1).tolist()
        assert rows.sort_values("item_index")["n_targets"].tolist() == want, target


# -- resumption ----------------------------------------------------------------------------------


def test_rerun_skips_finished_work_and_new_grid_entries_run(tmp_path, handle, reference):
    config = SweepConfig.load(write(tmp_path))
    first = run_sweep(config, handle=handle, progress=False)
    assert first.rows_written == len(reference)
    again = run_sweep(config, handle=handle, progress=False)
    assert again.rows_written == 0 and again.skipped == len(reference)
    check_complete(merge_sweep(config), reference)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert (
        len(summary) == N_CONDITIONS and (summary["n_items"] == 4).all() and (summary["n_errors"] == 0).all()
    )
    assert {"dacc", "dacc_low", "dacc_high", "dlogp_target", "n_targets"} <= set(summary.columns)

    extended = SweepConfig.load(
        write(
            tmp_path, SWEEP + '\n[[grid]]\nkeys = ["text"]\ntargets = ["text", "random:text"]\n', "ext.toml"
        )
    )
    more = run_sweep(extended, handle=handle, progress=False)
    assert more.rows_written == 2 * 4 and more.skipped == len(reference)
    frame = merge_sweep(extended)
    assert len(frame) == len(reference) + 8 and not frame.duplicated(["condition_id", "item_index"]).any()

    other = SweepConfig.load(write(tmp_path, SWEEP.replace("seed = 3", "seed = 4"), "other.toml"))
    with pytest.raises(ValueError, match="different setup"):
        run_sweep(other, handle=handle, progress=False)


def test_a_failing_item_is_recorded_and_not_fatal(tmp_path, handle, monkeypatch):
    import dyco_probe.interventions.sweep as sweep_module
    from dyco_probe.data import DataError, synthetic_examples, write_jsonl

    data = write_jsonl(synthetic_examples("test", 4), tmp_path / "data" / "d.jsonl")
    broken = sorted((tmp_path / "data" / "d_images").glob("*.png"))[1]
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")
    text = SWEEP.replace('split = "test"', f'jsonl = "{data}"')
    config = SweepConfig.load(write(tmp_path, text))
    with pytest.raises(DataError, match=r"d\.jsonl:2: image file .* is not a readable image"):
        run_sweep(config, handle=handle, progress=False)  # a bad image is found before any work

    # an image that goes bad after the data was read fails its item only
    broken.write_bytes(good)
    read = sweep_module.sweep_examples

    def read_then_break(config):
        broken.write_bytes(good)
        examples = read(config)
        broken.write_bytes(b"not a png")
        return examples

    monkeypatch.setattr(sweep_module, "sweep_examples", read_then_break)
    summary = run_sweep(config, handle=handle, progress=False)
    frame = pd.read_parquet(Path(config.out) / "results.parquet")
    bad = frame[frame["status"] == "error"]
    assert summary.errors == len(bad) == N_CONDITIONS and set(bad["item_index"]) == {1}
    assert bad["error"].str.contains("cannot open image").all()
    assert (frame[frame["item_index"] != 1]["status"] == "ok").all() and len(frame) == 4 * N_CONDITIONS

    assert run_sweep(config, handle=handle, progress=False).rows_written == 0  # errors count as done...
    monkeypatch.undo()
    broken.write_bytes(good)
    retry = run_sweep(config, handle=handle, progress=False, retry_failed=True)  # ...unless retried
    assert retry.rows_written == N_CONDITIONS and retry.errors == 0
    frame = pd.read_parquet(Path(config.out) / "results.parquet")
    assert (frame["status"] == "ok").all() and len(frame) == 4 * N_CONDITIONS


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path, reference):
    path = write(tmp_path)
    units = tmp_path / "out" / "parts" / "rank-000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dyco_probe.cli", "sweep", str(path), "--quiet"],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if units.exists() and len(list(units.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ResultStore(tmp_path / "out").done()
    assert 0 < len(partial) < len(reference)  # killed mid-way
    assert not (tmp_path / "out" / "results.parquet").exists()

    done = cli(path, "--json", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'"rows_skipped": {len(partial)}' in done.stdout
    check_complete(pd.read_parquet(tmp_path / "out" / "results.parquet"), reference)
    assert not list(units.glob("*.parquet")) and not list((tmp_path / "out").rglob(".*.partial"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch(tmp_path, reference):
    path = write(tmp_path)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate:  # the torchrun launcher; the sweep processes do not talk to each other, no GPU needed
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        cmd += ["-m", "dyco_probe.cli", "sweep", str(path), "--quiet"]
        run = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    else:  # same contract by hand
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "dyco_probe.cli", "sweep", str(path), "--quiet"],
                cwd=ROOT,
                env={**env(), "RANK": str(r), "WORLD_SIZE": "2"},
            )
            for r in range(2)
        ]
        assert all(p.wait(timeout=300) == 0 for p in procs)
    parts = sorted(p.name for p in (tmp_path / "out" / "parts").glob("part-*.parquet"))
    assert parts == ["part-000.parquet", "part-001.parquet"]
    assert not (tmp_path / "out" / "results.parquet").exists()  # each process only writes its part
    merged = cli(path, "--merge", "--json")
    assert merged.returncode == 0, merged.stderr[-2000:]
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    check_complete(frame, reference)
    per_rank = frame.groupby("rank")["condition_id"].nunique().to_dict()
    assert per_rank == {0: math.ceil(N_CONDITIONS / 2), 1: N_CONDITIONS // 2}
