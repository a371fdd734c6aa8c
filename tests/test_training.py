"""dyco_probe.training: what the RL loop and pretraining share (RNG state, checkpoints, metrics log, saving)."""

import json
import random

import numpy as np
import pytest
import torch

from dyco_probe.training import (
    MetricsLog,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    seed_everything,
    set_rng_state,
)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_restores_every_generator():
    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    state = rng_state()
    after = draws()
    set_rng_state(state)
    assert draws() == after


def test_checkpoints_are_atomic_and_a_corrupt_one_says_so(tmp_path):
    path = tmp_path / "deep" / "checkpoint.pt"
    assert load_checkpoint(path) is None
    save_checkpoint({"step": 3, "x": torch.ones(2)}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    (path.parent / ".checkpoint.pt.0123abcd.partial").write_bytes(b"half")  # a write killed before its rename
    save_checkpoint({"step": 4}, path)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]
    path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt checkpoint"):
        load_checkpoint(path)


def test_metrics_log_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, keep_until=None)
    for step in range(1, 4):
        log.write({"kind": "train", "step": step, "loss": step / 10})
    log.write({"kind": "eval", "step": 2, "accuracy": 0.5})
    log.close()
    log = MetricsLog(tmp_path, keep_until=2)
    assert [r["step"] for r in log.records] == [1, 2, 2]
    log.export_csv({"train": "metrics.csv", "eval": "eval.csv"})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "kind,step,loss"
    assert len((tmp_path / "eval.csv").read_text().splitlines()) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 2]


def test_save_model_replaces_a_previous_model_whole(tmp_path):
    from dyco_probe.models.loading import load
    from dyco_probe.testing import mini_builtin

    handle = mini_builtin()
    path = save_model(handle.model, handle.processor, tmp_path / "model", {"recipe.json": "{}"})
    assert (path / "recipe.json").read_text() == "{}" and (path / "config.json").exists()
    save_model(handle.model, handle.processor, path)
    assert not (path / "recipe.json").exists()  # the new model only, nothing of the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert load(path).num_layers == handle.num_layers
