import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyco_probe.losses import LOSSES, LossConfig, dynamic_sampling_mask, kl_k3, policy_loss

SETTINGS = settings(max_examples=25, deadline=None)
NO_KL = LossConfig(beta=0.0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def example():
    """Two completions (3 and 2 tokens) with known ratios; sample 0 has A = +1, sample 1 has A = -2."""
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    logp = (old_logp + ratios.log()).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -2.0])
    return logp, old_logp, adv, mask


def test_kl_k3():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert kl_k3(logp, logp).tolist() == [0.0, 0.0, 0.0]
    r = 0.3
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-0.7])).item() == pytest.approx(
        math.exp(r) - r - 1, rel=1e-5
    )
    x = torch.randn(100)
    assert (kl_k3(x, torch.randn(100)) >= 0).all()


def test_grpo_worked_example(example):
    logp, old_logp, adv, mask = example
    loss, metrics = policy_loss("grpo", logp, old_logp, adv, mask, config=NO_KL)
    # sample 0: -(1, min(1.5, 1.2), 0.5); sample 1: +2 * (1.1, clip(0.7) = 0.8)
    assert loss.item() == pytest.approx((-(1 + 1.2 + 0.5) / 3 + (2.2 + 1.6) / 2) / 2, rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1.1 + 0.7) / 5, rel=1e-5)
    assert metrics["kl_mean"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_dr_grpo_worked_example(example):
    logp, old_logp, adv, mask = example
    total = -(1 + 1.2 + 0.5) + (2.2 + 1.6)
    loss, _ = policy_loss("dr_grpo", logp, old_logp, adv, mask, config=NO_KL)
    assert loss.item() == pytest.approx(total / (2 * 3), rel=1e-5)  # default constant: T of the batch
    cfg = LossConfig(beta=0.0, max_completion_length=10)
    loss, _ = policy_loss("dr_grpo", logp, old_logp, adv, mask, config=cfg)
    assert loss.item() == pytest.approx(total / (2 * 10), rel=1e-5)


def test_dapo_worked_example_and_token_normalisation(example):
    logp, old_logp, adv, mask = example
    ref = old_logp - 0.5  # DAPO ignores the KL by default even when a reference is given
    loss, metrics = policy_loss("dapo", logp, old_logp, adv, mask, ref_logp=ref)
    # decoupled clip [0.8, 1.28]: sample 0 -> -(1 + 1.28 + 0.5); sample 1 unchanged from GRPO
    want = (-(1 + 1.28 + 0.5) + (2.2 + 1.6)) / 5
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    grpo, _ = policy_loss("grpo", logp, old_logp, adv, mask, config=LossConfig(beta=0.0, eps=0.28))
    assert grpo.item() != pytest.approx(loss.item(), rel=1e-3)  # unequal lengths: token vs sequence mean
    truncated = torch.tensor([False, True])
    loss, _ = policy_loss("dapo", logp, old_logp, adv, mask, truncated=truncated)
    assert loss.item() == pytest.approx(-(1 + 1.28 + 0.5) / 3, rel=1e-5)
    # with equal lengths and no clipping, token and sequence means agree
    full = torch.ones_like(mask)
    same = torch.zeros_like(old_logp)
    a, _ = policy_loss("dapo", same, same, adv, full)
    b, _ = policy_loss("grpo", same, same, adv, full, config=NO_KL)
    assert a.item() == pytest.approx(b.item())


def test_gspo_worked_example_and_clipping(example):
    logp, old_logp, adv, mask = example
    loss, metrics = policy_loss("gspo", logp, old_logp, adv, mask, config=NO_KL)
    s0 = 0.75 ** (1 / 3)  # exp(mean log rho) = (1 * 1.5 * 0.5) ** (1/3), unclipped branch is smaller
    # sample 1: s = 0.77 ** 0.5, A = -2, min(-2 s, -2 * 0.9997) picks the clipped value
    want = (-s0 + 2 * (1 - 3e-4)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx((s0 + 0.77**0.5) / 2, rel=1e-5)
    loss.backward()
    assert (logp.grad[0] != 0).all()  # unclipped sequence: every token gets the sequence gradient
    assert (logp.grad[1] == 0).all()  # clipped sequence: no gradient


def test_gspo_uses_mean_token_advantage():
    zeros = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    adv = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    loss, _ = policy_loss("gspo", zeros, zeros, adv, mask, config=NO_KL)
    assert loss.item() == pytest.approx(-3.0)


def test_sapo_worked_example(example):
    logp, old_logp, adv, mask = example
    loss, metrics = policy_loss("sapo", logp, old_logp, adv, mask, config=NO_KL)
    g_pos = [sigmoid(1.0 * (r - 1)) * 4 / 1.0 for r in (1.0, 1.5, 0.5)]
    g_neg = [sigmoid(1.05 * (r - 1)) * 4 / 1.05 for r in (1.1, 0.7)]
    want = (-sum(g_pos) / 3 + 2 * sum(g_neg) / 2) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert "clip_fraction" not in metrics
    assert metrics["gate_mean"] == pytest.approx((sum(g_pos) + sum(g_neg)) / 5, rel=1e-5)


def test_sapo_gate_at_ratio_one():
    # docs/method.md#policy-losses literally: g = sigmoid(0) * 4 / tau = 2 / tau, so the loss is -2 A / tau ...
    zeros = torch.zeros(2, 1, requires_grad=True)
    mask = torch.ones(2, 1, dtype=torch.bool)
    adv = torch.tensor([3.0, -3.0])
    loss, metrics = policy_loss("sapo", zeros, zeros.detach(), adv, mask, config=NO_KL)
    assert loss.item() == pytest.approx((-2 / 1.0 * 3 + 2 / 1.05 * 3) / 2, rel=1e-6)
    assert metrics["gate_mean"] == pytest.approx((2 / 1.0 + 2 / 1.05) / 2, rel=1e-6)
    # ... while its slope is 1, so the gradient equals the unclipped GRPO gradient.
    loss.backward()
    grpo_logp = torch.zeros(2, 1, requires_grad=True)
    grpo, _ = policy_loss("grpo", grpo_logp, zeros.detach(), adv, mask, config=NO_KL)
    grpo.backward()
    assert torch.allclose(zeros.grad, grpo_logp.grad)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "dapo"])
