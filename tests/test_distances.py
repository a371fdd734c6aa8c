import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyco_probe.distances import (
    DISTANCES,
    fisher_rao_distance,
    get_distance,
    hellinger_distance,
    jensen_shannon_distance,
    l2_distance,
    masked_distribution,
    modality_dynamics,
    symmetric_kl_distance,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def distributions(draw, n=3, dtype=torch.float32):
    """``n`` distributions over the same K keys, each with its own non-empty support."""
    k = draw(st.integers(1, 12))
    out = []
    for _ in range(n):
        weights = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
        support = draw(st.lists(st.booleans(), min_size=k, max_size=k).filter(any))
        out.append(masked_distribution(torch.tensor(weights, dtype=dtype), torch.tensor(support)))
    return out


def literal_fisher_rao(p, q):
    bc = (p.double() * q.double()).sqrt().sum(-1).clamp(0, 1)
    return 2 * torch.arccos(bc)


# masked_distribution


@SETTINGS
@given(
    st.integers(1, 5).flatmap(
        lambda k: st.tuples(
            st.lists(st.floats(-1.0, 10.0), min_size=k, max_size=k),
            st.lists(st.booleans(), min_size=k, max_size=k),
        )
    )
)
def test_masked_distribution_normalises_inside_mask(case):
    weights, support = torch.tensor(case[0]), torch.tensor(case[1])
    p = masked_distribution(weights, support)
    assert torch.isfinite(p).all()
    assert (p[~support] == 0).all()
    if support.any():
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (p[support] > 0).all()
    else:
        assert (p == 0).all()


def test_masked_distribution_floor_and_bad_values():
    p = masked_distribution(
        torch.tensor([0.0, 1.0, float("nan"), 5.0]), torch.tensor([True, True, True, False])
    )
    assert p[3] == 0
    assert p[0] == pytest.approx(1e-12, rel=1e-3)
    assert p[2] == pytest.approx(1e-12, rel=1e-3)
    assert p.sum().item() == pytest.approx(1.0)


def test_masked_distribution_batched_empty_row_is_zero():
    w = torch.rand(3, 4)
    mask = torch.tensor([[True] * 4, [False] * 4, [True, False, True, False]])
    p = masked_distribution(w, mask)
    assert torch.allclose(p.sum(-1), torch.tensor([1.0, 0.0, 1.0]))
    assert not torch.isnan(p).any()


# Fisher-Rao


@SETTINGS
@given(distributions())
def test_fisher_rao_is_a_metric(dists):
    p, q, r = dists
    d = fisher_rao_distance
    assert d(p, p).item() <= 1e-5
    assert d(p, q).item() == pytest.approx(d(q, p).item(), abs=1e-6)
    assert d(p, r).item() <= d(p, q).item() + d(q, r).item() + 1e-5
    assert 0.0 <= d(p, q).item() <= math.pi + 1e-6


@SETTINGS
@given(distributions(n=2, dtype=torch.float64))
def test_fisher_rao_matches_literal_formula(dists):
    p, q = dists
    assert fisher_rao_distance(p, q).item() == pytest.approx(literal_fisher_rao(p, q).item(), abs=1e-6)


def test_fisher_rao_identity_is_exact_in_float32():
    # The literal arccos form gives ~1e-3 here because the entries sum to 1 only up to rounding.
    p = masked_distribution(torch.rand(64, 257), torch.ones(64, 257, dtype=torch.bool))
    assert fisher_rao_distance(p, p).abs().max().item() < 1e-6


def test_fisher_rao_worked_examples():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.0, 1.0])
    assert fisher_rao_distance(p, q).item() == pytest.approx(math.pi)  # disjoint supports
    # BC([1, 0], [1/2, 1/2]) = sqrt(1/2) -> 2 * pi/4
    assert fisher_rao_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == pytest.approx(
        math.pi / 2
    )
    # An empty span (all zeros) has BC = 0, as the literal formula says.
    assert fisher_rao_distance(torch.zeros(3), q).item() == pytest.approx(math.pi)


def test_fisher_rao_non_finite_is_zero_and_batched_shape():
    p = torch.tensor([[float("nan"), 0.5], [0.3, 0.7]])
    q = torch.tensor([[0.5, 0.5], [float("inf"), 0.0]])
    assert fisher_rao_distance(p, q).tolist() == [0.0, 0.0]
    x = masked_distribution(torch.rand(2, 3, 5), torch.ones(2, 3, 5, dtype=torch.bool))
    assert fisher_rao_distance(x, x.flip(-1)).shape == (2, 3)


# Alternatives


@SETTINGS
@given(distributions(n=2))
def test_all_distances_nonnegative_symmetric_zero_on_identity(dists):
    p, q = dists
    for name, d in DISTANCES.items():
        assert d(p, p).item() == pytest.approx(0.0, abs=1e-5), name
        dpq = d(p, q).item()
        assert math.isfinite(dpq) and dpq >= 0, name
        assert dpq == pytest.approx(d(q, p).item(), rel=1e-4, abs=1e-5), name


def test_alternative_distances_worked_examples():
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.0, 1.0])
    assert hellinger_distance(p, q).item() == pytest.approx(1.0)
    assert l2_distance(p, q).item() == pytest.approx(math.sqrt(2))
    assert jensen_shannon_distance(p, q).item() == pytest.approx(math.sqrt(math.log(2)))
    a, b = torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5])
    kl_ab = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_ba = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert symmetric_kl_distance(a, b).item() == pytest.approx(kl_ab + kl_ba, rel=1e-5)
    # Disjoint supports: finite thanks to the floor.
    assert math.isfinite(symmetric_kl_distance(p, q).item())


def test_registry():
    assert set(DISTANCES) == {"fisher_rao", "hellinger", "l2", "jensen_shannon", "symmetric_kl"}
    assert get_distance("fisher_rao") is fisher_rao_distance
    with pytest.raises(ValueError, match="fisher_rao"):
        get_distance("cosine")


def test_modality_dynamics_uses_the_named_distance():
    mask = torch.ones(2, 4, dtype=torch.bool)
    a, b, c, d = (masked_distribution(torch.rand(2, 4), mask) for _ in range(4))
    v_vis, v_txt = modality_dynamics(a, b, c, d)
    assert torch.equal(v_vis, fisher_rao_distance(a, b))
    assert torch.equal(v_txt, fisher_rao_distance(c, d))
    v_vis, _ = modality_dynamics(a, b, c, d, distance="l2")
    assert torch.equal(v_vis, l2_distance(a, b))
