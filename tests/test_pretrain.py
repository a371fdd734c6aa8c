import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dyco_probe.pretrain as pt
from dyco_probe.models.loading import load


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def test_tiny_pretrain_saves_a_loadable_model(tmp_path):
    result = pt.pretrain(pt.PretrainConfig(out=str(tmp_path)).tiny(), progress=False)
    handle = load(result["out"])
    assert handle.adapter.name == "qwen2_5_vl"
    recipe = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert recipe["config"]["steps"] == 4 and recipe["history"]


def test_interrupted_pretraining_resumes_identically(tmp_path, monkeypatch):
    cfg = pt.PretrainConfig().tiny()
    straight = tmp_path / "straight"
    pt.pretrain(pt.PretrainConfig(**{**cfg.__dict__, "out": str(straight)}), progress=False)

    resumed = tmp_path / "resumed"
    real = pt.language_batch
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # during language step 4, after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pt, "language_batch", interrupting)
    rcfg = pt.PretrainConfig(**{**cfg.__dict__, "out": str(resumed)})
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(rcfg, progress=False)
    assert not (resumed / "model").exists()
    monkeypatch.setattr(pt, "language_batch", real)
    pt.pretrain(rcfg, progress=False)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_another_configuration(tmp_path):
    cfg = pt.PretrainConfig(out=str(tmp_path)).tiny()
    pt.pretrain(cfg, progress=False)
    other = pt.PretrainConfig(**{**cfg.__dict__, "lr": 1e-4})
    with pytest.raises(RuntimeError, match="another configuration"):
        pt.pretrain(other, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt checkpoint"):
        pt.pretrain(cfg, progress=False)


def test_pretrain_command_runs_tiny(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dyco_probe.cli",
            "pretrain",
            "--tiny",
            "--out",
            str(tmp_path),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 4
