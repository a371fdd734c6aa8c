"""DyCoGRPOTrainer (dyco_probe.integrations.trl): two TRL training steps on CPU with a tiny built-in
model, per-token advantages injected as the scorer defines them, the attention rows taken from a
forward TRL runs anyway with the numbers of the extra forward."""

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # deprecations inside transformers

from trl import GRPOConfig  # noqa: E402

from dyco_probe.integrations.trl import DyCoGRPOTrainer, as_trl_reward, synthetic_dataset  # noqa: E402
from dyco_probe.models.builtin import BuiltinArchitecture, build_untrained  # noqa: E402
from dyco_probe.scoring import ScorerConfig  # noqa: E402

ARCH = BuiltinArchitecture(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    vision_depth=1,
    vision_hidden=32,
    vision_intermediate=64,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny model: TRL builds its reference model from the policy's path."""
    from dyco_probe.models.loading import load

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny")
    model, processor = build_untrained(ARCH, seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path), load(path).processor


def text_reward(completions, answers):
    """A reward with a spread over any distinct completions of an untrained model (word counts tie
    when every completion is truncated)."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


def make_trainer(checkpoint, tmp_path, dyco, cls=DyCoGRPOTrainer, **kw):
    path, processor = checkpoint
    settings = dict(
        output_dir=str(tmp_path / "out"),
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=2,
        learning_rate=1e-4,
        beta=0.04,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    args = GRPOConfig(**{**settings, **kw})
    return cls(
        model=path,
        processing_class=processor,
        reward_funcs=[as_trl_reward(text_reward)],
        args=args,
        train_dataset=synthetic_dataset("train", 8),
        dyco=dyco,
    )


class Spy(DyCoGRPOTrainer):
    """Records TRL's sequence advantages and what DyCo made of them."""

    seen: list

    def _reweight(self, advantages, scored, mask, group_ids):
        out = super()._reweight(advantages, scored, mask, group_ids)
        self.seen.append((advantages.clone(), scored, mask.clone(), out.clone()))
        return out


def test_token_advantages_are_injected(checkpoint, tmp_path):
    alpha = 0.5
    trainer = make_trainer(
        checkpoint, tmp_path, ScorerConfig(granularity="token", alpha=alpha, tau_txt=0.0), cls=Spy
    )
    trainer.seen = []
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert len(trainer.seen) == 2
    for seq_adv, scored, mask, adv in trainer.seen:
        assert adv.shape == mask.shape and seq_adv.dim() == 1
        w = scored["w"]
        torch.testing.assert_close(w.sum(-1), mask.sum(-1).float())  # w_t averages 1 over a completion
        want = (1 + alpha * w) * seq_adv[:, None] * mask
        torch.testing.assert_close(adv, want)
    logs = trainer.state.log_history
    assert all("dyco/role_text" in r and "dyco/s_mean" in r for r in logs if "loss" in r)
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


def test_sequence_granularity_and_dapo_loss(checkpoint, tmp_path):
    dyco = ScorerConfig(granularity="sequence", alpha=0.2, tau_txt=0.0)
    trainer = make_trainer(
        checkpoint, tmp_path, dyco, cls=Spy, loss_type="dapo", mask_truncated_completions=True
    )
    trainer.seen = []
    trainer.train()
    for seq_adv, _, mask, adv in trainer.seen:
        spread = seq_adv != 0  # a group whose rewards tie has no advantage to reweight
        factor = adv[spread, 0] / seq_adv[spread]  # one factor per completion, in the clamp range
        assert ((factor > 0.8 - 1e-5) & (factor < 1.2 + 1e-5)).all()
        torch.testing.assert_close(adv[spread], factor[:, None] * seq_adv[spread, None] * mask[spread])
        assert (adv[~spread] == 0).all()


class Compare(DyCoGRPOTrainer):
    """Also computes each batch's advantages with the extra teacher-forced forward, for comparison."""

    compared: list

    def _apply_dyco(self, batch, trace, extra_forward):
        sequence_advantages = batch["advantages"].clone()
        super()._apply_dyco(batch, trace, extra_forward)
        groups = batch["dyco_group_ids"]
        reference = self._trace(batch)
        want = self._reweight(
            sequence_advantages, self._score(reference, groups), reference.mask.to(groups.device), groups
        )
        self.compared.append((extra_forward, (batch["advantages"] - want).abs().max().item()))


@pytest.mark.parametrize(
    "granularity, settings, plan",
    [
        ("token", {}, "loss"),  # transformers generation, defaults: the loss forward
        ("sequence", {}, "loss"),
        # an old-log-prob pass (as with vLLM's importance-sampling correction): captured there
        ("token", {"steps_per_generation": 2}, "old_logps"),
        ("sequence", {"num_iterations": 2}, "old_logps"),
    ],
)
def test_captured_advantages_equal_the_extra_forward(checkpoint, tmp_path, granularity, settings, plan):
    dyco = ScorerConfig(granularity=granularity, alpha=0.5, tau_txt=0.0)
    trainer = make_trainer(checkpoint, tmp_path, dyco, cls=Compare, **settings)
    trainer.compared = []
    trainer.model.train()
    assert trainer.dyco_capture_plan() == plan
    trainer.train()
    assert trainer.compared and not any(extra for extra, _ in trainer.compared)
    assert max(diff for _, diff in trainer.compared) < 1e-6
    logged = [r["dyco/extra_forward"] for r in trainer.state.log_history if "dyco/extra_forward" in r]
    assert logged and all(x == 0.0 for x in logged)


def test_falls_back_to_the_extra_forward(checkpoint, tmp_path):
    dyco = ScorerConfig(granularity="sequence", tau_txt=0.0)
    # sequence scores over groups split between micro-batches, without an old-log-prob pass
    split = make_trainer(
        checkpoint, tmp_path, dyco, steps_per_generation=2, gradient_accumulation_steps=2, max_steps=1
    )
    split.model.train()
    assert split.dyco_capture_plan() == "extra_forward"
    forced = make_trainer(checkpoint, tmp_path, dyco, cls=Compare, max_steps=1)
    forced.dyco_capture = "extra_forward"
    assert forced.dyco_capture_plan() == "extra_forward"
    # truncated completions masked out by TRL: it attends differently from the tracer, batch by batch
    masked = make_trainer(
        checkpoint, tmp_path, dyco, cls=Compare, max_steps=1, mask_truncated_completions=True
    )
    for trainer in (split, forced, masked):
        trainer.compared = []
        trainer.train()
    assert all(r["dyco/extra_forward"] == 1.0 for r in split.state.log_history if "loss" in r)
    assert forced.compared == [(True, 0.0)]
    assert masked.compared and all(extra for extra, _ in masked.compared)  # 10 tokens: all truncated


def test_off_is_plain_grpo(checkpoint, tmp_path):
    trainer = make_trainer(checkpoint, tmp_path, ScorerConfig(granularity="off"))
    captured = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        captured.append(out["advantages"])
        return out

    trainer._generate_and_score_completions = spy
    trainer.train()
    assert captured and all(a.dim() == 1 for a in captured)
    assert not any("dyco/s_mean" in r for r in trainer.state.log_history)


def test_command_line_entry_point_on_a_jsonl(checkpoint, tmp_path):
    from dyco_probe.data import synthetic_examples, write_jsonl
    from dyco_probe.integrations.trl import main

    data = write_jsonl(synthetic_examples("train", 4), tmp_path / "train.jsonl")
    argv = ["--model", checkpoint[0], "--data", str(data), "--granularity", "sequence", "--tau_txt", "0"]
    argv += [
        "--output_dir",
        str(tmp_path / "out"),
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "2",
    ]
    argv += ["--max_completion_length", "6", "--max_steps", "1", "--use_cpu", "--report_to", "none"]
    argv += ["--save_strategy", "no", "--logging_steps", "1"]
    trainer = main(argv)
    assert trainer.dyco.granularity == "sequence"
    assert "dyco/s_mean" in trainer.state.log_history[0]
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()
