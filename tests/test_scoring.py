import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyco_probe.roles import Role, label_roles
from dyco_probe.scoring import (
    ScorerConfig,
    alignment_scores,
    dyco_advantages,
    group_advantages,
    normalised_ratios,
    reweight_advantages,
    score_tokens,
    sequence_scores,
    token_weights,
)

SETTINGS = settings(max_examples=40, deadline=None)
N, V, X = int(Role.NEUTRAL), int(Role.VISUAL), int(Role.TEXT)


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def make_batch(seed, b, t, n_groups):
    """Random right-padded trace tensors; empty completions included."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = torch.arange(t) < lengths[:, None]
    return {
        "r_vis": torch.rand(b, t, generator=gen),
        "r_txt": torch.rand(b, t, generator=gen),
        "v_vis": torch.rand(b, t, generator=gen),
        "v_txt": torch.rand(b, t, generator=gen),
        "roles": torch.randint(0, 3, (b, t), generator=gen),
        "s": torch.rand(b, t, generator=gen),
        "advantages": torch.randn(b, generator=gen),
        "rewards": torch.randint(0, 3, (b,), generator=gen).float(),
        "group_ids": torch.randint(0, n_groups, (b,), generator=gen) * 7 + 3,  # ids need not be dense
        "mask": mask,
        "gen": gen,
    }


batch_params = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(1, 7), st.integers(1, 3))


def reference_sequence_scores(s, roles, mask, group_ids, min_length):
    """Published-code style: a loop per sample, torch.std per group."""
    raw = torch.empty(s.shape[0], dtype=s.dtype)
    for i in range(s.shape[0]):
        active = mask[i] & (roles[i] != N)
        raw[i] = torch.sigmoid(s[i][active].mean()) if active.any() else 0.5
    out = torch.zeros_like(raw)
    for g in group_ids.unique():
        sel = group_ids == g
        std = raw[sel].std() if sel.sum() > 1 else torch.tensor(0.0, dtype=s.dtype)
        if std > 1e-8:
            out[sel] = torch.tanh((raw[sel] - raw[sel].mean()) / std)
    out[mask.sum(-1) < min_length] = -1.0
    return out


# normalised ratios and alignment scores


def test_normalised_ratios():
    r_vis = torch.tensor([0.3, 0.0, 0.0, float("nan"), 1e-9])
    r_txt = torch.tensor([0.1, 0.2, 0.0, 0.5, 1e-9])
    v, x = normalised_ratios(r_vis, r_txt)
    assert v.tolist() == pytest.approx([0.75, 0.0, 0.0, 0.0, 0.1])
    assert x.tolist() == pytest.approx([0.25, 1.0, 0.0, 0.0, 0.1])  # eps-guarded below 1e-8


def test_alignment_scores_worked_example():
    r_vis_n = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    r_txt_n = 1 - r_vis_n
    roles = torch.tensor([[N, V, X, V]])
    mask = torch.tensor([[True, True, True, False]])
    s = alignment_scores(r_vis_n, r_txt_n, roles, mask)
    assert_close(s, [[0.0, 0.8, 0.3, 0.0]])


# token weights


def test_token_weights_worked_example():
    s = torch.tensor([[0.0, math.log(3.0), 5.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w = token_weights(s, mask)
    assert_close(w, [[0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])


def test_token_weights_stable_for_large_scores():
    s = torch.tensor([[1000.0, 1000.0, -1000.0]])
    w = token_weights(s, torch.ones(1, 3, dtype=torch.bool))
    assert_close(w, [[1.5, 1.5, 0.0]])


@SETTINGS
@given(batch_params)
def test_token_weights_sum_to_length(params):
    d = make_batch(*params)
    w = token_weights(d["s"] * 20 - 10, d["mask"])
    assert torch.isfinite(w).all()
    assert torch.allclose(w.sum(-1), d["mask"].sum(-1).float(), atol=1e-4)
    assert (w[~d["mask"]] == 0).all()


# sequence scores and group advantages


def test_sequence_scores_worked_example():
    s = torch.tensor([[0.0, 0.8, 0.4, 0.0], [0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    roles = torch.tensor([[N, V, X, N], [N, V, N, N], [N, N, N, N]])
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
    raw = [1 / (1 + math.exp(-0.6)), 1 / (1 + math.exp(-0.2)), 0.5]
    mean = sum(raw) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in raw) / 2)
    expected = [math.tanh((r - mean) / std) for r in raw]
    assert sequence_scores(s, roles, mask).tolist() == pytest.approx(expected, abs=1e-6)
    # min_length guard: completions with fewer than 3 tokens get -1, the others keep their score
    guarded = sequence_scores(s, roles, mask, min_length=3)
    assert guarded.tolist() == pytest.approx(expected[:2] + [-1.0], abs=1e-6)
    # two groups: {0, 1} and {2}; a group of one has no spread
    two = sequence_scores(s, roles, mask, torch.tensor([5, 5, 9]))
    assert two.tolist() == pytest.approx(
        [math.tanh(1 / math.sqrt(2)), -math.tanh(1 / math.sqrt(2)), 0.0], abs=1e-6
    )
    # normalise over the batch ignores the groups
    batch = sequence_scores(s, roles, mask, torch.tensor([5, 5, 9]), normalise_over="batch")
    assert batch.tolist() == pytest.approx(expected, abs=1e-6)


def test_sequence_scores_no_spread_gives_zero():
    s = torch.full((3, 4), 0.4, dtype=torch.float64)
    roles = torch.full((3, 4), V)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert sequence_scores(s, roles, mask).tolist() == [0.0, 0.0, 0.0]
    s[1, 2] += 3e-8  # raw scores now differ by ~2e-9: spread below 1e-8 still counts as none
    assert sequence_scores(s, roles, mask).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="group, batch"):
        sequence_scores(s, roles, mask, normalise_over="device")


@SETTINGS
@given(batch_params, st.integers(0, 5))
def test_sequence_scores_match_reference(params, min_length):
    d = make_batch(*params)
    d["s"] = d["s"].double()  # well-conditioned comparison; float32 z-scores can differ by 1e-4
    got = sequence_scores(d["s"], d["roles"], d["mask"], d["group_ids"], min_length=min_length)
    want = reference_sequence_scores(d["s"], d["roles"], d["mask"], d["group_ids"], min_length)
    assert torch.allclose(got, want, atol=1e-5)
    assert ((got >= -1) & (got <= 1)).all()


def test_group_advantages_worked_example():
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0, 0.5, 0.5, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 0])
    got = group_advantages(rewards, groups)
    g0 = rewards[[0, 1, 2, 6]]
    want0 = (g0 - g0.mean()) / (torch.std(g0) + 1e-4)
    assert torch.allclose(got[[0, 1, 2, 6]], want0)
    assert got[3] == 0  # group of one: std taken as 0
    assert got[4] == 0 and got[5] == 0  # no spread
    one_group = group_advantages(rewards, None)
    assert torch.allclose(one_group, (rewards - rewards.mean()) / (rewards.std() + 1e-4))


# reweighting


def test_reweight_granularities():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    roles = torch.tensor([[N, V, X], [N, N, N]])
    s = torch.full((2, 3), 0.3)
    off = reweight_advantages(adv, s, roles, mask, granularity="off")
    assert off.tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    token = reweight_advantages(adv, s, roles, mask, granularity="token", alpha=0.2)
    assert_close(token, [[2.4, 2.4, 2.4], [-1.2, 0.0, 0.0]])
    # sequence: scores tanh(±1/sqrt 2) -> factors clamp(1 ± 0.2*0.6089) to [0.8, 1.2]
    seq = reweight_advantages(adv, s, roles, mask, granularity="sequence", alpha=0.2)
    z = math.tanh(1 / math.sqrt(2))
    assert_close(seq, [[2 * (1 + 0.2 * z)] * 3, [-(1 - 0.2 * z), 0.0, 0.0]])
    # the clamp binds for large alpha, and the min-length guard gives the lower bound
    seq = reweight_advantages(adv, s, roles, mask, granularity="sequence", alpha=5.0)
    assert_close(seq, [[2.4] * 3, [-0.8, 0.0, 0.0]])
    seq = reweight_advantages(adv, s, roles, mask, granularity="sequence", min_length=2, clamp=(0.5, 2.0))
    assert seq[1, 0].item() == pytest.approx(-0.8)
    with pytest.raises(ValueError, match="token, sequence, off"):
        reweight_advantages(adv, s, roles, mask, granularity="tokens")


@SETTINGS
@given(batch_params)
def test_off_leaves_advantages_and_constant_s_scales_token(params):
    d = make_batch(*params)
    mask, adv = d["mask"], d["advantages"]
    broadcast = torch.where(mask, adv[:, None].expand(mask.shape), 0.0)
    off = reweight_advantages(adv, d["s"], d["roles"], mask, granularity="off")
    assert torch.equal(off, broadcast)
    const = torch.full_like(d["s"], 0.37)
    token = reweight_advantages(adv, const, d["roles"], mask, granularity="token", alpha=0.3)
    assert torch.allclose(token, 1.3 * broadcast, atol=1e-6)


@SETTINGS
@given(batch_params, st.sampled_from(["token", "sequence", "off"]))
def test_masked_values_never_matter(params, granularity):
    d = make_batch(*params)
    mask, gen = d["mask"], d["gen"]

    def scramble(x, high=5.0):
        noise = (
            torch.randint(0, 3, x.shape, generator=gen)
            if x.dtype == torch.long
            else torch.rand(x.shape, generator=gen) * high
        )
        return torch.where(mask, x, noise)

    cfg = ScorerConfig(granularity=granularity, min_length=2)
    keys = ("r_vis", "r_txt", "v_vis", "v_txt")
    a = score_tokens(*(d[k] for k in keys), mask, cfg, group_ids=d["group_ids"])
    b = score_tokens(*(scramble(d[k]) for k in keys), mask, cfg, group_ids=d["group_ids"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    adv_a = dyco_advantages(d["rewards"], d["group_ids"], a, mask, cfg)
    kw = dict(granularity=granularity, group_ids=d["group_ids"], min_length=2)
    adv_b = reweight_advantages(d["advantages"], d["s"], d["roles"], mask, **kw)
    adv_c = reweight_advantages(d["advantages"], scramble(d["s"]), scramble(d["roles"]), mask, **kw)
    assert torch.equal(adv_b, adv_c)
    assert (adv_a[~mask] == 0).all()
    # explicit roles: values under the mask are ignored too
    c = score_tokens(d["r_vis"], d["r_txt"], None, None, mask, cfg, roles=scramble(d["roles"]))
    e = score_tokens(d["r_vis"], d["r_txt"], None, None, mask, cfg, roles=d["roles"])
    assert torch.equal(c["s"], e["s"])


@SETTINGS
@given(batch_params, st.sampled_from(["token", "sequence", "off"]), st.sampled_from(["group", "batch"]))
def test_permuting_samples_permutes_outputs(params, granularity, normalise_over):
    d = make_batch(*params)
    # float64: z-scores divide by small stds, so float32 summation order alone can move them by 1e-4
    d = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in d.items()}
    perm = torch.randperm(d["mask"].shape[0], generator=d["gen"])
    cfg = ScorerConfig(granularity=granularity, normalise_over=normalise_over, min_length=3)
    keys = ("r_vis", "r_txt", "v_vis", "v_txt", "mask")
    a = score_tokens(*(d[k] for k in keys), cfg, group_ids=d["group_ids"])
    b = score_tokens(*(d[k][perm] for k in keys), cfg, group_ids=d["group_ids"][perm])
    for k in a:
        assert torch.allclose(a[k][perm], b[k], atol=1e-6), k
    adv_a = dyco_advantages(d["rewards"], d["group_ids"], a, d["mask"], cfg)
    adv_b = dyco_advantages(d["rewards"][perm], d["group_ids"][perm], b, d["mask"][perm], cfg)
    assert torch.allclose(adv_a[perm], adv_b, atol=1e-5)
    ga = group_advantages(d["rewards"], d["group_ids"])
    assert torch.allclose(ga[perm], group_advantages(d["rewards"][perm], d["group_ids"][perm]), atol=1e-6)


# the convenience path


def test_score_tokens_composes_the_pieces():
    d = make_batch(0, 5, 6, 2)
    cfg = ScorerConfig(tau_txt=0.1, normalise_over="batch", min_length=2)
    out = score_tokens(d["r_vis"], d["r_txt"], d["v_vis"], d["v_txt"], d["mask"], cfg)
    roles = label_roles(d["v_vis"], d["v_txt"], d["mask"], tau_vis=0.0, tau_txt=0.1)
    rv, rt = normalised_ratios(d["r_vis"], d["r_txt"])
    s = alignment_scores(rv, rt, roles, d["mask"])
    assert torch.equal(out["roles"], roles)
    assert torch.equal(out["s"], s)
    assert torch.equal(out["w"], token_weights(s, d["mask"]))
    want = sequence_scores(s, roles, d["mask"], normalise_over="batch", min_length=2)
    assert torch.equal(out["sequence_score"], want)
    adv = dyco_advantages(d["rewards"], d["group_ids"], out, d["mask"], cfg)
    ga = group_advantages(d["rewards"], d["group_ids"])
    assert torch.equal(
        adv, reweight_advantages(ga, s, roles, d["mask"], normalise_over="batch", min_length=2)
    )
    with pytest.raises(ValueError):
        score_tokens(d["r_vis"], d["r_txt"], None, None, d["mask"])


def test_scorer_config_validates():
    assert ScorerConfig().granularity == "token" and ScorerConfig().alpha == 0.2
    with pytest.raises(ValueError, match="granularity"):
        ScorerConfig(granularity="seq")
    with pytest.raises(ValueError, match="normalise_over"):
        ScorerConfig(normalise_over="device")
    with pytest.raises(ValueError, match="clamp"):
        ScorerConfig(clamp=(1.2, 0.8))