def test_ratio_one_gives_minus_mean_advantage_plus_kl(name):
    t = 4
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    logp = torch.randn(2, t)
    ref = logp + torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.5, -0.5, 9.0, 9.0]])
    adv = torch.tensor([[1.0, 2.0, 3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    loss, metrics = policy_loss(name, logp, logp, adv, mask, ref_logp=ref)
    kl = kl_k3(logp, ref)
    seq_adv = torch.tensor([1.5, -1.0])  # means over each sequence's tokens
    seq_kl = torch.stack([kl[0].mean(), kl[1, :2].mean()])
    if name == "dr_grpo":
        want = (-(adv * mask).sum() + 0.04 * (kl * mask).sum()) / (2 * t)
    else:
        scale = {"sapo": torch.tensor([2.0, 2 / 1.05])}.get(name, torch.ones(2))
        want = (-scale * seq_adv + 0.04 * seq_kl).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["kl_mean"] == pytest.approx(kl[mask].mean().item(), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_flow_and_bf16_works(name):
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(5) < torch.tensor([5, 3, 1])[:, None]
    old = torch.randn(3, 5, generator=gen)
    logp = (old + 1e-4 * torch.randn(3, 5, generator=gen)).requires_grad_()
    ref = old + 0.1 * torch.randn(3, 5, generator=gen)
    adv = torch.randn(3, 5, generator=gen)
    loss, _ = policy_loss(name, logp, old, adv, mask, ref_logp=ref)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[mask].abs().sum() > 0
    assert (logp.grad[~mask] == 0).all()
    loss16, _ = policy_loss(
        name, logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, ref_logp=ref.bfloat16()
    )
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(LOSSES), st.integers(1, 5), st.integers(1, 6))
def test_masked_values_never_matter(seed, name, b, t):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(t) < torch.randint(0, t + 1, (b,), generator=gen)[:, None]
    old = torch.randn(b, t, generator=gen)
    base = old + 0.3 * torch.randn(b, t, generator=gen)
    ref = old + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, t, generator=gen)
    truncated = torch.rand(b, generator=gen) < 0.3
    garbage = torch.tensor([float("nan"), float("-inf"), float("inf"), 1e4])
    pick = torch.randint(0, 4, (4, b, t), generator=gen)

    def run(fill):
        x = base.clone().requires_grad_()
        inputs = [
            torch.where(mask, v, garbage[pick[i]]) if fill else v for i, v in enumerate((x, old, adv, ref))
        ]
        loss, metrics = policy_loss(
            name, inputs[0], inputs[1], inputs[2], mask, ref_logp=inputs[3], truncated=truncated
        )
        loss.backward()
        return loss, x.grad, metrics

    clean, dirty = run(False), run(True)
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[1], dirty[1])
    assert clean[2] == dirty[2]
    assert torch.isfinite(dirty[0]) and torch.isfinite(dirty[1]).all()


def test_unknown_loss_and_defaults():
    with pytest.raises(ValueError, match="grpo, dr_grpo, dapo, gspo, sapo"):
        policy_loss(
            "ppo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool)
        )
    cfg = LossConfig()
    assert (cfg.eps, cfg.beta, cfg.eps_low, cfg.eps_high) == (0.2, 0.04, 0.2, 0.28)
    assert (cfg.gspo_eps_low, cfg.gspo_eps_high, cfg.sapo_tau_pos, cfg.sapo_tau_neg) == (
        3e-4,
        4e-4,
        1.0,
        1.05,
    )
    assert cfg.dapo_beta == 0.0 and cfg.max_completion_length is None


def test_dynamic_sampling_mask():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 0.5, 0.5])
    groups = torch.tensor([3, 3, 1, 1, 7, 9, 9])
    assert dynamic_sampling_mask(rewards, groups).tolist() == [False, False, True, True, False, False, False]
