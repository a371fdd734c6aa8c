"""Token-level analysis (`dyco_probe.analysis`): statistics, tables, and agreement with the scorer."""

import math

import numpy as np
import pytest
import torch

from dyco_probe.analysis import (
    analyse_tokens,
    auroc,
    auroc_ci,
    correctness,
    roc_curve,
    role_switch_rate,
    sample_table,
    token_table,
)
from dyco_probe.roles import Role
from dyco_probe.scoring import ScorerConfig, score_tokens
from dyco_probe.tracing import Trace

torch.set_num_threads(1)
V, X, N = int(Role.VISUAL), int(Role.TEXT), int(Role.NEUTRAL)


def make_trace(batch: int = 6, steps: int = 9, seed: int = 0, correct=None) -> Trace:
    """A hand-made trace: random signals, varied lengths, per-sample correctness."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    r_vis = torch.rand(batch, steps, generator=g) * 0.5
    r_txt = torch.rand(batch, steps, generator=g) * 0.5
    total = (r_vis + r_txt).clamp_min(1e-8)
    v_vis = torch.rand(batch, steps, generator=g)
    v_txt = torch.rand(batch, steps, generator=g)
    correct = [i % 2 == 0 for i in range(batch)] if correct is None else correct
    texts = [[f"w{i}_{t}" if t else "<answer>" for t in range(steps)] for i in range(batch)]
    return Trace(
        token_ids=torch.randint(0, 50, (batch, steps), generator=g),
        mask=mask,
        r_vis=r_vis,
        r_txt=r_txt,
        r_vis_norm=r_vis / total,
        r_txt_norm=r_txt / total,
        v_vis=v_vis,
        v_txt=v_txt,
        token_text=texts,
        layers=(3,),
        samples=[{"sample_id": f"s{i}", "correct": bool(c)} for i, c in enumerate(correct)],
    )


# -- AUROC ---------------------------------------------------------------------------------------------


def pairwise_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_extremes_and_ties():
    assert auroc([3, 4, 1, 2], [1, 1, 0, 0]) == 1.0
    assert auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    assert math.isnan(auroc([1, 2], [1, 1])) and math.isnan(auroc([], []))
    assert auroc([1, float("nan"), 3], [0, 1, 1]) == 1.0  # NaN scores are dropped


@pytest.mark.parametrize("seed", range(5))
def test_auroc_is_the_pairwise_win_rate(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels))
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels))  # the curve's area


def test_auroc_ci_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    labels = rng.random(60) < 0.5
    scores = labels + rng.normal(0, 1, 60)
    a = auroc_ci(scores, labels, n_boot=300, seed=3)
    assert a["ci_low"] <= a["auroc"] <= a["ci_high"]
    assert (a["n_pos"], a["n_neg"]) == (labels.sum(), (~labels).sum())
    assert auroc_ci(scores, labels, n_boot=300, seed=3) == a
    empty = auroc_ci([1.0, 2.0], [True, True])
    assert math.isnan(empty["auroc"]) and math.isnan(empty["ci_low"]) and empty["n_neg"] == 0


# -- switch rate, tables --------------------------------------------------------------------------------


def test_role_switch_rate_skips_neutral_tokens_and_padding():
    roles = torch.tensor([[V, N, X, X, V, X], [V, V, N, N, N, N], [N, X, N, N, N, N], [V, X, V, X, V, X]])
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    ).bool()
    rate, count = role_switch_rate(roles, mask)
    assert rate[0] == pytest.approx(2 / 3) and count[0] == 2  # V X X V (the last X is padding)
    assert rate[1] == 0 and count[1] == 0
    assert math.isnan(rate[2]) and count[2] == 0  # one non-neutral token
    assert rate[3] == 1 and count[3] == 5


def test_tables_read_the_scorer():
    trace = make_trace()
    config = ScorerConfig(normalise_over="batch")
    scored = score_tokens(trace.r_vis, trace.r_txt, trace.v_vis, trace.v_txt, trace.mask, config)
    tokens = token_table(trace)
    m = trace.mask
    assert len(tokens) == int(m.sum())
    np.testing.assert_allclose(tokens["s"], scored["s"][m].numpy())
    np.testing.assert_array_equal(tokens["role_code"], scored["roles"][m].numpy())
    np.testing.assert_allclose(tokens["r_vis_n"], scored["r_vis_n"][m].numpy())
    samples = sample_table(trace)
    np.testing.assert_allclose(samples["sample_score"], scored["sequence_score"].numpy(), rtol=1e-6)
    fractions = samples[["frac_visual", "frac_text", "frac_neutral"]].sum(axis=1)
    np.testing.assert_allclose(fractions, 1.0)
    for i, row in samples.iterrows():
        part = tokens[tokens["sample"] == i]
        assert row["n_tokens"] == len(part)
        assert row["frac_visual"] == pytest.approx((part["role"] == "visual").mean())
        active = part[part["role"] != "neutral"]
        if len(active):
            assert row["mean_s"] == pytest.approx(active["s"].mean())
        else:
            assert math.isnan(row["mean_s"])
        vis = part[part["role"] == "visual"]
        if len(vis):
            assert row["r_vis_n_visual"] == pytest.approx(vis["r_vis_n"].mean())
    # the sample score orders samples like the mean s_t (a monotone transform), hence the same AUROC
    finite = samples["mean_s"].notna()
    assert auroc(samples["sample_score"][finite], samples["correct"][finite]) == pytest.approx(
        auroc(samples["mean_s"][finite], samples["correct"][finite])
    )


def test_correctness_from_metadata_or_given():
    trace = make_trace(batch=4)
    assert correctness(trace).tolist() == [True, False, True, False]
    assert correctness(trace, [1, 1, 0, 0]).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="4 samples"):
        correctness(trace, [True])
    trace.samples = [{} for _ in range(4)]
    with pytest.raises(ValueError, match="correctness"):
        correctness(trace)


# -- the analysis ---------------------------------------------------------------------------------------


def test_analyse_tokens_groups_and_headline():
    trace = make_trace(batch=10, seed=2)
    result = analyse_tokens(trace, n_boot=200)
    fr = result.role_fractions
    assert set(fr["group"]) == {"correct", "incorrect", "all"}
    samples = result.samples
    for g, part in (("correct", samples[samples["correct"]]), ("incorrect", samples[~samples["correct"]])):
        row = fr[(fr["group"] == g) & (fr["measure"] == "visual")].iloc[0]
        assert row["n"] == len(part)
        assert row["mean"] == pytest.approx(part["frac_visual"].mean())
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    head = result.headline()
    assert head["samples"] == 10 and head["accuracy"] == 0.5
    assert head["auroc_sample_score"]["auroc"] == pytest.approx(
        auroc(samples["sample_score"], samples["correct"]), abs=1e-6
    )
    assert set(result.auroc["feature"]) >= {"sample_score", "switch_rate", "frac_visual"}
    md = result.to_markdown()
    assert "Role fractions" in md and "AUROC" in md and "10 trajectories (5 correct, 5 incorrect)" in md


def test_analyse_tokens_with_given_roles_and_one_class():
    trace = make_trace(batch=4, correct=[True] * 4)
    roles = torch.full(trace.token_ids.shape, X)
    result = analyse_tokens(trace, roles=roles, roles_name="ground_truth", n_boot=50)
    assert result.settings["roles"] == "ground_truth"
    assert set(result.tokens["role"]) == {"text"}  # masked positions are not rows
    np.testing.assert_allclose(result.tokens["s"], result.tokens["r_txt_n"])  # s_t = r̃_txt for text tokens
    inc = result.role_fractions[result.role_fractions["group"] == "incorrect"]
    assert (inc["n"] == 0).all() and inc["mean"].isna().all()
    assert result.auroc["auroc"].isna().all()  # one class: no AUROC
    assert result.headline()["auroc_sample_score"]["auroc"] is None
