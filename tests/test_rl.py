"""The RL loop (dyco_probe.rl) on a tiny untrained built-in model: configuration checks, DyCo
advantages, sampling with online tracing, every loss, gradient accumulation, checkpoints and exact
resumption (also of a run killed with SIGKILL), metrics files and the CLI."""

import copy
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dyco_probe.models.adapters import QWEN2_5_VL
from dyco_probe.models.builtin import BuiltinArchitecture, build_untrained
from dyco_probe.models.loading import ModelHandle
from dyco_probe.rl import (
    RLConfig,
    Rollout,
    Signals,
    advantages_from_trace,
    compute_rewards,
    rollout_roles,
    sample_rollout,
    train,
)
from dyco_probe.scoring import ScorerConfig, dyco_advantages, group_advantages, score_tokens

ARCH = BuiltinArchitecture(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    vision_depth=1,
    vision_hidden=32,
    vision_heads=2,
    vision_intermediate=64,
)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return build_untrained(ARCH, seed=0)


@pytest.fixture
def handle(base):
    model, processor = base
    return ModelHandle(copy.deepcopy(model), processor, QWEN2_5_VL, "untrained")


@pytest.fixture(scope="module")
def examples():
    from dyco_probe.data import synthetic_examples

    return synthetic_examples("train", 12), synthetic_examples("test", 3)


def parity_reward(completions, answers):
    """A reward an untrained model can earn: 1 for an even number of words."""
    return [float(len(c.split()) % 2 == 0) for c in completions]


REWARDS = {"parity": parity_reward}


def tiny_config(tmp_path, **kw):
    """A few seconds per run: 2 prompts x 4 completions of <= 12 tokens."""
    base = dict(
        out_dir=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=12,
        eval_max_new_tokens=8,
        eval_every=1,
        checkpoint_every=1,
        reward_weights={"parity": 1.0},
        tau_txt=0.0,  # an untrained model's dynamics are tiny: make roles non-neutral
        lr=1e-3,
    )
    return RLConfig(**{**base, **kw})


def run(handle, config, examples, **kw):
    train_ex, eval_ex = examples
    return train(
        config,
        handle,
        reward_funcs=REWARDS,
        train_examples=train_ex,
        eval_examples=eval_ex,
        progress=False,
        **kw,
    )


def records(out_dir, kind="train"):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def without_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"num_generations": 1}, "num_generations"),
        ({"algo": "ppo"}, "unknown loss 'ppo'"),
        ({"dyco": "tokens"}, "unknown DyCo granularity 'tokens'"),
        ({"normalise_over": "device"}, "normalise_over"),
        ({"prompts_per_step": 0}, "prompts_per_step"),
        ({"grad_accum": 9, "prompts_per_step": 2, "num_generations": 4}, "grad_accum"),
        ({"temperature": 0.0}, "temperature"),
        ({"reward_weights": {}}, "reward_weights"),
        ({"roles": "attention"}, "unknown labeller 'attention'"),
        ({"roles": "visual_dependency", "role_options": {"text_below": 9.0}}, "wrong order"),
        ({"roles": "visual_dependency", "role_options": {"tau_vis": 0.1}}, "takes no option"),
        ({"role_options": {"counterfactual": "blank"}}, "role_options are for other labellers"),
    ],
)
def test_bad_config_is_rejected_when_built(kw, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**kw)


def test_empty_dataset_fails_before_loading_a_model(tmp_path):
    config = RLConfig(out_dir=str(tmp_path / "r"), model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="training set is empty"):
        train(config, train_examples=[], progress=False)
    assert not (tmp_path / "r").exists()


def test_unknown_reward_and_existing_run_fail_early(tmp_path):
    config = RLConfig(
        out_dir=str(tmp_path / "r"), model=str(tmp_path / "none"), reward_weights={"speed": 1.0}
    )
    with pytest.raises(ValueError, match="no reward function named"):
        train(config, progress=False)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a run"):
        train(RLConfig(out_dir=str(tmp_path / "r"), model="x"), train_examples=[object()], progress=False)


def test_loss_defaults_follow_the_spec():
    assert RLConfig(algo="grpo").kl_beta == 0.04
    assert RLConfig(algo="dapo").kl_beta == 0.0 and RLConfig(algo="dapo").masks_truncated
    assert not RLConfig(algo="grpo").masks_truncated
    assert RLConfig(algo="dr_grpo", max_new_tokens=50).loss_config().max_completion_length == 50
    assert not RLConfig(dyco="off").traces and RLConfig(dyco="off", trace_when_off=True).traces


