"""Visual dependency math (dyco_probe.dependency): divergences, roles from thresholds, threshold choice,
group AUROC."""

import math

import pytest
import torch

from dyco_probe.dependency import (
    best_thresholds,
    check_thresholds,
    dependency_roles,
    group_auroc,
    held_out_thresholds,
    k3_divergence,
    kl_divergence,
    next_token_divergence,
)
from dyco_probe.roles import Role

V, X, N = int(Role.VISUAL), int(Role.TEXT), int(Role.NEUTRAL)


def test_kl_by_hand_and_zero_on_identical():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    want = 0.5 * math.log(2)  # 0.5 log(0.5/0.25) + 2 * 0.25 log 1; p = 0 counts 0
    got = kl_divergence(p.log(), q.log())
    assert got.item() == pytest.approx(want)
    torch.testing.assert_close(kl_divergence(q.log(), q.log()), torch.tensor(0.0))


def test_k3_is_r_minus_one_minus_log_r_and_unbiased_for_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 11, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(3, 11, generator=g, dtype=torch.float64), -1)
    k3 = k3_divergence(logp, logq)
    r = (logq - logp).exp()
    torch.testing.assert_close(k3, r - 1 - r.log())
    assert (k3 >= 0).all() and (k3_divergence(logp, logp) == 0).all()
    # E_{v ~ p}[k3(v)] = Σ q - 1 + KL(p‖q) = KL(p‖q): the expectation over the vocabulary is exact
    torch.testing.assert_close((logp.exp() * k3).sum(-1), kl_divergence(logp, logq))


def test_k3_stays_accurate_near_one():
    lp = torch.tensor([-1.0])
    got = k3_divergence(lp, lp + 1e-6)  # r - 1 - log r ≈ d²/2 for a tiny d
    assert got.item() == pytest.approx(0.5e-12, rel=1e-3)


def test_next_token_divergence_per_token_with_mask_and_temperature():
    g = torch.Generator().manual_seed(1)
    real, cf = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    for temperature in (1.0, 0.7):
        lp, lq = (torch.log_softmax(x / temperature, -1) for x in (real, cf))
        kl = next_token_divergence(real, cf, tokens, mask, divergence="kl", temperature=temperature)
        torch.testing.assert_close(kl, torch.where(mask, kl_divergence(lp, lq), 0.0))
        k3 = next_token_divergence(real, cf, tokens, mask, divergence="k3", temperature=temperature)
        idx = tokens[..., None]
        want = k3_divergence(lp.gather(-1, idx)[..., 0], lq.gather(-1, idx)[..., 0])
        torch.testing.assert_close(k3, torch.where(mask, want, 0.0))
    assert (next_token_divergence(real, real, tokens, mask) == 0).all()
    with pytest.raises(ValueError, match="unknown divergence 'js'.*kl, k3"):
        next_token_divergence(real, cf, tokens, mask, divergence="js")
    with pytest.raises(ValueError, match="temperature"):
        next_token_divergence(real, cf, tokens, mask, temperature=0)


def test_roles_from_thresholds_strict_at_the_boundaries():
    score = torch.tensor([[2.0, 1.0, 0.5, 0.1, 0.0, float("nan")], [3.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 6, [True, False, True, False, False, False]])
    roles = dependency_roles(score, mask, visual_above=1.0, text_below=0.1)
    # above 1 visual (1 itself is not), below 0.1 text (0.1 itself is not), between neutral; the first
    # token is labelled too; masked tokens and NaN scores are neutral
    assert roles.tolist() == [[V, N, N, N, X, N], [V, N, X, N, N, N]]
    equal = dependency_roles(score, mask, visual_above=0.5, text_below=0.5)  # no neutral band
    assert equal[0, :5].tolist() == [V, V, N, X, X]


def test_thresholds_in_the_wrong_order_are_refused():
    with pytest.raises(ValueError, match="wrong order.*visual_above=0.1, text_below=0.5"):
        check_thresholds(0.1, 0.5)
    with pytest.raises(ValueError, match="wrong order"):
        dependency_roles(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.1, 0.5)
    check_thresholds(0.5, 0.5)


def test_best_thresholds_find_a_separating_pair():
    score = torch.tensor([[5.0, 0.2, 0.001, 4.0], [0.3, 0.002, 6.0, 0.25]])
    truth = torch.tensor([[V, N, X, V], [N, X, V, N]])
    mask = torch.ones_like(score, dtype=torch.bool)
    grid = (0.0, 0.01, 0.1, 1.0, 10.0)
    best = best_thresholds(score, truth, mask, grid, neutral="included")
    assert (best["visual_above"], best["text_below"], best["macro_f1"]) == (1.0, 0.01, 1.0)
    # neutral excluded: every pair that separates visual from text scores 1
    two = best_thresholds(score, truth, mask, grid, neutral="excluded")
    assert two["macro_f1"] == 1.0 and two["text_below"] <= two["visual_above"]


def test_held_out_thresholds_are_chosen_on_the_other_half():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(1, 3, (40, 6), generator=g)  # visual or text
    score = torch.where(truth == V, 2.0, 0.01) * torch.rand(40, 6, generator=g).add(0.5)
    mask = torch.ones_like(score, dtype=torch.bool)
    out = held_out_thresholds(score, truth, mask, (0.0, 0.1, 0.5, 1.0, 5.0))
    assert out["macro_f1"] == 1.0 and len(out["chosen"]) == 2
    assert all(0.015 <= lo <= hi < 1.0 for hi, lo in out["chosen"])


def test_group_auroc():
    score = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.0]])
    pos = torch.tensor([[True, True, False], [False, True, False]])
    neg = torch.tensor([[False, False, True], [True, False, False]])
    out = group_auroc(score, pos, neg, n_boot=50)
    assert out["auroc"] == 1.0 and (out["n_pos"], out["n_neg"]) == (3, 2)
    assert out["ci_low"] == out["ci_high"] == 1.0
    assert group_auroc(-score, pos, neg, n_boot=10)["auroc"] == 0.0
    with pytest.raises(ValueError, match="both groups"):
        group_auroc(score, pos, pos, n_boot=10)
    with pytest.raises(ValueError, match="do not match"):
        group_auroc(score, pos[:1], neg, n_boot=10)
    empty = group_auroc(score, pos, torch.zeros_like(neg), n_boot=10)
    assert math.isnan(empty["auroc"]) and empty["n_neg"] == 0
    # clusters: whole rows (here two per example) are resampled; the point estimate is the same
    mixed = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.7, 0.6], [0.8, 0.3, 0.4], [0.1, 0.9, 0.2]])
    p4 = torch.tensor([[True, False, False], [True, False, False], [True, False, True], [False, True, False]])
    n4 = torch.tensor([[False, True, True], [False, True, True], [False, True, False], [True, False, True]])
    flat = group_auroc(mixed, p4, n4, n_boot=200)
    grouped = group_auroc(mixed, p4, n4, clusters=["a", "a", "b", "b"], n_boot=200)
    assert grouped["auroc"] == flat["auroc"] and grouped["n_clusters"] == 2 and "n_clusters" not in flat
    with pytest.raises(ValueError, match="3 cluster ids for 4 rows"):
        group_auroc(mixed, p4, n4, clusters=["a", "b", "c"])
