"""DyCoGRPOTrainer (dyco_probe.integrations.trl): two TRL training steps on CPU with a tiny built-in
model, per-token advantages injected as the scorer defines them."""

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


def word_count_reward(completions, answers):
    """Rewards longer completions: it has a spread even for an untrained model."""
    return [len(c.split()) / 10 for c in completions]


def make_trainer(checkpoint, tmp_path, dyco, cls=DyCoGRPOTrainer, roles=None, **kw):
    path, processor = checkpoint
    args = GRPOConfig(
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
        **kw,
    )
    return cls(
        model=path,
        processing_class=processor,
        reward_funcs=[as_trl_reward(word_count_reward)],
        args=args,
        train_dataset=synthetic_dataset("train", 8),
        dyco=dyco,
        **(roles or {}),
    )


class Spy(DyCoGRPOTrainer):
    """Records TRL's sequence advantages and what DyCo made of them."""

    seen: list

    def _reweight(self, advantages, scored, mask):
        out = super()._reweight(advantages, scored, mask)
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
    checked = 0
    for seq_adv, _, mask, adv in trainer.seen:
        moved = seq_adv != 0  # a group without reward spread has no advantage to reweight
        factor = adv[moved, 0] / seq_adv[moved]  # one factor per completion, in the clamp range
        assert ((factor > 0.8 - 1e-5) & (factor < 1.2 + 1e-5)).all()
        torch.testing.assert_close(adv[moved], factor[:, None] * seq_adv[moved, None] * mask[moved])
        assert (adv[~moved] == 0).all()
        checked += int(moved.sum())
    assert checked > 0


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
    argv += ["--roles", "visual_dependency", "--role_options", "counterfactual=patches,visual_above=0.5"]
    trainer = main(argv)
    assert trainer.dyco.granularity == "sequence" and trainer.roles == "visual_dependency"
    assert trainer.role_options == {"counterfactual": "patches", "visual_above": 0.5}
    assert "dyco/s_mean" in trainer.state.log_history[0]
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()


class DependencySpy(DyCoGRPOTrainer):
    """Records the batch, its visual dependency roles and the roles the scorer used."""

    seen: list

    def _dependency_roles(self, inputs, output, mask):
        roles = super()._dependency_roles(inputs, output, mask)
        self.seen.append({"ids": [r["id"] for r in inputs], "output": output, "mask": mask, "roles": roles})
        return roles

    def _reweight(self, advantages, scored, mask):
        self.seen[-1]["scored"] = scored["roles"]
        return super()._reweight(advantages, scored, mask)


def test_visual_dependency_roles(checkpoint, tmp_path, monkeypatch):
    import dyco_probe.counterfactual as cf
    from dyco_probe.data import synthetic_examples
    from dyco_probe.dependency import dependency_roles
    from dyco_probe.models.loading import load

    scores, forward = [], cf.dependency_from_inputs
    monkeypatch.setattr(
        cf, "dependency_from_inputs", lambda *a, **k: scores.append(forward(*a, **k)) or scores[-1]
    )
    options = {"counterfactual": "patches", "divergence": "k3", "visual_above": 1e-3, "text_below": 1e-4}
    roles = {"roles": "visual_dependency", "role_options": options}
    # float32 throughout (TRL's default on CPU is bf16 autocast), to compare with a plain forward below
    trainer = make_trainer(
        checkpoint, tmp_path, ScorerConfig(alpha=0.5), cls=DependencySpy, roles=roles, bf16=False
    )
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == len(scores) == 2
    for batch, score in zip(trainer.seen, scores):
        mask = batch["mask"]
        assert torch.equal(batch["roles"], dependency_roles(score.cpu(), mask.cpu(), 1e-3, 1e-4))
        assert torch.equal(batch["scored"][mask], batch["roles"][mask])

    # the first batch (policy still the initial model), scored independently through a ModelHandle
    first = trainer.seen[0]
    by_id = {ex.id: ex for ex in synthetic_examples("train", 8)}
    examples = [by_id[i] for i in first["ids"]]
    ids, mask = first["output"]["completion_ids"], first["mask"]
    want = cf.visual_dependency_scores(
        load(checkpoint[0]), examples, ids, mask, counterfactual="patches", divergence="k3"
    )
    torch.testing.assert_close(scores[0].cpu(), want, atol=1e-6, rtol=1e-3)
    with pytest.raises(ValueError, match="wrong order"):
        make_trainer(
            checkpoint,
            tmp_path,
            ScorerConfig(),
            roles={"roles": "visual_dependency", "role_options": {"text_below": 5}},
        )
    with pytest.raises(ValueError, match="roles must be one of"):
        make_trainer(checkpoint, tmp_path, ScorerConfig(), roles={"roles": "ground_truth"})