# -- DyCo: (trace, rewards) -> advantages ----------------------------------------------------------


def random_signals(b=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_vis, r_txt = torch.rand(b, t, generator=g), torch.rand(b, t, generator=g)
    v_vis, v_txt = torch.rand(b, t, generator=g), torch.rand(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return Signals(r_vis, r_txt, v_vis, v_txt), mask


@pytest.mark.parametrize("granularity", ["token", "sequence", "off"])
def test_advantages_from_trace_is_the_scorer(granularity):
    sig, mask = random_signals()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    scorer = ScorerConfig(granularity=granularity)
    adv, scored = advantages_from_trace(sig, rewards, groups, mask, scorer)
    want_scored = score_tokens(sig.r_vis, sig.r_txt, sig.v_vis, sig.v_txt, mask, scorer, group_ids=groups)
    torch.testing.assert_close(adv, dyco_advantages(rewards, groups, want_scored, mask, scorer))
    torch.testing.assert_close(scored["s"], want_scored["s"])
    assert (adv[~mask] == 0).all()


def test_advantages_without_trace_are_group_advantages():
    _, mask = random_signals()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, scored = advantages_from_trace(None, rewards, groups, mask, ScorerConfig(granularity="off"))
    assert scored is None
    want = group_advantages(rewards, groups)[:, None].expand(mask.shape) * mask
    torch.testing.assert_close(adv, want)
    with pytest.raises(ValueError, match="needs a trace"):
        advantages_from_trace(None, rewards, groups, mask, ScorerConfig(granularity="token"))


# -- sampling ----------------------------------------------------------------------------------------


def test_rollout_signals_match_the_offline_trace(handle, examples):
    from dyco_probe.tracing import trace_offline

    torch.manual_seed(0)
    exs = examples[0][:2]
    ro = sample_rollout(handle, exs, 3, max_new_tokens=10)
    assert ro.completion_ids.shape == ro.mask.shape == ro.signals.r_vis.shape
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    eos = handle.tokenizer.eos_token_id
    for ids, m, trunc in zip(ro.completion_ids, ro.mask, ro.truncated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert bool(trunc) == (ids[n - 1] != eos)
    prompts = [handle.prompt(ex.question, 1) for ex in ro.examples]
    inputs = handle.encode(prompts, [ex.load_images() for ex in ro.examples])
    offline = trace_offline(
        handle.model, inputs, ro.completion_ids, ro.mask, image_token_id=handle.image_token_id
    )
    for name in ("r_vis", "r_txt", "v_vis", "v_txt"):
        torch.testing.assert_close(
            getattr(ro.signals, name)[ro.mask], getattr(offline, name)[ro.mask], atol=1e-4, rtol=1e-3
        )


def test_rollout_without_tracing_and_cat_select(handle, examples):
    torch.manual_seed(1)
    a = compute_rewards(
        sample_rollout(handle, examples[0][:2], 2, max_new_tokens=6, trace=False), REWARDS, {"parity": 1}
    )
    b = compute_rewards(
        sample_rollout(handle, examples[0][2:3], 2, max_new_tokens=9, trace=False), REWARDS, {"parity": 1}
    )
    assert a.signals is None and a.rewards.shape == (4,)
    both = Rollout.cat([a, b])
    assert len(both) == 6 and both.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.mask.shape[1] == max(a.mask.shape[1], b.mask.shape[1])
    sub = both.select(torch.tensor([False, False, True, True, False, False]))
    assert sub.texts == a.texts[2:] and torch.equal(sub.mask, a.mask[2:, : sub.mask.shape[1]])


DEPENDENCY = {"counterfactual": "swap", "divergence": "k3", "visual_above": 1e-3, "text_below": 1e-4}


def test_rollout_roles_from_any_labeller(handle, examples):
    from dyco_probe.counterfactual import visual_dependency_scores
    from dyco_probe.dependency import dependency_roles

    torch.manual_seed(0)
    ro = sample_rollout(handle, examples[0][:2], 3, max_new_tokens=10)
    roles = rollout_roles(handle, ro, "visual_dependency", DEPENDENCY)
    score = visual_dependency_scores(
        handle, ro.examples, ro.completion_ids, ro.mask, counterfactual="swap", divergence="k3"
    )
    assert torch.equal(roles, dependency_roles(score, ro.mask, 1e-3, 1e-4))
    truth = rollout_roles(handle, ro, "ground_truth")  # the synthetic task's roles: an oracle
    assert truth.shape == ro.mask.shape and (truth[~ro.mask] == 0).all()
    fr = rollout_roles(handle, ro, "fisher_rao", {"tau_txt": 0.0})
    want = score_tokens(
        ro.signals.r_vis,
        ro.signals.r_txt,
        ro.signals.v_vis,
        ro.signals.v_txt,
        ro.mask,
        ScorerConfig(tau_txt=0.0),
    )["roles"]
    assert torch.equal(fr, want)
    with pytest.raises(ValueError, match="traced signals"):
        rollout_roles(handle, dataclasses.replace(ro, signals=None), "visual_dependency")


def test_labellers_of_distributions_get_the_sampling_temperature():
    assert RLConfig(roles="visual_dependency", temperature=0.7).labeller_options() == {"temperature": 0.7}
    config = RLConfig(roles="visual_dependency", temperature=0.7, role_options={"temperature": 1.0})
    assert config.labeller_options() == {"temperature": 1.0}
    assert RLConfig(roles="ground_truth", temperature=0.7).labeller_options() == {}


def test_training_with_visual_dependency_roles(handle, examples, tmp_path, monkeypatch):
    import dyco_probe.rl as rl

    seen = []
    original = rl.advantages_from_trace

    def spy(signals, rewards, group_ids, mask, scorer, roles=None):
        adv, scored = original(signals, rewards, group_ids, mask, scorer, roles=roles)
        seen.append((roles, scored, mask))
        return adv, scored

    monkeypatch.setattr(rl, "advantages_from_trace", spy)
    config = tiny_config(tmp_path, roles="visual_dependency", role_options=DEPENDENCY, n_eval=0)
    run(handle, config, examples)
    assert len(seen) == 2
    for roles, scored, mask in seen:
        assert roles is not None and torch.equal(scored["roles"][mask], roles[mask])
    rows = records(tmp_path / "run")
    assert all(r["time_roles"] > 0 and "role_visual" in r for r in rows)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["role_options"] == DEPENDENCY


# -- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algo, dyco, extra",
    [
        ("grpo", "token", {}),
        ("grpo", "sequence", {"min_length": 4}),
        ("grpo", "off", {}),
        ("dr_grpo", "token", {}),
        ("dapo", "token", {"dynamic_sampling": True, "mask_truncated": False}),
        ("gspo", "sequence", {}),
        ("sapo", "token", {"num_iterations": 2}),
    ],
)
def test_every_loss_trains(handle, examples, tmp_path, algo, dyco, extra):
    before = copy.deepcopy(handle.model.state_dict())
    result = run(handle, tiny_config(tmp_path, algo=algo, dyco=dyco, **extra), examples)
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN
        assert ("role_text" in r) == (dyco != "off")
    trained = [r for r in rows if not r.get("skipped")]
    assert trained and any(r["grad_norm"] > 0 for r in trained)
    changed = any(not torch.equal(v, handle.model.state_dict()[k]) for k, v in before.items())
    assert changed
    assert result.final_eval["step"] == 2 and result.initial_eval["step"] == 0
    if algo == "sapo":
        assert any(abs(r["ratio_mean"] - 1) > 1e-7 for r in trained)  # iteration 2 is off-policy


def test_baseline_does_not_trace_unless_asked(handle, examples, tmp_path, monkeypatch):
    import dyco_probe.tracing as tracing

    class NoTracer:
        def __init__(self, *a, **k):
            raise AssertionError("dyco=off traced")

    monkeypatch.setattr(tracing, "Tracer", NoTracer)
    run(handle, tiny_config(tmp_path, dyco="off", steps=1), examples)
    monkeypatch.undo()
    run(handle, tiny_config(tmp_path / "b", dyco="off", steps=1, trace_when_off=True), examples)
    assert "s_mean" in records(tmp_path / "b" / "run")[0]


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_vision_keeps_the_vision_tower(handle, examples, tmp_path, freeze):
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in handle.model.named_parameters()}
    run(handle, tiny_config(tmp_path, steps=1, freeze_vision=freeze, n_eval=0), examples)
    after = handle.model.state_dict()
    vision = [k for k in before if k.split(".").count("visual")]
    language = [k for k in before if "language_model" in k and k.endswith("weight")]
    assert vision and language
    vision_changed = any(not torch.equal(before[k], after[k]) for k in vision)
    assert vision_changed is not freeze
    assert any(not torch.equal(before[k], after[k]) for k in language)
    assert {n: p.requires_grad for n, p in handle.model.named_parameters()} == flags  # handed back as it came


@pytest.mark.parametrize("algo", ["grpo", "dapo"])
def test_gradient_accumulation_matches_the_whole_batch(base, examples, tmp_path, algo):
    out, weights = [], []
    for accum in (1, 3):
        model, processor = base
        h = ModelHandle(copy.deepcopy(model), processor, QWEN2_5_VL, "untrained")
        cfg = tiny_config(
            tmp_path / str(accum), algo=algo, steps=1, grad_accum=accum, n_eval=0, mask_truncated=False
        )
        run(h, cfg, (examples[0], []))
        out.append(records(tmp_path / str(accum) / "run")[0])
        weights.append(h.model.state_dict())
    for key in ("loss", "grad_norm", "reward", "adv_abs"):
        assert out[0][key] == pytest.approx(out[1][key], rel=1e-4, abs=1e-6), key
    # The update itself. Adam's first step is about lr * sign(grad) (up to 1e-3 here), so this checks
    # the gradient's direction and the number of optimiser steps (grad_norm above checks its size);
    # summing in another order differs by < 1e-6.
    before = base[0].state_dict()
    assert any(not torch.equal(before[k], weights[0][k]) for k in before)  # the step did move it
    for k in before:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=0, atol=1e-5, msg=k)


