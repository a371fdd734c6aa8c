"""DyCoGRPOTrainer (dyco_probe.integrations.trl): two TRL training steps on CPU with a tiny built-in
model, per-token advantages injected as the scorer defines them, the attention rows taken from a
forward TRL runs anyway with the numbers of the extra forward."""

import os

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


def make_trainer(checkpoint, tmp_path, dyco, cls=DyCoGRPOTrainer, roles=None, **kw):
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
        **(roles or {}),
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
    checked = 0
    for seq_adv, _, mask, adv in trainer.seen:
        moved = seq_adv != 0  # a group without reward spread has no advantage to reweight
        factor = adv[moved, 0] / seq_adv[moved]  # one factor per completion, in the clamp range
        assert ((factor > 0.8 - 1e-5) & (factor < 1.2 + 1e-5)).all()
        torch.testing.assert_close(adv[moved], factor[:, None] * seq_adv[moved, None] * mask[moved])
        assert (adv[~moved] == 0).all()
        checked += int(moved.sum())
    assert checked > 0


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
    argv += ["--roles", "visual_dependency", "--role_options", "counterfactual=patches,visual_above=0.5"]
    trainer = main(argv)
    assert trainer.dyco.granularity == "sequence" and trainer.roles == "visual_dependency"
    assert trainer.role_options == {"counterfactual": "patches", "visual_above": 0.5}
    assert "dyco/s_mean" in trainer.state.log_history[0]
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pad(x: torch.Tensor, width: int, value=0) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _single_process_advantages(checkpoint, granularity: str, parts: list[dict]) -> torch.Tensor:
    """DyCo advantages of the processes' batches together, in one process: each batch traced as it
    was laid out (tracing is per sample), then scored and reweighted over the whole batch."""
    from dyco_probe.models.loading import load
    from dyco_probe.scoring import reweight_advantages, score_tokens
    from dyco_probe.tracing import trace_offline

    model = load(checkpoint[0]).model
    model.load_state_dict(parts[0]["weights"])  # the processes hold the same weights
    traces = []
    for p in parts:
        length = p["prompt_ids"].shape[1]
        prompt = {
            "input_ids": p["prompt_ids"],
            "attention_mask": p["prompt_mask"],
            "pixel_values": p["pixel_values"],
            "image_grid_thw": p["image_grid_thw"],
            "mm_token_type_ids": p["mm_token_type_ids"][:, :length],
        }
        with torch.no_grad():
            traces.append(trace_offline(model, prompt, p["completion_ids"], eos_token_id=[2]))
    t = max(tr.mask.shape[1] for tr in traces)
    signals = {
        k: torch.cat([_pad(getattr(tr, k), t) for tr in traces]) for k in ("r_vis", "r_txt", "v_vis", "v_txt")
    }
    mask = torch.cat([_pad(tr.mask, t, False) for tr in traces])
    groups = torch.cat([p["dyco_group_ids"] for p in parts])
    dyco = ScorerConfig(granularity=granularity, alpha=0.5, tau_txt=0.0)
    scored = score_tokens(*signals.values(), mask, dyco, group_ids=groups)
    sequence_advantages = torch.cat([p["sequence_advantages"] for p in parts])
    return reweight_advantages(
        sequence_advantages,
        scored["s"],
        scored["roles"],
        mask,
        granularity=granularity,
        alpha=0.5,
        group_ids=groups,
    )


def test_two_processes_under_accelerate_launch(checkpoint, tmp_path):
    """DyCoGRPOTrainer under `accelerate launch --num_processes 2` (CPU, gloo), two steps: DyCo's
    advantages on each process equal one process's on the same batch, sequence scores included over
    groups split between the processes; the processes train the same weights, and they move."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = ["token:loss", "sequence:loss", "sequence:old_logps"]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
    ]
    cmd += ["no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd += [str(root / "tests" / "trl_two_processes.py"), checkpoint[0], str(tmp_path), *runs]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    initial = load_weights(checkpoint[0])
    for run in runs:
        granularity, setting = run.split(":")
        ranks = [
            torch.load(tmp_path / f"{granularity}-{setting}-rank{r}.pt", weights_only=False) for r in (0, 1)
        ]
        assert all(r["world_size"] == 2 for r in ranks)
        steps = list(zip(ranks[0]["records"], ranks[1]["records"]))
        assert len(steps) == 2 if setting == "loss" else len(steps) == 1  # old_logps: one generation
        for parts in steps:
            assert all(p["plan"] == setting and not p["extra_forward"] for p in parts)
            groups = [set(p["dyco_group_ids"].tolist()) for p in parts]
            assert groups[0] & groups[1]  # a group's completions on both processes
            want = _single_process_advantages(checkpoint, granularity, list(parts))
            got = torch.cat([_pad(p["advantages"], want.shape[1]) for p in parts])
            assert (got - want).abs().max() < 1e-6
        finals = [r["final"] for r in ranks]
        assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # one model, trained together
        assert any(not torch.equal(finals[0][k], initial[k]) for k in initial)  # and it trained
        assert [r for r in ranks[0]["log"] if "loss" in r]


def load_weights(path: str) -> dict:
    from dyco_probe.models.loading import load

    return {k: v.clone() for k, v in load(path).model.state_dict().items()}


class DependencySpy(DyCoGRPOTrainer):
    """Records the batch, its visual dependency roles and the roles the scorer used, with the rows
    they were used for (TRL shuffles the batch before the loss forward that scores it)."""

    seen: list

    def _dependency_roles(self, inputs, output, mask):
        roles = super()._dependency_roles(inputs, output, mask)
        output["spy_rows"] = torch.arange(len(inputs), device=mask.device)  # shuffled with the batch
        record = {"ids": [r["id"] for r in inputs], "output": output, "mask": mask, "roles": roles}
        self.seen.append({**record, "scored": []})
        return roles

    def _apply_dyco(self, batch, trace, extra_forward):
        self._rows = batch["spy_rows"]
        super()._apply_dyco(batch, trace, extra_forward)

    def _reweight(self, advantages, scored, mask, group_ids):
        self.seen[-1]["scored"].append((self._rows, scored["roles"]))
        return super()._reweight(advantages, scored, mask, group_ids)


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
        rows = torch.cat([r for r, _ in batch["scored"]])
        assert sorted(rows.tolist()) == list(range(mask.shape[0]))  # each row scored once
        for r, scored in batch["scored"]:
            assert torch.equal(scored[mask[r]], batch["roles"][r][mask[r]])

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
