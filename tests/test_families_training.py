"""Training and sweeps on a tiny Qwen3-VL checkpoint (DeepStack, interleaved 3-D RoPE, GQA): the RL
loop (`train`, and its rollouts traced online against teacher forcing), the TRL integration, and a
small intervention sweep file."""

import json

import pytest
import torch

from dyco_probe.data import synthetic_examples

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dyco_probe.testing import save_tiny_checkpoint

    torch.set_num_threads(1)
    return str(save_tiny_checkpoint("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl") / "model"))


def text_reward(completions, answers):
    """A reward with a spread over any distinct completions of an untrained model."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


def test_rollout_signals_match_the_offline_trace(checkpoint):
    """Grouped sampling (`num_return_sequences`) expands the images and DeepStack features; the online
    trace of the rollout equals a teacher-forced trace of the same completions."""
    from dyco_probe.models.loading import load
    from dyco_probe.rl import sample_rollout
    from dyco_probe.rollout import prompts_and_images as _prompts_and_images
    from dyco_probe.tracing import trace_offline

    handle = load(checkpoint)
    examples = synthetic_examples("train", 2)
    torch.manual_seed(0)
    rollout = sample_rollout(handle, examples, 2, max_new_tokens=6)
    prompts, images = _prompts_and_images(handle, [ex for ex in examples for _ in range(2)])
    offline = trace_offline(
        handle.model, handle.encode(prompts, images), rollout.completion_ids, rollout.mask
    )
    for name in ("r_vis", "r_txt", "v_vis", "v_txt"):
        diff = getattr(offline, name) - getattr(rollout.signals, name)
        assert float(diff[rollout.mask].abs().max()) < 1e-5, name


def test_train_two_steps(checkpoint, tmp_path, capsys):
    from dyco_probe.cli import main
    from dyco_probe.models.loading import load
    from dyco_probe.rl import RLConfig, train

    handle = load(checkpoint)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    config = RLConfig(
        out_dir=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=8,
        eval_max_new_tokens=6,
        eval_every=2,
        checkpoint_every=2,
        reward_weights={"text": 1.0},
        tau_txt=0.0,
        lr=1e-3,
        dyco="token",
    )
    train(
        config,
        handle,
        reward_funcs={"text": text_reward},
        train_examples=synthetic_examples("train", 8),
        eval_examples=synthetic_examples("test", 2),
        progress=False,
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "train"]
    assert len(steps) == 2 and all("s_mean" in r and "role_visual" in r for r in steps)
    assert any(not torch.equal(v, handle.model.state_dict()[k]) for k, v in before.items())

    # the command line, on the checkpoint directory
    argv = ["train", "--model", checkpoint, "--out", str(tmp_path / "cli"), "--steps", "2", "--n-train", "4"]
    argv += ["--n-eval", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6"]
    argv += ["--eval-max-new-tokens", "6", "--dyco", "token", "--threads", "1", "--json", "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["final_eval"]["n"] == 2


def test_trl_two_steps(checkpoint, tmp_path):
    pytest.importorskip("trl")
    from trl import GRPOConfig

    from dyco_probe.integrations.trl import DyCoGRPOTrainer, as_trl_reward, synthetic_dataset
    from dyco_probe.models.loading import load
    from dyco_probe.scoring import ScorerConfig

    class Spy(DyCoGRPOTrainer):
        def _reweight(self, advantages, scored, mask, group_ids):
            out = super()._reweight(advantages, scored, mask, group_ids)
            self.seen.append((advantages.clone(), scored["w"], mask.clone(), out.clone()))
            return out

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-4,
        beta=0.04,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    alpha = 0.5
    trainer = Spy(
        model=checkpoint,
        processing_class=load(checkpoint).processor,
        reward_funcs=[as_trl_reward(text_reward)],
        args=args,
        train_dataset=synthetic_dataset("train", 8),
        dyco=ScorerConfig(granularity="token", alpha=alpha, tau_txt=0.0),
    )
    trainer.seen = []
    assert type(trainer.model).__name__ == "Qwen3VLForConditionalGeneration"
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert len(trainer.seen) == 2
    for seq_adv, w, mask, adv in trainer.seen:
        torch.testing.assert_close(adv, (1 + alpha * w) * seq_adv[:, None] * mask)
    assert all("dyco/s_mean" in r for r in trainer.state.log_history if "loss" in r)
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


def test_sweep_with_a_small_file(checkpoint, tmp_path):
    import pandas as pd

    from dyco_probe.interventions import SweepConfig, run_sweep

    path = tmp_path / "sweep.toml"
    path.write_text(
        f'name = "qwen3_vl"\nseed = 3\nout = "{tmp_path / "out"}"\n\n[model]\nsource = "{checkpoint}"\n\n'
        '[data]\nsplit = "test"\nn = 2\nbatch_size = 2\ntrajectory = "gold"\nmax_new_tokens = 24\n\n'
        '[[grid]]\nkeys = ["image"]\nstrengths = [0.0]\ntargets = ["visual", "text"]\nlayers = ["all"]\n'
    )
    summary = run_sweep(SweepConfig.load(path), progress=False)
    assert summary.rows_written == 4 and summary.errors == 0
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (frame["status"] == "ok").all() and (frame["n_targets"] > 0).all()
    assert frame["dlogp_target"].abs().max() > 0  # knocking the image out moves the gold answer