def test_dapo_masks_truncated_completions(handle, examples, tmp_path):
    # 3 new tokens: every completion is truncated, so DAPO has no token to learn from.
    run(handle, tiny_config(tmp_path, algo="dapo", steps=1, max_new_tokens=3), examples)
    row = records(tmp_path / "run")[0]
    assert row["truncated_fraction"] == 1.0 and row["loss_tokens"] == 0 and row["grad_norm"] == 0


def test_resume_continues_exactly(base, examples, tmp_path):
    def fresh():
        model, processor = base
        return ModelHandle(copy.deepcopy(model), processor, QWEN2_5_VL, "untrained")

    straight = fresh()
    run(straight, tiny_config(tmp_path / "a", steps=4, checkpoint_every=2), examples)

    first = fresh()
    run(first, tiny_config(tmp_path / "b", steps=2, checkpoint_every=2), examples)
    # A run killed after logging step 3 but before its next checkpoint: step 3 must be redone.
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "reward": -1.0}) + "\n")
    resumed = fresh()  # the initial model again: the policy comes from the checkpoint
    result = run(resumed, tiny_config(tmp_path / "b", steps=4, checkpoint_every=2, resume=True), examples)
    assert result.resumed_from == 2

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for kind in ("train", "eval"):
        assert without_timing(records(tmp_path / "a" / "run", kind)) == without_timing(
            records(tmp_path / "b" / "run", kind)
        )


