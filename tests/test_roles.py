import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyco_probe.roles import ROLE_NAMES, Role, label_roles

SETTINGS = settings(max_examples=60, deadline=None)


def reference_role(v_vis, v_txt, real, t, tau_vis, tau_txt):
    """docs/method.md#token-roles read literally, one token at a time."""
    delta = v_vis - v_txt
    if t == 0 or not real or math.isnan(delta):
        return Role.NEUTRAL
    if delta > tau_vis:
        return Role.VISUAL
    if delta < -tau_txt:
        return Role.TEXT
    return Role.NEUTRAL


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    vals = st.one_of(st.floats(0.0, 3.0, width=32), st.sampled_from([0.0, 0.05, float("nan")]))
    v_vis = torch.tensor(draw(st.lists(st.lists(vals, min_size=t, max_size=t), min_size=b, max_size=b)))
    v_txt = torch.tensor(draw(st.lists(st.lists(vals, min_size=t, max_size=t), min_size=b, max_size=b)))
    lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    mask = torch.arange(t) < lengths[:, None]
    return v_vis, v_txt, mask


def test_role_enum():
    assert [int(r) for r in Role] == [0, 1, 2]
    assert ROLE_NAMES == ("neutral", "visual", "text")
    assert tuple(r.name.lower() for r in Role) == ROLE_NAMES


def test_thresholds_and_boundaries():
    # t=0 is a dummy column: o_1 is always neutral.
    v_txt = torch.tensor([[0.0, 0.0, 0.05, 0.0500001, 0.0, 0.0, 0.04]])
    v_vis = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1e-6, 0.3, 0.0]])
    mask = torch.ones_like(v_vis, dtype=torch.bool)
    roles = label_roles(v_vis, v_txt, mask)
    n, v, x = Role.NEUTRAL, Role.VISUAL, Role.TEXT
    # delta:          -     0     -0.05  <-0.05   >0    0.3   -0.04
    assert roles.tolist() == [[n, n, n, x, v, v, n]]
    assert roles.dtype == torch.long


def test_custom_thresholds_boundary_is_neutral():
    v_vis = torch.tensor([[0.0, 0.25, 0.0, 0.5]])
    v_txt = torch.tensor([[0.0, 0.0, 0.125, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    roles = label_roles(v_vis, v_txt, mask, tau_vis=0.25, tau_txt=0.125)
    assert roles.tolist() == [[0, 0, 0, 1]]
    roles = label_roles(v_vis, v_txt, mask, tau_vis=0.0, tau_txt=0.0)
    assert roles.tolist() == [[0, 1, 2, 1]]


def test_first_masked_and_nan_tokens_are_neutral():
    v_vis = torch.tensor([[3.0, 3.0, float("nan"), 3.0], [3.0, 3.0, 3.0, 3.0]])
    v_txt = torch.zeros(2, 4)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert label_roles(v_vis, v_txt, mask).tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]


def test_overlapping_thresholds_rejected():
    with pytest.raises(ValueError, match="overlap"):
        label_roles(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), tau_vis=-0.1)


def test_mask_argument_not_modified():
    mask = torch.ones(2, 3, dtype=torch.bool)
    label_roles(torch.ones(2, 3), torch.zeros(2, 3), mask)
    assert mask.all()


@SETTINGS
@given(batches(), st.sampled_from([(0.0, 0.05), (0.1, 0.0), (0.05, 0.05)]))
def test_matches_literal_rule(batch, taus):
    v_vis, v_txt, mask = batch
    roles = label_roles(v_vis, v_txt, mask, *taus)
    b, t = v_vis.shape
    # Δ and the thresholds are compared in the tensors' dtype (float32), so Δ == τ is neutral there.
    delta = (v_vis - v_txt).tolist()
    thresholds = torch.tensor(taus, dtype=v_vis.dtype).tolist()
    expected = [
        [reference_role(delta[i][j], 0.0, bool(mask[i, j]), j, *thresholds) for j in range(t)]
        for i in range(b)
    ]
    assert roles.tolist() == expected


@SETTINGS
@given(batches(), st.integers(0, 2**31 - 1))
def test_values_under_mask_do_not_matter_and_permutation(batch, seed):
    v_vis, v_txt, mask = batch
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(v_vis.shape, generator=gen) * 10
    roles = label_roles(v_vis, v_txt, mask)
    assert torch.equal(
        roles, label_roles(torch.where(mask, v_vis, noise), torch.where(mask, v_txt, -noise), mask)
    )
    perm = torch.randperm(v_vis.shape[0], generator=gen)
    assert torch.equal(roles[perm], label_roles(v_vis[perm], v_txt[perm], mask[perm]))