# The tiny run in a subprocess that the next test kills: argv is the architecture and the config.
KILLABLE_RUN = f"""
import json, sys
import torch
torch.set_num_threads(1)
from dyco_probe.data import synthetic_examples
from dyco_probe.models.adapters import QWEN2_5_VL
from dyco_probe.models.builtin import BuiltinArchitecture, build_untrained
from dyco_probe.models.loading import ModelHandle
from dyco_probe.rl import RLConfig, train
{inspect.getsource(parity_reward)}
model, processor = build_untrained(BuiltinArchitecture(**json.loads(sys.argv[1])), seed=0)
train(
    RLConfig(**json.loads(sys.argv[2])),
    ModelHandle(model, processor, QWEN2_5_VL, "untrained"),
    reward_funcs={{"parity": parity_reward}},
    train_examples=synthetic_examples("train", 12),
    eval_examples=synthetic_examples("test", 3),
    progress=False,
)
"""


def test_killed_run_resumes_exactly(base, examples, tmp_path):
    """kill -9 a real run at whatever point it has reached after its first checkpoint, resume it, and
    get what the same run gives uninterrupted."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for steps in (6, 12, 24):  # a step takes ~0.1 s: more steps if the run outran the poll
        out = tmp_path / f"killed-{steps}"
        config = tiny_config(out, steps=steps)
        argv = [json.dumps(dataclasses.asdict(ARCH)), json.dumps(config.to_dict())]
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLABLE_RUN, *argv],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Kill once step 1 is checkpointed and step 2 logged: at step 2's evaluation, its checkpoint
        # or later, wherever the poll lands.
        ckpt, metrics = out / "run" / "checkpoint.pt", out / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and metrics.read_text().count('"kind": "train"') >= 2:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        stderr = proc.communicate()[1].decode()
        assert proc.returncode in (0, -signal.SIGKILL), stderr[-2000:]
        killed_at = torch.load(ckpt, weights_only=False)["step"]
        if proc.returncode == -signal.SIGKILL and killed_at < steps:
            break
    else:
        pytest.fail(f"the training subprocess finished {steps} steps before it could be killed")
    assert 1 <= killed_at < steps and not (out / "run" / "model").exists()

    def fresh():
        model, processor = base
        return ModelHandle(copy.deepcopy(model), processor, QWEN2_5_VL, "untrained")

    resumed = fresh()  # the initial model, as a restarted job would load it
    result = run(resumed, dataclasses.replace(config, resume=True), examples)
    assert result.resumed_from == killed_at
    straight = fresh()
    run(straight, tiny_config(tmp_path / "straight", steps=steps), examples)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for kind in ("train", "eval"):
        assert without_timing(records(tmp_path / "straight" / "run", kind)) == without_timing(
            records(out / "run", kind)
        )


def test_checkpoint_files_and_atomic_writes(handle, examples, tmp_path, monkeypatch):
    run(handle, tiny_config(tmp_path, steps=1), examples)
    out = tmp_path / "run"
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng", "step", "data_position"} <= set(state)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["step"] == 1 and state["data_position"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    wanted = ["reward", "parity", "kl", "clip_fraction", "completion_length", "role_visual", "role_text"]
    wanted += ["s_mean", "w_std", "adv_std", "grad_norm", "time_generate", "time_score", "time_update"]
    assert set(wanted) <= set(header), set(wanted) - set(header)
    assert len((out / "eval.csv").read_text().splitlines()) == 3  # header, step 0, step 1
    from dyco_probe.models.loading import load

    assert load(out / "model").model.config.model_type == "qwen2_5_vl"

    # A crash while writing the next checkpoint leaves the previous one intact.
    before = (out / "checkpoint.pt").read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run(handle, tiny_config(tmp_path, steps=2, resume=True), examples)
    assert (out / "checkpoint.pt").read_bytes() == before


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_trains_and_reports_json(base, tmp_path, capsys):
    from dyco_probe.cli import main

    model, processor = base
    ckpt = tmp_path / "model"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    args = ["train", "--model", str(ckpt), "--out", str(tmp_path / "run"), "--steps", "1", "--n-train", "4"]
    args += ["--n-eval", "2", "--prompts-per-step", "1", "--num-generations", "2", "--max-new-tokens", "6"]
    args += ["--eval-max-new-tokens", "6", "--algo", "dapo", "--dyco", "sequence", "--threads", "1"]
    args += ["--json", "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["final_eval"]["n"] == 2
    assert main([*args, "--resume"]) == 0  # already finished: nothing to do, same answer
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["final_eval"] == summary["final_eval"] and again["resumed_from"] == 1

    assert main(["train", "--num-generations", "1", "--json"]) == 2
    out = capsys.readouterr().out
    assert "num_generations (G) must be >= 2" in out


def test_cli_role_options():
    import argparse

    from dyco_probe.commands.train import add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(
        ["--roles", "visual_dependency", "--role-options", "counterfactual=patches,mask_fraction=0.25"]
    )
    config = config_from_args(args)
    assert config.roles == "visual_dependency"
    assert config.role_options == {"counterfactual": "patches", "mask_fraction": 0.25}
    with pytest.raises(SystemExit):
        parser.parse_args(["--role-options", "counterfactual"])


def test_sampling_never_emits_image_placeholders(handle, examples, tmp_path):
    # Make the image token the model's favourite output (tied embeddings: its logit dominates).
    image_id = handle.image_token_id
    with torch.no_grad():
        handle.model.get_input_embeddings().weight[image_id] *= 100
    torch.manual_seed(0)
    ro = sample_rollout(handle, examples[0][:2], 2, max_new_tokens=8, trace=False)
    assert not (ro.completion_ids[ro.mask] == image_id).any()
    run(handle, tiny_config(tmp_path, steps=1, n_eval=0), (examples[0], []))  # teacher forcing works
